"""Where the test artefacts are built: one folder per artefact, written atomically, keyed by a version string,
so a second build is a folder lookup and concurrent builds (xdist workers) cannot leave half a folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["BUILD_VERSION", "cache_dir"]

#: Bump when any built artefact changes; it keys the cache folders.
BUILD_VERSION = "1"

_COMPLETE = ".medrwr-complete"


def cache_dir() -> Path:
    """Where built test artefacts live: ``$MEDRWR_CACHE_DIR/testing`` or the user cache."""
    root = os.environ.get("MEDRWR_CACHE_DIR")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("medrwr")
    return Path(root) / "testing"


def _build_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder with `build(tmp)` and rename it into place; reuse it when already complete."""
    target = Path(target)
    if (target / _COMPLETE).is_file():
        return target
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file; pass a folder path")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and any(target.iterdir()) and not (target / _COMPLETE).is_file():
        raise FileExistsError(
            f"{target} exists, is not empty and was not built by medrwr.testing; pass an empty or new folder"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / _COMPLETE).write_text(BUILD_VERSION + "\n")
        with contextlib.suppress(FileNotFoundError, OSError):
            target.rmdir()  # an empty folder the caller made
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():  # not a concurrent build that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _default(path: str | os.PathLike | None, name: str) -> Path:
    """`path`, or a cache folder keyed by our build version and the transformers version that writes it."""
    if path is not None:
        return Path(path)
    from importlib.metadata import version

    return cache_dir() / f"{name}-v{BUILD_VERSION}-tf{version('transformers')}"
