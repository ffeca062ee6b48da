"""The package's shape, checked: imports point down the layer chain, no cycles, short modules, no probing.

Every ``import`` / ``from … import`` in ``medrwr/`` counts, including those inside functions (lazy
imports are still dependencies). See docs/architecture.md for the chain.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import medrwr

ROOT = Path(medrwr.__file__).parent

# Lower number = lower layer. A module may import its own layer or any lower one, never a higher one.
# The most specific prefix wins ("medrwr.retrieval.open" before "medrwr.retrieval").
LAYERS: dict[str, int] = {
    "medrwr.errors": 0,
    "medrwr._imports": 0,
    "medrwr._io": 0,
    "medrwr.config": 1,
    "medrwr.protocol": 1,
    "medrwr.assets": 1,
    "medrwr.vocab": 2,
    "medrwr.retrieval": 3,
    "medrwr.kb": 4,
    "medrwr.retrieval.open": 5,
    "medrwr.retrieval.service": 5,
    "medrwr.rollout": 6,
    "medrwr.rewards": 7,
    "medrwr.train": 8,
    "medrwr.eval": 8,
    "medrwr.serve": 8,
    "medrwr.data": 8,
    "medrwr.cli": 9,
    "medrwr": 9,  # the package root re-exports the protocol only; checked in test_package
    "medrwr.testing": 10,  # may import anything; nothing in the library imports it
}

MAX_LINES = 500
LONG_MODULE_REASON = re.compile(r"long module:", re.IGNORECASE)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every medrwr module that ``name`` imports (relative imports resolved), lazily or not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m == "medrwr" or m.startswith("medrwr.")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        graph[name] = {m for m in _imports(name, path) if m in mods and m != name}
    return graph


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def test_every_module_has_a_layer():
    for name in _modules():
        assert any(name == p or name.startswith(p + ".") for p in LAYERS), f"{name} has no layer in LAYERS"


def test_imports_never_point_up_a_layer():
    upward = [
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, dsts in _graph().items()
        for dst in sorted(dsts)
        if _layer(dst) > _layer(src) and not dst == "medrwr"
    ]
    assert not upward, "imports that point up the layer chain:\n" + "\n".join(upward)


def test_library_never_imports_testing():
    bad = [src for src, dsts in _graph().items()
           if not src.startswith("medrwr.testing") and any(d.startswith("medrwr.testing") for d in dsts)]
    assert not bad, f"library modules import medrwr.testing: {bad}"


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package and its own __init__ re-exports are not a design cycle
            real = [m for m in comp if not any(o != m and o.startswith(m + ".") for o in comp)]
            if len(comp) > 1 and len(real) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_walker_sees_lazy_and_relative_imports(tmp_path):
    """The walker must see function-level and relative imports, or the tests above prove nothing."""
    f = tmp_path / "mod.py"
    f.write_text("def f():\n    from medrwr.kb import default\n    from ..index import hybrid\n", encoding="utf-8")
    found = _imports("medrwr.retrieval.service.mod", f)
    assert {"medrwr.kb.default", "medrwr.retrieval.index.hybrid"} <= found


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_are_short_or_say_why(name):
    path = _modules()[name]
    lines = path.read_text(encoding="utf-8").count("\n")
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert LONG_MODULE_REASON.search(doc), (
        f"{path.relative_to(ROOT.parent)} has {lines} lines (> {MAX_LINES}); split it or state the reason "
        "in its docstring ('Long module: …')"
    )


def test_no_attribute_probing_of_retrievers():
    """Callers use the Retriever contract; nobody guesses what a retriever has."""
    probe = re.compile(r"(getattr|hasattr)\(\s*(self\.)?_?(retriever|image_retriever)\b")
    hits = [
        f"{p.relative_to(ROOT.parent)}:{i}"
        for p in ROOT.rglob("*.py")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if probe.search(line)
    ]
    assert not hits, f"attribute probing of retrievers: {hits}"
