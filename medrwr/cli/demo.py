"""``medrwr demo``: the web demo."""

from __future__ import annotations

from medrwr.cli._shared import _not_built


def demo() -> None:
    """Open the web demo (not available in this version)."""
    _not_built("demo", "open a web page showing the reasoning trace, the queries, the retrieved documents "
               "and images")
