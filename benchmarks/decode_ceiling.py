"""How much can batching win on this machine at all? The policy's own forward costs, and the ceiling they put on
the batched / one-at-a-time ratios of ``eval.py`` and ``serve.py``.

Run ``python benchmarks/decode_ceiling.py`` (about 1 minute). It loads the packaged SmolLM2-135M-Instruct as the
engine does (float32, ``--threads`` torch threads, default 1) and times bare forwards, no engine around them:

* **prefill**: one row of ``--context`` tokens; tokens/s, and the same tokens as 8 rows (a batch of prompts);
* **decode step**: R rows each feeding one token after ``--context`` kept tokens (the growing KV cache the
  engine uses), for R = 1, 4, 8, 16, 32: ms per step, ms per row, and the decode speedup R x t(1) / t(R) -- the
  most a batch of R rows can gain over one row at a time in the decode phase (the baseline in the same run is
  the one-row step).

Then, for each result file given (``--results benchmarks/results/eval.json ...``, as written by ``eval.py`` /
``serve.py``), it takes each arm's measured prefill and decode seconds (``forward_clock.py``) and prints the
**ceiling**: the ratio the batched arm would reach if every decode step ran full (R = the batch size or the
number of users) at the bare forward cost above, with no engine, scheduler or padding overhead:
``(prefill_1 + decode_1) / (prefill_B + decode_1 / speedup(R))``. Prefill is compute-bound, so the batched arm
pays the same prefill seconds as one at a time. Writes ``benchmarks/results/decode_ceiling.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "decode_ceiling.json"
ROWS = (1, 4, 8, 16, 32, 48)


def _fastest_ms(fn: Any, repeat: int, warmup: int = 2) -> float:
    """The fastest of ``repeat`` timed calls: a ceiling wants the hardware's best, not a busy neighbour's."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def measure(model: Any, context: int, repeat: int) -> dict[str, Any]:
    """Bare prefill and decode-step costs of ``model`` (see the module docstring)."""
    import torch

    from medrwr.rollout.backends.kv_cache import growing_cache

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, context), generator=gen)
    with torch.inference_mode():
        one = _fastest_ms(lambda: model(input_ids=ids, logits_to_keep=1), max(2, repeat // 4), warmup=1)
        eight = _fastest_ms(lambda: model(input_ids=ids.repeat(8, 1), logits_to_keep=1), 2, warmup=1)
    out: dict[str, Any] = {"context": context,
                           "prefill": {"tokens_per_s_1_row": round(context / one * 1000, 1),
                                       "tokens_per_s_8_rows": round(8 * context / eight * 1000, 1)},
                           "decode": []}
    steps = {}
    for rows in ROWS:  # one cache per row count, then the steps interleaved: every count sees the same load
        prompt = torch.randint(100, 40000, (rows, context), generator=gen)
        step_ids = torch.randint(100, 40000, (rows, 1), generator=gen)
        with torch.inference_mode():
            cache = growing_cache(model.config)
            model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        steps[rows] = (step_ids, cache, cache.get_seq_length())

    def step(rows: int) -> float:
        step_ids, cache, length = steps[rows]
        with torch.inference_mode():
            t = time.perf_counter()
            model(input_ids=step_ids, past_key_values=cache, use_cache=True)
            dt = time.perf_counter() - t
            cache.crop(length)  # every timed step sees the same context
        return dt

    best = {rows: float("inf") for rows in ROWS}
    for i in range(repeat + 2):
        for rows in ROWS:
            dt = step(rows)
            if i >= 2:  # two warm-up rounds
                best[rows] = min(best[rows], dt)
    for rows in ROWS:
        ms = 1000 * best[rows]
        out["decode"].append({"rows": rows, "ms_per_step": round(ms, 1), "ms_per_row": round(ms / rows, 2)})
    base = out["decode"][0]["ms_per_step"]
    for r in out["decode"]:
        r["speedup"] = round(r["rows"] * base / r["ms_per_step"], 2)
    return out


def _speedup_at(decode: list[dict], rows: float) -> float:
    """Decode speedup at ``rows`` rows: linear between the measured row counts (capped at the largest)."""
    pts = [(r["rows"], r["speedup"]) for r in decode]
    if rows <= pts[0][0]:
        return pts[0][1]
    for (r0, s0), (r1, s1) in itertools.pairwise(pts):
        if rows <= r1:
            return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
    return pts[-1][1]


def result_dtype(result: dict) -> str:
    """The policy dtype a result file was measured with (older serve files did not record it: float32)."""
    for o in result.get("overrides", []):
        if o.startswith("model.dtype="):
            return o.split("=", 1)[1]
    return result.get("dtype", "float32")


def ceilings(result: dict, decode: list[dict]) -> list[dict]:
    """Per mode (eval) or user count (serve) of a result file: measured ratio and its ceiling."""
    rows_out = []
    if result.get("benchmark") == "eval":
        cases = [(r["mode"], result["batch_size"], r["batched"], r["single"], r["speedup"]) for r in result["results"]]
    elif result.get("benchmark") == "serve":
        cases = [(f"{r['users']} users", r["users"], r["batched"], r["sequential"], r["throughput_ratio"])
                 for r in result["rows"] if r["users"] > 1]
    else:
        raise SystemExit(f"not an eval.py or serve.py result file (benchmark={result.get('benchmark')!r})")
    for name, rows, b, s, measured in cases:
        fb, fs = b.get("forward"), s.get("forward")
        if not fb or not fs:
            continue
        speed = _speedup_at(decode, rows)
        ceiling = (fs["prefill_s"] + fs["decode_s"]) / (fb["prefill_s"] + fs["decode_s"] / speed)
        rows_out.append({"case": name, "rows": rows, "measured_ratio": round(measured, 2),
                         "decode_speedup_measured": round(fs["decode_s"] / max(1e-9, fb["decode_s"]), 2),
                         "decode_speedup_ceiling": round(speed, 2), "ratio_ceiling": round(ceiling, 2),
                         "prefill_s_batched_single": [fb["prefill_s"], fs["prefill_s"]],
                         "decode_s_single": fs["decode_s"]})
    return rows_out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=300, help="kept tokens per row before the timed decode step")
    ap.add_argument("--repeat", type=int, default=12, help="timed rounds of decode steps (the fastest counts)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--results", nargs="*", default=[], help="eval.py / serve.py result files to bound")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from medrwr.config import load_config
    from medrwr.rollout.backends import build_backend

    cfg = load_config(None, [f"model.threads={args.threads}", f"model.dtype={args.dtype}"])
    model = build_backend(cfg.model, cfg.rollout).model
    m = measure(model, args.context, args.repeat)
    lines = [(f"torch threads: {torch.get_num_threads()}; packaged SmolLM2-135M-Instruct, {args.dtype}; "
              f"context {args.context} tokens"),
             (f"prefill: {m['prefill']['tokens_per_s_1_row']} tokens/s as 1 row, "
              f"{m['prefill']['tokens_per_s_8_rows']} tokens/s as 8 rows"),
             "", f"{'rows':>5} {'ms/step':>9} {'ms/row':>8} {'decode speedup vs 1 row':>24}"]
    lines += [f"{r['rows']:>5} {r['ms_per_step']:>9.1f} {r['ms_per_row']:>8.2f} {r['speedup']:>23.2f}x"
              for r in m["decode"]]
    bounds = {}
    for path in args.results:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        if result_dtype(result) != args.dtype:
            lines += ["", f"{path}: measured in {result_dtype(result)}, not {args.dtype}; skipped (--dtype)"]
            continue
        rows = ceilings(result, m["decode"])
        bounds[str(path)] = rows
        lines += ["", f"{path}:", (f"{'case':<10} {'rows':>4} {'measured':>9} {'ceiling':>8} "
                                   f"{'decode x measured':>18} {'decode x ceiling':>17}")]
        lines += [f"{r['case']:<10} {r['rows']:>4} {r['measured_ratio']:>8.2f}x {r['ratio_ceiling']:>7.2f}x "
                  f"{r['decode_speedup_measured']:>17.2f}x {r['decode_speedup_ceiling']:>16.2f}x" for r in rows]
    table = "\n".join(lines)
    print(table)
    payload = {"benchmark": "decode_ceiling", "threads": torch.get_num_threads(), "dtype": args.dtype,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "load_avg": os.getloadavg()},
               "measured": m, "ceilings": bounds, "table": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
