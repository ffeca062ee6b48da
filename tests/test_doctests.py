"""Every docstring example in ``medrwr/`` runs: the modules are found by walking the package, not listed by hand."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import medrwr


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(medrwr.__path__, "medrwr."):
        module = importlib.import_module(info.name)  # heavy extras are imported lazily, so this is cheap
        finder = doctest.DocTestFinder(exclude_empty=True)
        if any(t.examples for t in finder.find(module, module=module)):
            names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_examples_are_found():
    # Guards the walker itself: these modules are known to carry examples.
    assert {"medrwr.protocol", "medrwr.config"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
