"""``medrwr kb from-explanations``: a knowledge base from the explanations of MCQ datasets (the paper's ExpKB).

1. read every row's explanation (``explanation``, MedMCQA's ``exp``, or ``--column``) from JSONL/JSON/CSV/TSV/
   parquet files (:func:`medrwr.retrieval.index.corpus.iter_records`);
2. split it into self-contained statements (:func:`split_statements`): sentences, a sentence that starts by
   pointing back ("This", "It", "These"...) joined to the one before, answer-key talk ("Ans. is 'a'", "option B",
   "Ref: ...") dropped, statements of ``data.kb_min_words`` .. ``data.kb_max_words`` words;
3. drop near-duplicates with MinHash LSH (datasketch; word 3-shingles, Jaccard >= ``data.kb_dedup_threshold``),
   or, where datasketch is not installed (``data.kb_dedup: auto``) or ``embedding`` is asked, by cosine
   >= ``data.kb_dedup_cosine`` of ``retrieval.encoder`` embeddings (FAISS range search); either way the first
   statement of a group is kept, so the result depends on nothing but the input order;
4. tag each passage with its dataset and row id (``doc_id = dataset:row:k``; metadata ``dataset``, ``item_id``) and
   build a retrieval index with the normal builder (:func:`medrwr.retrieval.index.hybrid.build_index`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medrwr.config import DataConfig
from medrwr.errors import SynthesisError

logger = logging.getLogger(__name__)

__all__ = ["KBResult", "Statement", "build_explanation_kb", "dedup", "dedup_embedding", "iter_explanations",
           "split_statements"]

_ABBREV = "".join(rf"(?<!\b{a}\.)" for a in (r"e\.g", r"i\.e", "vs", "etc", "Dr", "Mr", "Mrs", "approx", "Fig", "No",
                                              "St", "viz", "cf"))
_SENT = re.compile(_ABBREV + r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_BACKREF = re.compile(r"^(this|it|its|these|those|they|their|such|he|she|here|thus|hence|therefore|also|so)\b",
                      re.I)
_ANSWER_TALK = re.compile(
    r"\b(ans(wer)?\s*(is|:|-|\.)|options?\s*\(?[a-d]\b|\([a-d]\)|correct (answer|option)|ref(erence)?\s*[:\-.]|"
    r"\bpage\s*\d|\bpg\.?\s*\d|\bed(ition)?\s*[,.]?\s*\d|\d+(st|nd|rd|th)\s*ed\b)", re.I)
_SPACE = re.compile(r"\s+")


@dataclass
class Statement:
    """One knowledge passage: its text and where it came from."""

    doc_id: str
    text: str
    dataset: str
    item_id: str


@dataclass
class KBResult:
    """Counts of the build (rows read, with an explanation, statements, duplicates dropped) and the paths."""

    rows: int = 0
    explanations: int = 0
    statements: int = 0
    near_duplicates: int = 0
    passages: int = 0
    per_dataset: dict[str, int] = field(default_factory=dict)
    dedup: str = ""
    index: Path | None = None
    passages_file: Path | None = None


def split_statements(text: str, min_words: int = 5, max_words: int = 80) -> list[str]:
    """Self-contained statements of one explanation (see the module docstring).

    >>> split_statements("Ans. is 'b' i.e., Iron. Iron deficiency causes microcytic anaemia. It is the most "
    ...                  "common anaemia worldwide. Ref: Harrison 19th ed, p. 625")
    ['Iron deficiency causes microcytic anaemia. It is the most common anaemia worldwide.']
    """
    text = _SPACE.sub(" ", str(text or "")).strip()
    if not text:
        return []
    out: list[str] = []
    for sent in _SENT.split(text):
        sent = sent.strip()
        if not sent or _ANSWER_TALK.search(sent):
            continue
        words = len(sent.split())
        if out and _BACKREF.match(sent) and len(out[-1].split()) + words <= max_words:
            out[-1] = f"{out[-1]} {sent}"
        elif _BACKREF.match(sent):
            continue  # points back to a dropped sentence: not self-contained
        else:
            out.append(sent)
    return [s for s in out if min_words <= len(s.split()) <= max_words]


def _shingles(text: str, n: int = 3) -> set[str]:
    words = re.findall(r"\w+", text.casefold())
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def dedup_embedding(statements: Sequence[Statement], encoder: Any, cosine: float = 0.95,
                    ) -> tuple[list[Statement], int]:
    """Near-duplicates by embedding: a statement whose cosine with an earlier *kept* one is >= ``cosine`` is dropped
    (the fallback when datasketch is not installed; ``encoder`` is any text encoder, e.g. the packaged MiniLM)."""
    import faiss

    if not statements:
        return [], 0
    x = np.ascontiguousarray(encoder.encode([s.text for s in statements]), dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x, float(cosine))
    kept_mask = np.zeros(len(statements), dtype=bool)
    for i in range(len(statements)):
        near = ids[lims[i]:lims[i + 1]]
        kept_mask[i] = not bool(np.any(kept_mask[near[near < i]]))
    kept = [s for s, k in zip(statements, kept_mask) if k]
    return kept, len(statements) - len(kept)


def dedup(statements: Sequence[Statement], threshold: float = 0.8, num_perm: int = 128) -> tuple[list[Statement], int]:
    """Statements without near-duplicates (the first of each group is kept) and how many were dropped: MinHash
    LSH over word 3-shingles (datasketch); an LSH candidate counts when its estimated Jaccard is >= ``threshold``.
    (No doctest: datasketch is an optional extra; tests/data/test_kb.py has the examples.)"""
    from medrwr._imports import require

    datasketch = require("datasketch", "data", "near-duplicate removal (MinHash LSH)")
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm) if threshold < 1.0 else None
    hashes: dict[str, Any] = {}
    kept: list[Statement] = []
    exact: set[str] = set()
    dropped = 0
    for st in statements:
        norm = " ".join(re.findall(r"\w+", st.text.casefold()))
        if norm in exact:
            dropped += 1
            continue
        exact.add(norm)
        if lsh is None:  # threshold 1: exact copies only
            kept.append(st)
            continue
        mh = datasketch.MinHash(num_perm=num_perm, seed=1)
        for sh in sorted(_shingles(st.text)):
            mh.update(sh.encode("utf-8"))
        # LSH gives candidates; the MinHash estimate of the Jaccard similarity decides
        if any(mh.jaccard(hashes[c]) >= threshold for c in lsh.query(mh)):
            dropped += 1
            continue
        lsh.insert(st.doc_id, mh)
        hashes[st.doc_id] = mh
        kept.append(st)
    return kept, dropped


def iter_explanations(path: str | Path, column: str | None = None, dataset: str | None = None,
                      ) -> Iterator[tuple[str, str, str]]:
    """``(dataset, row id, explanation)`` for each row of ``path`` with a non-empty explanation."""
    from medrwr.retrieval.index.corpus import iter_records

    p = Path(path)
    if not p.is_file():
        raise SynthesisError(f"--data {p} does not exist (a JSONL/JSON/CSV/TSV/parquet MCQ file)")
    name = dataset or p.name.split(".")[0]
    cols = (column,) if column else ("explanation", "exp")
    for row, rec in iter_records(p):
        text = next((rec[c] for c in cols if isinstance(rec.get(c), str) and rec[c].strip()), None)
        if text is not None:
            rid = rec.get("id", rec.get("_id", row))
            yield name, str(rid), text


def build_explanation_kb(files: Iterable[str | Path], out: str | Path, cfg: Any, *, column: str | None = None,
                         dense: bool | None = None, show_progress: bool = True) -> KBResult:
    """Write ``out/passages.jsonl`` and the index ``out/index``; ``dense=None`` follows ``retrieval.dense``."""
    from medrwr.data.journal import write_jsonl_atomic
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index

    d: DataConfig = cfg.data
    files = [Path(f) for f in files]
    if not files:
        raise SynthesisError("give at least one --data FILE")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SynthesisError(f"--data file(s) not found: {', '.join(missing)}")
    res = KBResult()
    statements: list[Statement] = []
    seen_rows: set[tuple[str, str]] = set()
    for f in files:
        for name, rid, text in iter_explanations(f, column):
            res.explanations += 1
            if (name, rid) in seen_rows:
                rid = f"{rid}@{res.explanations}"
            seen_rows.add((name, rid))
            for k, s in enumerate(split_statements(text, d.kb_min_words, d.kb_max_words)):
                statements.append(Statement(f"{name}:{rid}:{k}", s, name, rid))
    res.statements = len(statements)
    if not statements:
        raise SynthesisError("no explanation yielded a statement: the files need an 'explanation' or 'exp' "
                             "column (or name one with --column)")
    from medrwr._imports import is_available

    method = d.kb_dedup if d.kb_dedup != "auto" else ("minhash" if is_available("datasketch") else "embedding")
    if method == "minhash":
        kept, res.near_duplicates = dedup(statements, d.kb_dedup_threshold, d.kb_num_perm)
    else:
        from medrwr.retrieval.encoders.text import load_text_encoder

        enc = load_text_encoder(cfg.retrieval.encoder, device=cfg.retrieval.device)
        kept, res.near_duplicates = dedup_embedding(statements, enc, d.kb_dedup_cosine)
    res.dedup = method
    res.passages = len(kept)
    for st in kept:
        res.per_dataset[st.dataset] = res.per_dataset.get(st.dataset, 0) + 1
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    res.passages_file = outp / "passages.jsonl"
    write_jsonl_atomic(res.passages_file, ({"id": s.doc_id, "title": "", "text": s.text, "dataset": s.dataset,
                                            "item_id": s.item_id} for s in kept))
    docs = (Document(s.doc_id, "", s.text, source=s.dataset, metadata={"dataset": s.dataset, "item_id": s.item_id})
            for s in kept)
    use_dense = cfg.retrieval.dense if dense is None else dense
    res.index = build_index(docs, outp / "index", config=cfg.retrieval, dense=use_dense,
                            extra_manifest={"explanation_kb": {
                                "files": [str(f) for f in files], "explanations": res.explanations,
                                "statements": res.statements, "near_duplicates": res.near_duplicates,
                                "dedup": res.dedup, "dedup_threshold": d.kb_dedup_threshold if res.dedup == "minhash"
                                else d.kb_dedup_cosine, "per_dataset": res.per_dataset}},
                            show_progress=show_progress)
    return res
