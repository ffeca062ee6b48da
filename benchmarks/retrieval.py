"""Retrieval benchmark: build cost, throughput/latency, recall, and how cost grows with corpus size.

Run ``python benchmarks/retrieval.py --quick`` (about 3 minutes on 2 cores) or without ``--quick``
(the full run, about 15-25 minutes). Prints tables and writes ``benchmarks/results/retrieval.json``.

What it measures, and against what (baselines run in the same process/run):

1. **Default KB build** (full mode: cold, in a fresh cache, including the one-time static-encoder
   distillation) and **later start** (load the index and answer one hybrid query), each in a
   subprocess so the wall time and peak RSS (``ru_maxrss``) are the process's own.
2. **Recall@10 on a labeled set built from the KB** ("held-out synonym"): sample HPO phenotypes and
   MeSH diseases that have a synonym differing in content words from the concept name; the query is
   that synonym, and the concept's passage is rebuilt *without* it (and without its word-order /
   plural variants), so the query text does not appear verbatim in its target. Relevant = the
   target passage, plus passages of other sources whose title equals the target's name (the same
   concept, e.g. HPO and MeSH "Cardiomegaly"). Evaluated (a) on the full ~57k-passage KB with the
   targets swapped for their held-out versions (BM25, static dense, hybrid) and (b) on a subset
   (targets + random distractors) small enough to embed with the packaged MiniLM, to compare the
   static encoder with MiniLM.
3. **Throughput and latency** of ``HybridRetriever.search`` for batch sizes 1/32/256 in each mode,
   and the **naive baseline**: a per-query Python loop ``search([q])`` over the same index; ratio.
4. **Scaling** on synthetic corpora (passages of 30-70 words drawn from a Zipfian vocabulary of
   pseudo-words): BM25-only builds up to 1M passages, static-dense builds larger than MiniLM-dense
   builds (MiniLM is ~60-150 passages/s on 2 cores); build time and peak RSS per million passages
   are extrapolated linearly from the largest sizes and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "retrieval.json"


# ------------------------------------------------------------------------------------------ workers


def _peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM (ru_maxrss survives exec, so a child would report its parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _read_docs(path: str):
    from medrwr.retrieval.index.corpus import Document

    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            yield Document(d["id"], d.get("title", ""), d["text"], d.get("source", ""))


def worker(kind: str, job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a subprocess: one build or load, reporting its own wall time and peak RSS."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "build":
        from medrwr.config import RetrievalConfig
        from medrwr.retrieval.index.hybrid import build_index

        enc = job.get("encoder")
        cfg = RetrievalConfig(encoder=enc or "default", device="cpu", batch_size=job.get("batch_size", 64))
        encoder: Any = enc
        if enc == "static-minilm":
            from medrwr.retrieval.encoders.static import load_static_encoder

            encoder = load_static_encoder(progress=False)
        build_index(_read_docs(job["docs"]), job["out"], config=cfg, encoder=encoder, dense=bool(enc),
                    show_progress=False)
    elif kind == "kb":
        from medrwr.kb.default import ensure_default_index
        from medrwr.retrieval.encoders.static import load_static_encoder

        load_static_encoder(progress=False)
        out["static_table_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        ensure_default_index(progress=False)
        out["kb_s"] = time.perf_counter() - t1
    elif kind == "load":
        from medrwr.retrieval.index.hybrid import HybridRetriever

        r = HybridRetriever.load(job["index"])
        hits = r.search([job.get("query", "enlarged heart on chest x-ray")], k=3, mode="hybrid")
        out["top"] = [h.doc_id for h in hits[0]]
    else:
        raise SystemExit(f"unknown worker {kind}")
    out["seconds"] = time.perf_counter() - t0
    out["cpu_s"] = _cpu_s()
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def run_worker(kind: str, job: dict[str, Any], env: dict[str, str] | None = None, timeout: int = 1800) -> dict:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--job", json.dumps(job)],
                          capture_output=True, text=True, env=full_env, timeout=timeout, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


# ------------------------------------------------------------------------------------------ data


def write_docs(docs, path: Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text, "source": d.source}) + "\n")
            n += 1
    return n


def labeled_set(n_queries: int, seed: int = 0):
    """Held-out-synonym queries over HPO and MeSH (see the module docstring). Returns
    (queries, targets, heldout_docs) where heldout_docs maps doc_id -> the rebuilt passage."""
    from medrwr.retrieval.index.corpus import Document
    from medrwr.vocab.passages import name_key, passage
    from medrwr.vocab.sources import concepts

    rng = random.Random(seed)

    def eligible(name: str, syns: list[str]) -> list[str]:
        nk = set(name_key(name))
        out = []
        for s in syns:
            sk = set(name_key(s))
            if len(s) >= 4 and sk and sk != nk and (sk - nk) and s.lower() != name.lower():
                out.append(s)
        return out

    items = []
    for t in concepts("HPO"):
        c = eligible(t.name, t.synonym_texts)
        if c:
            items.append(("HPO", t, c))
    hpo_items = items
    mesh_items = []
    for d in concepts("MeSH"):
        c = eligible(d.name, d.synonym_texts)
        if c:
            mesh_items.append(("MeSH", d, c))
    half = n_queries // 2
    chosen = rng.sample(hpo_items, min(half, len(hpo_items))) + rng.sample(mesh_items, min(n_queries - half, len(mesh_items)))
    queries, targets, heldout = [], [], {}
    for src, concept, cands in chosen:
        q = rng.choice(cands)
        doc = Document(concept.id, concept.name, passage(concept, drop_synonyms=[q]), source=src)
        queries.append(q)
        targets.append(doc.doc_id)
        heldout[doc.doc_id] = doc
    return queries, targets, heldout


def _norm_title(t: str) -> tuple[str, ...]:
    from medrwr.vocab.passages import name_key

    return name_key(t)


def relevant_sets(targets: list[str], docs_by_id: dict[str, Any]) -> list[set[str]]:
    by_title: dict[tuple, set[str]] = {}
    for d in docs_by_id.values():
        by_title.setdefault(_norm_title(d.title), set()).add(d.doc_id)
    return [{t} | by_title.get(_norm_title(docs_by_id[t].title), set()) for t in targets]


def recall_at(retriever, queries, relevant, mode: str, k: int = 10) -> float:
    res = retriever.search(queries, k=k, mode=mode)
    return float(np.mean([bool(rel & {h.doc_id for h in hits}) for hits, rel in zip(res, relevant)]))


def synthetic_docs(n: int, seed: int = 0):
    """Passages of 30-70 words from a Zipfian (s=1.1) vocabulary of 30k syllable pseudo-words."""
    from medrwr.retrieval.index.corpus import Document

    rng = np.random.default_rng(seed)
    syl = ["ka", "ro", "mi", "tel", "sun", "va", "dor", "pel", "li", "no", "gra", "fen", "tu", "zo", "bri", "se"]
    vocab = np.array(["".join(rng.choice(syl, size=rng.integers(2, 5))) for _ in range(30_000)])
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    lengths = rng.integers(30, 71, size=n)
    words = rng.choice(len(vocab), size=int(lengths.sum()), p=p)
    pos = 0
    for i, L in enumerate(lengths):
        w = vocab[words[pos:pos + L]]
        pos += L
        yield Document(f"syn{i}", " ".join(w[:3]), " ".join(w), "synthetic")


def synthetic_queries(n: int, seed: int = 1) -> list[str]:
    docs = list(synthetic_docs(2000, seed=0))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choice(docs).text.split()
        out.append(" ".join(rng.sample(words, 5)))
    return out


# ------------------------------------------------------------------------------------------ timing


def throughput(retriever, queries: list[str], mode: str, batch: int, n_batches: int) -> dict[str, float]:
    lat = []
    total_q = 0
    t0 = time.perf_counter()
    for b in range(n_batches):
        qs = [queries[(b * batch + j) % len(queries)] for j in range(batch)]
        t = time.perf_counter()
        retriever.search(qs, k=10, mode=mode)
        lat.append(time.perf_counter() - t)
        total_q += batch
    total = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1000
    return {"batch": batch, "queries": total_q, "qps": total_q / total,
            "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99))}


def loop_baseline(retriever, queries: list[str], mode: str, n: int) -> float:
    """Naive baseline: one search([q]) call per query in a Python loop; returns queries/s."""
    qs = [queries[j % len(queries)] for j in range(n)]
    t = time.perf_counter()
    for q in qs:
        retriever.search([q], k=10, mode=mode)
    return n / (time.perf_counter() - t)


def fit_per_million(points: list[tuple[int, float]]) -> float | None:
    """Linear fit y = a + b*n over the points; returns a + b*1e6 (an extrapolation)."""
    if len(points) < 2:
        return None
    n = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    b, a = np.polyfit(n, y, 1)
    return float(a + b * 1e6)


# ------------------------------------------------------------------------------------------ main


def table(rows: list[dict], cols: list[str], title: str) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    w = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = [f"\n## {title}", " | ".join(c.ljust(w[c]) for c in cols), "-|-".join("-" * w[c] for c in cols)]
    lines += [" | ".join(fmt(r.get(c, "")).ljust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)



def _torch_threads() -> int | None:
    """torch's intra-op thread count in this process (printed and recorded with every benchmark), or None."""
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, about 3 minutes")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--quality", action="store_true",
                    help="run the labelled-set quality benchmark instead (benchmarks/retrieval_quality.py)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.quality:
        sys.path.insert(0, str(ROOT))
        import retrieval_quality

        return retrieval_quality.main(rest + (["--quick"] if args.quick else []))
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.job))))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quick = args.quick
    work = Path(args.workdir or tempfile.mkdtemp(prefix="medrwr-bench-retrieval-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    env = {"MEDRWR_CACHE_DIR": str(cache)}
    from medrwr.retrieval.encoders.static import STATIC_VERSION, default_static_dir

    user_table = default_static_dir()  # the caller's cache, before we point MEDRWR_CACHE_DIR at scratch
    table_cached = False
    if quick and (user_table / "config.json").is_file() and not (cache / "encoders" / STATIC_VERSION).exists():
        import shutil

        shutil.copytree(user_table, cache / "encoders" / STATIC_VERSION)  # quick: reuse the distilled table
        table_cached = True
    os.environ["MEDRWR_CACHE_DIR"] = str(cache)
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_at_start": os.getloadavg(), "torch_threads": _torch_threads()},
    }
    out_lines: list[str] = []

    def show(s: str) -> None:
        print(s, flush=True)
        out_lines.append(s)

    show(f"torch threads: {report['machine']['torch_threads']}")

    # 1. default KB: cold build (static table + KB) and later start -----------------------------------------
    kb = run_worker("kb", {}, env=env)
    from medrwr.kb.default import KB_VERSION

    load = run_worker("load", {"index": str(cache / "indexes" / KB_VERSION)}, env=env)
    report["default_kb"] = {
        "static_table_build_s": kb["static_table_s"], "static_table_was_cached": table_cached, "kb_build_s": kb["kb_s"],
        "first_use_total_s": kb["process_wall_s"], "first_use_cpu_s": kb["cpu_s"],
        "build_peak_rss_mb": kb["peak_rss_mb"],
        "later_start_s": load["process_wall_s"], "later_start_load_and_query_s": load["seconds"],
        "later_start_peak_rss_mb": load["peak_rss_mb"], "top3_enlarged_heart": load["top"],
    }
    show(table([report["default_kb"]], ["static_table_build_s", "kb_build_s", "first_use_total_s", "first_use_cpu_s",
                                        "build_peak_rss_mb", "later_start_s", "later_start_peak_rss_mb"],
               "Default KB: first use (one process; " + ("static table copied from your cache" if table_cached else "cold cache")
               + ") and later start (new process: load + 1 query)"))
    show(f"top-3 for 'enlarged heart on chest x-ray': {load['top']}")

    # 2. labeled set and recall ----------------------------------------------------------------------------
    from medrwr.kb.default import iter_default_kb_documents
    from medrwr.retrieval.index.hybrid import HybridRetriever

    n_q = 300 if quick else 1000
    queries, targets, heldout = labeled_set(n_q)
    # per-source passages: the held-out targets replace their own source record (concept merging is
    # measured by benchmarks/retrieval_quality.py)
    all_docs = {d.doc_id: d for d in iter_default_kb_documents(merge=False)}
    eval_docs = {**all_docs, **heldout}
    relevant = relevant_sets(targets, eval_docs)
    docs_path = work / "eval_kb.jsonl"
    write_docs(eval_docs.values(), docs_path)
    build_eval = run_worker("build", {"docs": str(docs_path), "out": str(work / "eval_kb"),
                                      "encoder": "static-minilm"}, env=env)
    full = HybridRetriever.load(work / "eval_kb")
    full.warmup()
    rec_full = {m: recall_at(full, queries, relevant, m) for m in ("bm25", "dense", "hybrid")}

    rng = random.Random(1)
    sub_n = 1000 if quick else 3000
    others = [i for i in eval_docs if i not in set(targets)]
    sub_ids = list(dict.fromkeys(targets + [x for r in relevant for x in r]))
    sub_ids += rng.sample(others, max(0, sub_n - len(sub_ids)))
    sub_path = work / "subset.jsonl"
    write_docs([eval_docs[i] for i in sub_ids], sub_path)
    builds = {}
    for enc in ("static-minilm", "default"):
        builds[enc] = run_worker("build", {"docs": str(sub_path), "out": str(work / f"subset-{enc}"),
                                           "encoder": enc}, env=env)
    sub = {enc: HybridRetriever.load(work / f"subset-{enc}") for enc in builds}
    for r in sub.values():
        r.warmup()
    rec_sub = {}
    for enc, r in sub.items():
        for m in ("bm25", "dense", "hybrid"):
            if m == "bm25" and enc != "static-minilm":
                continue
            rec_sub[f"{m}" if m == "bm25" else f"{m} ({'MiniLM' if enc == 'default' else 'static'})"] = \
                recall_at(r, queries, relevant, m)
    # encode speed: passages/s of each encoder on the same KB passages (in-process, after warm-up)
    from medrwr.retrieval.encoders.text import load_text_encoder

    sample = [f"{d.title}\n{d.text}" for d in list(eval_docs.values())[:: max(1, len(eval_docs) // 2000)][:2000]]
    speed = {}
    for enc_name in ("static-minilm", "default"):
        e = load_text_encoder(enc_name, device="cpu")
        e.encode(sample[:32])
        n = len(sample) if enc_name == "static-minilm" else (200 if quick else 500)
        t = time.perf_counter()
        e.encode(sample[:n], batch_size=64)
        speed[enc_name] = n / (time.perf_counter() - t)
    report["encoders"] = {
        "static_passages_per_s": speed["static-minilm"], "minilm_passages_per_s": speed["default"],
        "speedup": speed["static-minilm"] / speed["default"],
        "mean_words_per_passage": float(np.mean([len(s.split()) for s in sample])),
    }
    report["recall"] = {
        "construction": "held-out synonym (see module docstring); relevant = target + same-title passages",
        "n_queries": len(queries), "example_queries": list(zip(queries[:5], targets[:5])),
        "full_kb": {"n_docs": len(eval_docs), "recall@10": rec_full, "build_s": build_eval["seconds"],
                    "build_peak_rss_mb": build_eval["peak_rss_mb"]},
        "subset": {"n_docs": len(sub_ids), "recall@10": rec_sub,
                   "build_s": {k: v["seconds"] for k, v in builds.items()},
                   "build_peak_rss_mb": {k: v["peak_rss_mb"] for k, v in builds.items()}},
    }
    hyb_ok_full = rec_full["hybrid"] >= max(rec_full["bm25"], rec_full["dense"])
    report["acceptance_hybrid_recall"] = {
        "full_kb_static": hyb_ok_full,
        "subset_static": rec_sub["hybrid (static)"] >= max(rec_sub["bm25"], rec_sub["dense (static)"]),
        "subset_minilm": rec_sub["hybrid (MiniLM)"] >= max(rec_sub["bm25"], rec_sub["dense (MiniLM)"]),
    }
    show(table([{"corpus": f"full KB ({len(eval_docs)})", **rec_full}], ["corpus", "bm25", "dense", "hybrid"],
               f"Recall@10, {len(queries)} held-out-synonym queries, static encoder (hybrid >= max: {hyb_ok_full})"))
    show(table([{"setting": k, "recall@10": v} for k, v in rec_sub.items()], ["setting", "recall@10"],
               f"Recall@10 on a {len(sub_ids)}-passage subset (targets + random distractors)"))
    show(table([report["encoders"]], list(report["encoders"]), "Encode speed on KB passages (2 cores)"))

    # 3. throughput / latency, batched vs per-query loop ---------------------------------------------------
    qpool = queries * 2
    tp_rows = []
    for label, r, scale in (("default KB, static", full, 1.0), (f"subset {len(sub_ids)}, MiniLM", sub["default"], 0.25)):
        for m in ("bm25", "dense", "hybrid"):
            s_ = scale if m != "bm25" else 1.0
            for _ in range(3):  # warm-up: first calls after another library's threads ran are slow
                r.search(qpool[:32], k=10, mode=m)
            for b, nb in ((1, 50 if quick else 200), (32, 4 if quick else 16), (256, 2 if quick else 4)):
                row = throughput(r, qpool, m, b, max(1 if b > 1 else 10, int(nb * s_)))
                tp_rows.append({"index": label, "mode": m, **row})
            base = loop_baseline(r, qpool, m, 256)
            tp_rows.append({"index": label, "mode": m, "batch": "loop", "qps": base})
            b256 = next(x for x in tp_rows if x["index"] == label and x["mode"] == m and x["batch"] == 256)
            b256["speedup_vs_loop"] = b256["qps"] / base
    report["throughput"] = tp_rows
    show(table(tp_rows, ["index", "mode", "batch", "qps", "p50_ms", "p99_ms", "speedup_vs_loop"],
               "Search throughput (k=10); 'loop' = naive per-query search([q]) baseline"))
    hyb = [x for x in tp_rows if x["mode"] == "hybrid" and x["batch"] == 256]
    report["acceptance_batched_10x"] = {x["index"]: x["speedup_vs_loop"] >= 10 for x in hyb}

    # 4. scaling on synthetic corpora ----------------------------------------------------------------------
    if quick:
        plan = [("bm25", None, [10_000, 50_000]), ("static", "static-minilm", [10_000, 30_000]),
                ("minilm", "default", [200, 400])]
    else:
        plan = [("bm25", None, [10_000, 100_000, 300_000, 1_000_000]),
                ("static", "static-minilm", [10_000, 100_000, 300_000]),
                ("minilm", "default", [500, 1000, 2000])]
    squeries = synthetic_queries(256)
    sc_rows = []
    for label, enc, sizes in plan:
        for n in sizes:
            p = work / f"syn-{n}.jsonl"
            if not p.exists():
                write_docs(synthetic_docs(n), p)
            out = work / f"syn-{label}-{n}"
            b = run_worker("build", {"docs": str(p), "out": str(out), "encoder": enc}, env=env, timeout=3600)
            r = HybridRetriever.load(out)
            mode = "bm25" if enc is None else "dense"
            r.search(squeries[:4], k=10, mode=mode)
            tp = throughput(r, squeries, mode, 32, 4)
            sc_rows.append({"index": label, "passages": n, "build_s": b["seconds"], "cpu_s": b["cpu_s"],
                            "peak_rss_mb": b["peak_rss_mb"],
                            "passages_per_s": n / b["seconds"], "search_mode": mode, "qps_b32": tp["qps"],
                            "p50_ms_b32": tp["p50_ms"]})
            r.close()
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        pts = [x for x in sc_rows if x["index"] == label]
        if max(x["passages"] for x in pts) < 1_000_000:
            # RSS is extrapolated only from >= 100k-passage builds: below that, fixed costs (the model,
            # libraries) dominate and a linear fit of the noise is meaningless
            big = max(x["passages"] for x in pts) >= 100_000
            sc_rows.append({"index": label, "passages": "1M (extrapolated)",
                            "build_s": fit_per_million([(x["passages"], x["build_s"]) for x in pts]),
                            "cpu_s": fit_per_million([(x["passages"], x["cpu_s"]) for x in pts]),
                            "peak_rss_mb": fit_per_million([(x["passages"], x["peak_rss_mb"]) for x in pts])
                            if big else "n/a"})
    report["scaling"] = sc_rows
    show(table(sc_rows, ["index", "passages", "build_s", "cpu_s", "peak_rss_mb", "passages_per_s", "qps_b32", "p50_ms_b32"],
               "Scaling on synthetic Zipfian corpora (build incl. BM25; dense rows also embed + FAISS flat). "
               "'1M' rows are linear extrapolations"))

    report["total_seconds"] = time.perf_counter() - t_start
    report["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    show(f"\nwrote {args.out} in {report['total_seconds']:.0f}s (load average at end {os.getloadavg()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
