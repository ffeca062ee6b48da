"""Evaluation benchmark: items/s of ``medrwr eval run`` batched vs one item at a time, per mode, in one run.

Run ``python benchmarks/eval.py --quick`` (16 questions, batch 16, about 5 minutes on 2 cores) or without ``--quick``
(48 questions, batch 32 = ``eval.batch_size``). Prints a table and writes ``benchmarks/results/eval.json`` (``--out``).

Policy: the packaged SmolLM2-135M-Instruct (the default model of ``medrwr ask``; text-only, CPU, float32),
grammar-constrained as ``medrwr ask`` runs it (``rollout.constrain: auto`` = protocol for it), greedy. Retrieval:
the default KB (built on first use). Items: multiple-choice questions written from the default KB's HPO passages
(definition -> term, 4 options) into a generic JSONL read by the ``jsonl`` loader, so the whole harness runs:
loader, engine, retrieval, scoring, results store (fsync per batch). For each mode, the same items go through
:func:`medrwr.eval.runner.run_eval` twice in this process with one loaded policy: ``--batch-size B`` and
``--batch-size 1``; items/s is the run's own timing (policy and index loading excluded). ``rwr_cdir`` is left out:
CDIR needs an image, and SmolLM2 is text-only (the rows would be ``rwr``'s). Also reported: how often the batched
and the one-at-a-time runs give the same answer (greedy; padding may change a near-tie) and their accuracies.
Records the torch thread count (``--threads``, default 1).

What to expect on CPU (2 shared cores, 1 thread, ``--quick --short``, AMD EPYC with avx512_bf16): float32 direct
3.9x, rag 2.6x, rwr 2.75x (same answers in both arms); ``--dtype bfloat16`` direct 5.8x, rag 3.3x, rwr 3.7x (62-88%
same answers: bf16 rounding depends on the batch's shape). Prefill is compute-bound and costs the same batched or
not; decoding batches well: the table's last columns split each arm's forward seconds into prefill and decode
(``forward_clock.py``) and give the ratio a free decode would reach. docs/evaluation.md, "Throughput".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "eval.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_clock import ForwardClock, split_ratios  # noqa: E402


def write_questions(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` MCQs (definition -> HPO term) from the default KB as a generic JSONL; deterministic."""
    from medrwr.kb.default import iter_default_kb_documents

    docs = list(itertools.islice(iter_default_kb_documents(["HPO"]), 2000))

    def definition(d) -> str:
        body = d.text.split("). ", 1)[1] if "). " in d.text else ""
        return body.split(". ")[0].strip().rstrip(".")

    cands = [d for d in docs if 40 <= len(definition(d)) <= 200 and "<" not in d.title and ">" not in d.title]
    titles = sorted({c.title for c in cands})
    rng = random.Random(seed)
    rows = []
    for i, d in enumerate(cands[:: max(1, len(cands) // n)][:n]):
        opts = rng.sample([t for t in titles if t != d.title], 3)
        at = rng.randrange(4)
        opts.insert(at, d.title)
        rows.append({"id": f"kb{i}", "question": f"Which term is defined as: {definition(d)}?",
                     "options": dict(zip("ABCD", opts)), "answer": "ABCD"[at], "subject": "HPO"})
    path.mkdir(parents=True, exist_ok=True)
    (path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def bench_mode(cfg_overrides: list[str], mode: str, data: Path, work: Path, backend: Any, batch: int,
               clock: Any = None) -> dict:
    from medrwr.config import load_config
    from medrwr.eval.results import read_results
    from medrwr.eval.runner import EvalEngines, run_eval

    out: dict[str, Any] = {"mode": mode}
    answers = {}
    for label, bs in (("batched", batch), ("single", 1)):
        kv = getattr(backend, "kv_cache", None)  # the transformers backend's KV store (None when off)
        if kv is not None:
            kv.clear()  # both arms start cold: the second arm must not reuse the first's cached prompts
        cfg = load_config(None, [*cfg_overrides, f"eval.modes=[{mode}]", f"eval.batch_size={bs}"])
        run_dir = work / f"{mode}-{label}"
        if clock is not None:
            clock.reset()
        summary = run_eval(cfg, "jsonl", data, run_dir, engines=EvalEngines(cfg, [mode], backend=backend))
        t = summary["timings"][mode]
        rows = read_results(run_dir)
        answers[label] = {r["id"]: r["trace"].get("answer") for r in rows}
        out[label] = {"batch_size": bs, "items": t["items"], "seconds": round(t["seconds"], 2),
                      "items_per_s": round(t["items_per_s"], 3),
                      "accuracy": sum(r["verdict"]["correct"] for r in rows) / len(rows),
                      "mean_rounds": sum(r["trace"]["rounds"] for r in rows) / len(rows)}
        if clock is not None:
            out[label]["forward"] = clock.snapshot()
    if clock is not None:
        out["split"] = split_ratios(out["batched"]["forward"], out["single"]["forward"])
    out["speedup"] = round(out["batched"]["items_per_s"] / out["single"]["items_per_s"], 2)
    same = sum(answers["batched"][k] == answers["single"].get(k) for k in answers["batched"])
    out["same_answer"] = same / len(answers["batched"])
    return out


def _table(rows: list[dict]) -> str:
    head = f"{'mode':<8} {'items':>5} {'batched it/s':>13} {'single it/s':>12} {'speedup':>8} {'same ans':>9} " \
           f"{'acc b/s':>11} {'rounds':>6} {'prefill s b/s':>14} {'decode s b/s':>13} {'decode x':>8} {'bound':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        b, s = r["batched"], r["single"]
        lines.append(f"{r['mode']:<8} {b['items']:>5} {b['items_per_s']:>13.3f} {s['items_per_s']:>12.3f} "
                     f"{r['speedup']:>7.2f}x {100 * r['same_answer']:>8.0f}% "
                     f"{100 * b['accuracy']:>5.0f}/{100 * s['accuracy']:<5.0f} {b['mean_rounds']:>6.2f}"
                     + _split_cells(r))
    return "\n".join(lines)


def _split_cells(r: dict) -> str:
    if "split" not in r:
        return ""
    fb, fs, sp = r["batched"]["forward"], r["single"]["forward"], r["split"]
    return (f" {fb['prefill_s']:>6.1f}/{fs['prefill_s']:<7.1f} {fb['decode_s']:>6.1f}/{fs['decode_s']:<6.1f} "
            f"{sp['decode_speedup']:>7.2f}x {sp['bound_if_decode_free']:>5.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 questions (default 48)")
    ap.add_argument("--questions", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows of the batched arm (default: eval.batch_size, 32; capped by the questions)")
    ap.add_argument("--modes", default="direct,rag,rwr")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded)")
    ap.add_argument("--short", action="store_true",
                    help="trimmed rollouts (think <= 24 tokens, 1 round, k=2, 160 inserted tokens) instead of the "
                         "defaults of medrwr eval run")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="policy weights (model.dtype); bfloat16 needs a CPU with native bf16 to be fast")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    n = args.questions or (16 if args.quick else 48)
    import torch

    torch.set_num_threads(args.threads)
    from medrwr.config import load_config
    from medrwr.rollout.backends import build_backend

    overrides = [f"model.threads={args.threads}", f"model.dtype={args.dtype}", "rollout.seed=0"]
    if args.short:  # the earlier, trimmed settings: short think blocks, one round, small documents
        overrides += ["rollout.max_rounds=1", "rollout.constrain_max_think_tokens=24",
                      "rollout.max_new_tokens_per_turn=64", "rollout.max_total_new_tokens=160", "retrieval.k=2",
                      "rollout.max_inserted_tokens=160"]
    cfg = load_config(None, overrides)
    if args.batch_size is None:
        args.batch_size = min(cfg.eval.batch_size, n)
    t0 = time.perf_counter()
    backend = build_backend(cfg.model, cfg.rollout)
    load_s = time.perf_counter() - t0
    clock = ForwardClock(backend.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="medrwr-bench-eval-") as tmp:
        data = write_questions(Path(tmp) / "data", n)
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            rows.append(bench_mode(overrides, mode, data, Path(tmp), backend, args.batch_size, clock))
            print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    table = f"torch threads: {torch.get_num_threads()}; policy: packaged SmolLM2-135M-Instruct (load {load_s:.1f}s)\n"
    table += _table(rows)
    print(table)
    payload = {"benchmark": "eval", "quick": args.quick, "questions": n, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "overrides": overrides, "results": rows, "table": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
