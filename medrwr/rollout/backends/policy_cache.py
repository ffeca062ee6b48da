"""GGUF policies converted once into the cache, and hub ids that fail fast: the slow parts of loading a policy.

* **Convert once.** Parsing and de-quantising a ``.gguf`` file and rebuilding its tokenizer takes 25-50 s per
  process (transformers runs its GGUF reader four times). :func:`convert_gguf_policy` does it once into
  ``<cache>/models/<stem>-<key>/`` (safetensors + tokenizer files, :func:`converted_gguf_dir`), atomically
  under a file lock; later loads read that folder in about a second, with the same tokens and log-probabilities
  (tests/rollout/test_policy_cache.py checks the packaged SmolLM2 bit for bit).
* **Fail fast and once.** :func:`check_hub_id` answers before transformers' retries: a hub id not in the local
  Hugging Face cache with ``HF_HUB_OFFLINE`` set, or with the Hub unreachable after one request, raises
  :class:`~medrwr.errors.HubUnreachable` naming the id and saying to pass a local path.
* **Quiet at our boundary.** :func:`quiet_transformers` turns transformers' per-tensor bars (and, for the
  conversion, its log chatter) off around our own calls; our progress lines go to stderr beside tqdm's bars.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medrwr._io import sha256_file
from medrwr.errors import BackendError

logger = logging.getLogger(__name__)

__all__ = [
    "POLICY_CACHE_VERSION",
    "check_hub_id",
    "convert_gguf_policy",
    "converted_gguf_dir",
    "load_gguf_directly",
    "quiet_transformers",
]

#: Bump when the layout of a converted GGUF folder changes: older conversions are then ignored (redone once).
POLICY_CACHE_VERSION = 1
_CONVERTED_MARKER = "medrwr-converted.json"  # written last, inside the temp folder, before the rename


def _say(message: str, progress: bool) -> None:
    """A progress line for the user on stderr (beside tqdm bars and the CLI's spinner); a log record when off."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        logger.info(message)


@contextlib.contextmanager
def quiet_transformers(level: int | None = None) -> Iterator[None]:
    """transformers' progress bars off (and its log level raised to ``level``) for one of our calls, then restored.

    Our own steps say what is loading; a per-tensor "Loading weights" bar is noise. Warnings stay on unless
    ``level`` is given, so a checkpoint with missing weights still says so. With ``--debug`` nothing is muted.
    """
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    from transformers.utils import logging as tf_logging

    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    if level is not None and level > verbosity:
        tf_logging.set_verbosity(level)
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()


def converted_gguf_dir(gguf: str | os.PathLike) -> Path:
    """Where the converted copy of a ``.gguf`` policy lives: ``<cache>/models/<file stem>-<key>``.

    ``key`` hashes the file's resolved path, size and modification time, the transformers version (it does the
    de-quantisation) and :data:`POLICY_CACHE_VERSION`: a changed file or library gets a fresh conversion, and
    finding the folder costs one ``stat``, not a hash of the file.
    """
    import transformers

    from medrwr.assets import models_cache_dir

    path = Path(gguf).expanduser().resolve()
    st = path.stat()
    ident = f"{path}|{st.st_size}|{st.st_mtime_ns}|transformers {transformers.__version__}|v{POLICY_CACHE_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    return models_cache_dir() / f"{stem}-{key}"


def _is_converted(folder: Path) -> bool:
    return (folder / _CONVERTED_MARKER).is_file() and (folder / "config.json").is_file()


def convert_gguf_policy(gguf: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                        progress: bool = True) -> Path:
    """Convert a ``.gguf`` policy once into a transformers folder (safetensors + tokenizer files) and return it.

    Parsing and de-quantising a GGUF file and rebuilding its tokenizer takes tens of seconds per process; the
    folder loads in well under a second, with the same weights and tokenizer (tested token for token). The
    default folder is :func:`converted_gguf_dir`. Written atomically under a file lock: a temp folder beside
    it is renamed into place after its last file, so a conversion killed half-way leaves only a
    ``.NAME.tmp-*`` folder that is never loaded and is deleted by the next conversion.
    """
    gguf = Path(gguf).expanduser().resolve()
    out = Path(out_dir).expanduser().absolute() if out_dir else converted_gguf_dir(gguf)
    if _is_converted(out):
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if _is_converted(out):  # another process finished it while we waited
            return out
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # only lock holders write temps: these are dead
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_conversion(gguf, tmp, out, progress)
            if out.exists():  # a folder without the marker is not a finished conversion
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _write_conversion(gguf: Path, tmp: Path, out: Path, progress: bool) -> None:
    from medrwr._imports import require

    require("gguf", "models", "loading GGUF checkpoints")
    from transformers import AutoModelForCausalLM, __version__

    from medrwr.rollout.backends.processing import load_tokenizer

    t0 = time.perf_counter()
    _say(f"Converting the policy {gguf.name} for fast loading (one time; about 30 s on an idle 2-core machine, "
         f"up to 2 minutes on a busy one) into {out}", progress)
    folder, name = str(gguf.parent), gguf.name
    with quiet_transformers(logging.ERROR):
        _say("  step 1/3: rebuilding the tokenizer from the GGUF file", progress)
        tok = load_tokenizer(folder, gguf_file=name)
        _say("  step 2/3: reading and de-quantising the weights (float32)", progress)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        _say("  step 3/3: writing safetensors and tokenizer files", progress)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    st = gguf.stat()
    marker = {
        "source": str(gguf),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "source_sha256": sha256_file(gguf),
        "transformers": __version__,
        "policy_cache_version": POLICY_CACHE_VERSION,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / _CONVERTED_MARKER).write_text(json.dumps(marker, indent=2))
    _say(f"  converted in {time.perf_counter() - t0:.0f} s; later runs load it in about a second", progress)


def cache_writable(gguf: Path) -> bool:
    """Whether the converted copy exists or can be written (a read-only cache falls back to the GGUF file)."""
    folder = converted_gguf_dir(gguf)
    if _is_converted(folder):
        return True
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if os.access(folder.parent, os.W_OK):
        return True
    logger.warning("cannot write the converted policy into %s; loading %s directly, which parses it again on "
                   "every run (set MEDRWR_CACHE_DIR to a writable folder)", folder.parent, gguf)
    return False


def load_gguf_directly(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) parsed from the GGUF file itself: the slow path, for a cache that cannot be written."""
    from medrwr._imports import require

    require("gguf", "models", "loading GGUF checkpoints")
    from transformers import AutoModelForCausalLM

    from medrwr.rollout.backends.processing import load_tokenizer

    with quiet_transformers(logging.ERROR):
        tok = load_tokenizer(str(gguf.parent), gguf_file=gguf.name)
        return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name), tok


def into_own_memory(model: Any) -> None:
    """Copy parameters and buffers out of the safetensors memory map into freshly allocated tensors.

    safetensors maps the file, so tensors start at unaligned offsets and CPU BLAS then takes other kernels:
    log-probabilities differed by ~4e-6 from the GGUF-loaded model (whose tensors are fresh allocations).
    Copying (~0.2 s for SmolLM2) makes the converted policy match the GGUF one bit for bit. Ties survive
    (a shared parameter is one object).
    """
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.clone()


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def check_hub_id(model_id: str, timeout: float = 10.0) -> None:
    """Fail fast and once when a hub id cannot be loaded, before transformers retries for half a minute.

    A model in the local Hugging Face cache passes (transformers reads it offline too). Otherwise, with
    ``HF_HUB_OFFLINE`` set, or when one request to the Hub (no retries) fails to connect, raise
    :class:`~medrwr.errors.HubUnreachable` naming the id and saying to pass a local path.
    """
    import httpx  # huggingface_hub's HTTP client
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    from medrwr.errors import HubUnreachable

    local_hint = "pass a local checkpoint folder or .gguf file instead (--model PATH)"
    try:
        cached = huggingface_hub.try_to_load_from_cache(model_id, "config.json")
    except HFValidationError:
        raise BackendError(
            f"{model_id!r} is neither an existing local path nor a valid hub id (ORG/NAME); {local_hint}"
        ) from None
    if isinstance(cached, str):
        return
    if _hub_offline():
        raise HubUnreachable(
            f"cannot load the policy {model_id!r}: HF_HUB_OFFLINE is set and it is not in the local Hugging Face "
            f"cache; {local_hint}, or unset HF_HUB_OFFLINE to download it",
            model_id,
        )
    try:
        huggingface_hub.HfApi().model_info(model_id, timeout=timeout)
    except GatedRepoError:
        return  # transformers says how to get access
    except RepositoryNotFoundError:
        raise BackendError(
            f"no model {model_id!r} on the Hugging Face Hub (or it is private: log in with `hf auth login`); "
            f"check the id, or {local_hint}"
        ) from None
    except (OSError, httpx.HTTPError) as exc:  # no connection, a timeout, a 5xx: one message, no retries
        raise HubUnreachable(_hub_failure(model_id, exc, local_hint), model_id) from None


def _hub_failure(model_id: str, exc: BaseException, local_hint: str) -> str:
    reason = str(exc).strip().rstrip(".") or type(exc).__name__
    return (f"cannot reach the Hugging Face Hub to load the policy {model_id!r} ({reason}); {local_hint}, "
            "or set HF_HUB_OFFLINE=1 to use only models already in the local cache")
