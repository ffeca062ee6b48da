"""Retrieval quality on labelled sets that look like use: lay queries, clinical descriptions, synonyms, questions.

Run ``python benchmarks/retrieval_quality.py`` (full: ~10 min on 2 cores) or ``--quick``. It builds the
labelled sets reproducibly (seeded; train/dev/test split by a hash of the target concept id), builds the
evaluation KBs, and prints hit@1, hit@5, recall@10 and MRR@10 per set, split and mode. Results go to
``benchmarks/results/retrieval_quality.json``. ``benchmarks/retrieval.py --quality`` runs it too.

Sets (targets are source concept ids; a hit counts when its passage covers the target concept -- its
``source_ids`` metadata, or its doc id -- or a concept of another source with the same normalised name):

- ``lay``: HPO layperson synonyms ("Enlarged thyroid gland in neck" -> HP:0000853); the KB keeps them.
- ``definition``: the query is an HPO definition, the target its concept; the definition is *held out*
  of the evaluation KB, so the text must be matched by meaning.
- ``synonym``: a held-out HPO / MeSH synonym differing in content words from the name (as in
  benchmarks/retrieval.py).
- ``clinical``: the hand-written questions of ``benchmarks/data/clinical_questions.json``.
- ``clinical_dev``: 80 development questions by a third author (``benchmarks/data/clinical_questions_dev.json``:
  vignettes, lay descriptions, findings, drugs), concepts disjoint from the test questions; dev only, for tuning.
- ``clinical_heldout``: 80 questions by a second author (``benchmarks/data/clinical_questions_heldout.json``),
  written without seeing the knowledge base's texts; all test, never used for tuning.
- ``exact``: 500 concept names (125 per source); the question is whether the concept comes first.

Baseline in the same run: the per-source KB (one passage per source record, equal-weight RRF, as
default-kb-v2 shipped) against the concept-merged KB with dev-tuned fusion. Weights are tuned on the
dev splits only (``--tune``) and printed; the KB ships the chosen ones (medrwr/kb/default.py FUSION).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic

import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data" / "clinical_questions.json"
HELDOUT = ROOT / "data" / "clinical_questions_heldout.json"
DEV = ROOT / "data" / "clinical_questions_dev.json"
RESULTS = ROOT / "results" / "retrieval_quality.json"
MODES = ("bm25", "dense", "hybrid")
SPLITS = ("train", "dev", "test")


def split_of(key: str) -> str:
    """train 60% / dev 20% / test 20% by a stable hash of the concept id."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10
    return "train" if h < 6 else ("dev" if h < 8 else "test")


@dataclasses.dataclass
class Item:
    query: str
    targets: list[str]
    split: str


# ------------------------------------------------------------------------------------------ sets


def build_sets(n: int, seed: int = 0) -> tuple[dict[str, list[Item]], dict[str, dict[str, Any]]]:
    """The labelled sets and the held-out edits they need: ``{concept_id: {"synonyms": [...], "definition": bool}}``."""
    from medrwr.vocab.passages import name_key
    from medrwr.vocab.sources import concepts

    rng = random.Random(seed)
    hpo = [c for c in concepts("HPO") if not c.stub]
    mesh = [c for c in concepts("MeSH") if not c.stub]
    used: set[str] = set()
    holdout: dict[str, dict[str, Any]] = {}

    def differs(name: str, s: str) -> bool:
        nk, sk = set(name_key(name)), set(name_key(s))
        return len(s) >= 4 and bool(sk) and bool(sk - nk) and s.lower() != name.lower()

    # definition: held out of the KB
    pool = [c for c in hpo if len(c.definition.split()) >= 5]
    defs = []
    for c in rng.sample(pool, min(n, len(pool))):
        defs.append(Item(c.definition, [c.id], split_of(c.id)))
        holdout[c.id] = {"synonyms": [], "definition": True}
        used.add(c.id)
    # held-out synonyms, half HPO half MeSH
    syns = []
    for group in (hpo, mesh):
        pool = [(c, [s for s in c.synonym_texts if differs(c.name, s)]) for c in group if c.id not in used]
        pool = [(c, s) for c, s in pool if s]
        for c, cands in rng.sample(pool, min(n // 2, len(pool))):
            q = rng.choice(cands)
            syns.append(Item(q, [c.id], split_of(c.id)))
            holdout[c.id] = {"synonyms": [q], "definition": False}
            used.add(c.id)
    # lay queries: kept in the KB
    pool = [(c, [s.text for s in c.synonyms if s.kind == "layperson" and differs(c.name, s.text)])
            for c in hpo if c.id not in used]
    pool = [(c, s) for c, s in pool if s]
    lay = [Item(rng.choice(s), [c.id], split_of(c.id)) for c, s in rng.sample(pool, min(n, len(pool)))]
    # exact names: 125 per source
    exact = []
    for src in ("HPO", "MeSH", "ICD-10-CM", "drug-NER"):
        pool = [c for c in concepts(src) if not c.stub and c.id not in used]
        exact += [Item(c.name, [c.id], split_of(c.id)) for c in rng.sample(pool, 125)]
    questions = json.loads(DATA.read_text())["questions"]
    # a small set: split 60/20/20 by rank of the hash of the first expected concept (not by bucket)
    order = sorted(range(len(questions)), key=lambda i: hashlib.sha1(questions[i]["expected"][0].encode()).hexdigest())
    rank = {i: r / len(questions) for r, i in enumerate(order)}
    clinical = [Item(q["query"], list(q["expected"]),
                     "train" if rank[i] < 0.6 else ("dev" if rank[i] < 0.8 else "test"))
                for i, q in enumerate(questions)]
    # a second author's questions, written without seeing the KB's texts: test only, never tuned on
    heldout = [Item(q["query"], list(q["expected"]), "test") for q in json.loads(HELDOUT.read_text())["questions"]]
    # a third author's questions, concepts disjoint from the test questions: dev only, for tuning
    dev = [Item(q["query"], list(q["expected"]), "dev") for q in json.loads(DEV.read_text())["questions"]]
    sets = {"lay": lay, "definition": defs, "synonym": syns, "clinical": clinical, "clinical_dev": dev,
            "clinical_heldout": heldout, "exact": exact}
    return sets, holdout


def per_source_docs(holdout: dict[str, dict[str, Any]]):
    """The per-source KB (default-kb-v2's passages) with the held-out edits applied: the baseline."""
    from medrwr.kb.default import iter_default_kb_documents
    from medrwr.retrieval.index.corpus import Document
    from medrwr.vocab.passages import passage
    from medrwr.vocab.sources import iter_concepts

    by_id = {c.id: c for c in iter_concepts() if c.id in holdout and not c.stub}
    for d in iter_default_kb_documents(merge=False):
        c = by_id.get(d.doc_id)
        if c is None:
            yield d
            continue
        h = holdout[c.id]
        c2 = dataclasses.replace(c, definition="") if h["definition"] else c
        yield Document(d.doc_id, d.title, passage(c2, drop_synonyms=h["synonyms"]), d.source, d.metadata)


def merged_docs(holdout: dict[str, dict[str, Any]], **variant: bool):
    from medrwr.retrieval.index.corpus import Document
    from medrwr.vocab.merge import merged_passages

    if not variant:
        from medrwr.kb.default import iter_default_kb_documents

        return iter_default_kb_documents(holdout=holdout)
    return (Document(p.id, p.title, p.text, p.source, p.metadata) for p in merged_passages(None, holdout, **variant))


# ------------------------------------------------------------------------------------------ scoring


class Judge:
    """Which concepts a doc covers, and which concepts count for a target (same normalised name)."""

    def __init__(self, docs: list[Any]):
        from medrwr.vocab.passages import name_key
        from medrwr.vocab.sources import iter_concepts

        self.covers: dict[str, frozenset[str]] = {}
        for d in docs:
            ids = d.metadata.get("source_ids") if d.metadata else None
            self.covers[d.doc_id] = frozenset(ids or [d.doc_id.split("#", 1)[0]])
        self.key: dict[str, tuple] = {}
        by_key: dict[tuple, set[str]] = {}
        for c in iter_concepts():
            k = name_key(c.name)
            self.key[c.id] = k
            by_key.setdefault(k, set()).add(c.id)
        self.by_key = by_key

    def relevant(self, targets: list[str]) -> set[str]:
        out = set(targets)
        for t in targets:
            out |= self.by_key.get(self.key.get(t, ()), set())
        return out

    def ranks(self, items: list[Item], hits: list[list[str]]) -> list[int | None]:
        out = []
        for it, ids in zip(items, hits):
            rel = self.relevant(it.targets)
            out.append(next((r for r, d in enumerate(ids, 1) if self.covers.get(d, frozenset()) & rel), None))
        return out

    def dup_rate(self, hits: list[list[str]]) -> float:
        """Share of queries whose top 10 holds two passages of one concept (same id or same normalised name)."""
        bad = 0
        for ids in hits:
            keys = [frozenset(self.key.get(c, c) for c in self.covers.get(d, frozenset())) for d in ids]
            seen: set = set()
            dup = False
            for k in keys:
                if seen & k:
                    dup = True
                seen |= k
            bad += dup
        return bad / max(1, len(hits))


def metrics(ranks: list[int | None]) -> dict[str, float]:
    r = [x if x is not None else 10**9 for x in ranks]
    n = max(1, len(r))
    return {"n": len(r), "hit@1": sum(x <= 1 for x in r) / n, "hit@5": sum(x <= 5 for x in r) / n,
            "recall@10": sum(x <= 10 for x in r) / n, "mrr": sum(1 / x for x in r if x <= 10) / n}


def fuse(L: dict[str, list[list[str]]], i: int, w: dict[str, float]) -> list[str]:
    """The retriever's fusion, replayed on doc-id lists (the KB's doc ids are unique)."""
    from medrwr.retrieval.index.hybrid import rrf_fuse

    parts = ("bm25", "dense", "names", "name_bm25", "clinical", "name_dense")
    return [x for x, _ in rrf_fuse([L[p][i] for p in parts], [w.get(p, 0.0) for p in parts], w["rrf_k"])][:10]


def tune(judge: Judge, sets: dict[str, list[Item]], lists: dict[str, dict[str, list[list[str]]]]) -> dict[str, Any]:
    """Grid over rrf_k and the weights (bm25 = 1) on the dev splits: the mean dev MRR over the sets."""
    parts = {}
    for name, items in sets.items():
        idx = [i for i, it in enumerate(items) if it.split == "dev"]
        if not idx:  # a test-only set (clinical_heldout) plays no part in tuning
            continue
        dev = [items[i] for i in idx]
        parts[name] = {m: metrics(judge.ranks(dev, [lists[name][m][i][:10] for i in idx])) for m in ("bm25", "dense")}
    grid = []
    import itertools

    for k, wd, wn, wnb, wc, wx in itertools.product((2, 5), (0.3, 0.5, 1.0), (2.0, 4.0), (0.5, 1.0),
                                                    (0.0, 1.0, 2.0, 3.0), (0.0, 0.5, 1.0, 2.0)):
        w = {"rrf_k": k, "bm25": 1.0, "dense": wd, "names": wn, "name_bm25": wnb, "clinical": wc, "name_dense": wx}
        score, ok = [], True
        for name, items in sets.items():
            idx = [i for i, it in enumerate(items) if it.split == "dev"]
            if not idx:
                continue
            m = metrics(judge.ranks([items[i] for i in idx], [fuse(lists[name], i, w) for i in idx]))
            score.append(m["mrr"])
            ok &= all(m[x] >= max(parts[name]["bm25"][x], parts[name]["dense"][x]) for x in ("hit@5", "mrr"))
        grid.append({"rrf_k": k, "bm25_weight": 1.0, "dense_weight": wd, "name_weight": wn, "name_bm25_weight": wnb,
                     "clinical_weight": wc, "name_dense_weight": wx, "dev_mrr": float(np.mean(score)), "ge_parts_on_dev": ok})
    # the best mean dev MRR among the settings that beat both parts on every dev set (else overall)
    best = max(grid, key=lambda g: (g["ge_parts_on_dev"], g["dev_mrr"]))
    test = {}  # reported, never used to choose
    for name, items in sets.items():
        idx = [i for i, it in enumerate(items) if it.split == ("test" if name != "exact" else it.split)]
        L = lists[name]
        w = {"rrf_k": best["rrf_k"], "bm25": 1.0, "dense": best["dense_weight"], "names": best["name_weight"],
             "name_bm25": best["name_bm25_weight"], "clinical": best["clinical_weight"],
             "name_dense": best["name_dense_weight"]}
        fused = [fuse(L, i, w) for i in idx]
        test[name] = {"hybrid": metrics(judge.ranks([items[i] for i in idx], fused)),
                      **{m: metrics(judge.ranks([items[i] for i in idx], [L[m][i][:10] for i in idx]))
                         for m in ("bm25", "dense")}}
    return {"best": best, "test_with_best": test, "grid": grid}


# ------------------------------------------------------------------------------------------ running


def build(docs_iter, out: Path, fusion: dict[str, Any] | None) -> tuple[list[Any], float]:
    from medrwr.config import RetrievalConfig
    from medrwr.retrieval.encoders.static import load_static_encoder
    from medrwr.retrieval.index.hybrid import build_index

    docs = list(docs_iter)
    cfg = RetrievalConfig(encoder="static-minilm", **(fusion or {}))
    t0 = time.perf_counter()
    build_index(iter(docs), out, config=cfg, encoder=load_static_encoder(progress=False), show_progress=False)
    return docs, time.perf_counter() - t0


def evaluate(path: Path, docs: list[Any], sets: dict[str, list[Item]], label: str) -> dict[str, Any]:
    from medrwr.retrieval.index.hybrid import HybridRetriever

    r = HybridRetriever.load(path, verify=False)  # searched with the fusion it was built with
    judge = Judge(docs)
    out: dict[str, Any] = {"label": label, "fusion": {k: getattr(r.config, k) for k in ("rrf_k", "bm25_weight", "dense_weight", "name_weight",
                                                                   "name_bm25_weight", "clinical_weight",
                                                                   "name_dense_weight")},
                           "sets": {}, "lists": {}}
    for name, items in sets.items():
        qs = [it.query for it in items]
        lists = {m: [[h.doc_id for h in hs] for hs in r.search(qs, k=50 if m != "hybrid" else 10, mode=m)]
                 for m in MODES}
        lists["names"] = [[r.get_document(row).doc_id for row in r.name_matches(q)] for q in qs]
        lists["name_bm25"] = [[r.get_document(row).doc_id for row in rows] for rows in r._name_bm25(qs, 50)]
        lists["clinical"] = [[r.get_document(row).doc_id for row in rows] for rows in r._clinical(qs, 50)]
        from medrwr.retrieval.encoders.text import encode_queries

        vecs = encode_queries(r.encoder, qs, batch_size=256)
        lists["name_dense"] = [[r.get_document(row).doc_id for row in rows] for rows in r._name_dense(vecs, 50)]
        out["lists"][name] = lists
        res: dict[str, Any] = {}
        for m in MODES:
            ranks = judge.ranks(items, [x[:10] for x in lists[m]])
            res[m] = {s: metrics([rk for rk, it in zip(ranks, items) if it.split == s]) for s in SPLITS}
            res[m]["all"] = metrics(ranks)
        res["dup_rate_hybrid"] = judge.dup_rate([x[:10] for x in lists["hybrid"]])
        out["sets"][name] = res
    out["judge"] = judge
    r.close()
    return out


def show_failures(res: dict[str, Any], sets: dict[str, list[Item]]) -> None:
    judge = res["judge"]
    for name, items in sets.items():
        hyb = res["lists"][name]["hybrid"]
        ranks = judge.ranks(items, hyb)
        for it, rk, ids in zip(items, ranks, hyb):
            if it.split in ("dev", "test") and (rk is None or rk > (1 if name == "exact" else 5)):
                print(f"MISS {name}/{it.split}: {it.query[:70]!r} -> {it.targets[:3]} got {ids[:3]} rank {rk}")


def table(result: dict[str, Any], split: str) -> str:
    lines = [f"\n## {result['label']} -- split {split}; fusion {result['fusion']}",
             "set        | n    | mode   | hit@1 | hit@5 | recall@10 | MRR   ",
             "-----------|------|--------|-------|-------|-----------|-------"]
    for name, res in result["sets"].items():
        sp = "all" if name == "exact" else split
        if not res["bm25"][sp]["n"]:  # clinical_dev has no test split, clinical_heldout no dev split
            continue
        for m in MODES:
            x = res[m][sp]
            lines.append(f"{name:<10} | {x['n']:<4} | {m:<6} | {x['hit@1']:.3f} | {x['hit@5']:.3f} | "
                         f"{x['recall@10']:.3f}     | {x['mrr']:.3f}")
        lines.append(f"{name:<10} |      | dup@10 | {res['dup_rate_hybrid']:.3f} (queries with two hits of one concept)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sets (about 4 minutes)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--kb", default="both", choices=("both", "per-source", "merged"))
    ap.add_argument("--variant", default="", help="ablation of the merged KB: nodiseases, noside")
    ap.add_argument("--bm25-b", type=float, default=None, help="override the merged KB's BM25 b (tuning)")
    ap.add_argument("--failures", action="store_true", help="print the test misses of the merged KB's hybrid mode")
    ap.add_argument("--tune", action="store_true", help="grid-search the fusion weights on the dev splits")
    ap.add_argument("--lists-out", default=None,
                    help="also write every part's ranked doc ids per query (JSON) for offline fusion studies")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    work = Path(args.workdir or tempfile.mkdtemp(prefix="medrwr-bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    sets, holdout = build_sets(400 if args.quick else 1500)
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                                          "torch_threads": 1},
                              "sets": {k: {"n": len(v), "examples": [dataclasses.asdict(i) for i in v[:3]]}
                                       for k, v in sets.items()},
                              "results": {}}
    print("sets:", {k: len(v) for k, v in sets.items()}, flush=True)
    runs = []
    if args.kb in ("both", "per-source"):
        runs.append(("per-source KB (default-kb-v2 passages), equal-weight RRF k=60", per_source_docs,
                     {"rrf_k": 60, "bm25_weight": 1.0, "dense_weight": 1.0, "name_weight": 0.0,
                      "name_bm25_weight": 0.0}, "per_source"))
    if args.kb in ("both", "merged"):
        from medrwr.kb.default import FUSION

        variant = {"diseases": "nodiseases" not in args.variant, "phenotype_side": "noside" not in args.variant}
        make = (lambda h: merged_docs(h, **variant)) if args.variant else merged_docs
        settings = dict(FUSION)
        if args.bm25_b is not None:
            settings["bm25_b"] = args.bm25_b
        runs.append((f"concept-merged KB {args.variant}, dev-tuned fusion", make, settings, "merged"))
    for label, make, fusion, key in runs:
        docs, secs = build(make(holdout), work / key, fusion)
        res = evaluate(work / key, docs, sets, f"{label} ({len(docs)} passages, eval build {secs:.0f} s)")
        if args.tune:
            for _ in (1,):
                t = tune(res["judge"], sets, res["lists"])
                res["tuning"] = t
                print(f"[{key}] dev-tuned fusion: {t['best']}", flush=True)
                for name, x in t["test_with_best"].items():
                    print(f"   test {name:<10} " + "  ".join(f"{m} hit@5 {x[m]['hit@5']:.3f} mrr {x[m]['mrr']:.3f}"
                                                         for m in ("bm25", "dense", "hybrid")), flush=True)
        for split in ("test", "dev"):
            print(table(res, split), flush=True)
        if args.failures:
            show_failures(res, sets)
        if args.lists_out:
            write_json_atomic(Path(args.lists_out).with_suffix(f".{key}.json"), res["lists"])
        res.pop("judge")
        res.pop("lists")
        res["passages"] = len(docs)
        res["eval_build_s"] = secs
        report["results"][key] = res
    if {"per_source", "merged"} <= report["results"].keys():
        ok = {}
        for name in sets:
            if name == "clinical_dev":  # dev only
                continue
            sp = "all" if name == "exact" else "test"
            x = report["results"]["merged"]["sets"][name]
            ok[name] = {"hybrid_ge_parts": x["hybrid"][sp]["hit@5"] >= max(x["bm25"][sp]["hit@5"], x["dense"][sp]["hit@5"])
                        and x["hybrid"][sp]["mrr"] >= max(x["bm25"][sp]["mrr"], x["dense"][sp]["mrr"]) - 1e-9,
                        "hit@5_vs_baseline": x["hybrid"][sp]["hit@5"]
                        / max(1e-9, report["results"]["per_source"]["sets"][name]["hybrid"][sp]["hit@5"])}
        report["acceptance"] = ok
        print("\nacceptance (test splits):", json.dumps(ok, indent=1))
    report["total_seconds"] = time.perf_counter() - t_start
    report["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    print(f"\nwrote {args.out} in {report['total_seconds']:.0f}s (load average {os.getloadavg()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
