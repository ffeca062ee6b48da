"""Optional-dependency checks: find a backend once, fail only when it is chosen, name the extra."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from medrwr.errors import MissingExtraError


def is_available(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise `MissingExtraError` saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" for {purpose}" if purpose else ""
        raise MissingExtraError(
            f"'{module}' is needed{what} but is not installed. "
            f"Install it with: pip install 'medrwr[{extra}]'"
        ) from exc
