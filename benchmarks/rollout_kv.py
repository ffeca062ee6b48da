"""KV-cache reuse benchmark (``rollout.kv_cache``): RwR wall time over plain generate, with reuse on and off.

Run ``python benchmarks/rollout_kv.py`` (or ``python benchmarks/rollout.py --cache``); ``--quick`` for a short
run. Prints a table and writes ``benchmarks/results/rollout_kv.json``.

Same setup as ``benchmarks/rollout.py`` section 1-2: the packaged SmolLM2-135M-Instruct (CPU, float32), every row
following a forced transcript of ``--rounds`` query rounds whose think blocks the model samples itself, an
in-memory retriever. In one run, on the same model object:

1. **RwR / plain**, reuse off and on: the loop's wall time less forcing and retrieval, over one plain
   ``generate`` of the same number of new tokens from the same prompts (the issue's target: <= 1.10 with reuse).
2. **Exactness on a real model**: reuse on vs off must give the same ids; the largest log-prob difference is
   reported (the tests check this on the tiny model; here the model is real and sensitive).
3. **Batched vs one row**, reuse on: ``--batch`` rows in one engine run vs one row, time per row and RwR / plain.

Timings are the minimum over ``--repeats`` runs (off and on alternate). Torch threads: ``--threads`` (default 1).

``--model tiny-vlm``: the same on the tiny random Qwen2.5-VL of ``medrwr.testing``, every row with its own
synthetic image (sizes differ), plain generate fed the images too. Its timings say little (the model is tiny);
its point is exactness of reuse with images and M-RoPE positions on a batched multi-round run. Results:
``benchmarks/results/rollout_kv_tiny_vlm.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollout as rb  # benchmarks/rollout.py: script, requests, run_plain

RESULTS = Path(__file__).resolve().parent / "results" / "rollout_kv.json"
RESULTS_VLM = RESULTS.with_name("rollout_kv_tiny_vlm.json")


def _image(i: int):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(i)
    return Image.fromarray((rng.rand(56 + 28 * (i % 3), 56 + 28 * (i % 2), 3) * 255).astype("uint8"))


def _requests(n: int, images: bool):
    reqs = rb._requests(n)
    if images:
        for i, r in enumerate(reqs):
            r.images = [_image(i)]
    return reqs


def run_plain_mm(backend, requests, engine_for_prompts, n_new: int) -> float:
    """``rollout.run_plain`` with the rows' images fed too (a VLM's prompts hold image placeholders)."""
    import torch

    from medrwr.rollout.backends.base import GenerationState

    rows = [engine_for_prompts._prepare(r, i).transcript for i, r in enumerate(requests)]
    batch = backend._batch([GenerationState(t.prompt_ids, t.mm) for t in rows])
    t0 = time.perf_counter()
    with torch.inference_mode():
        backend.model.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True, top_k=0,
                               top_p=1.0, temperature=1.0, pad_token_id=backend.pad_token_id)
    return time.perf_counter() - t0


def run_exact(backend, requests, script, cfg):
    """``rollout.run_exact`` with the forcer told the pad id: SmolLM2's tokenizer has none (the backend pads with
    ``<|im_end|>``), and the cached layout may left-pad a call wider than the uncached one."""
    from medrwr.retrieval.base import FakeRetriever
    from medrwr.rollout.engine import RolloutEngine
    from medrwr.testing import ForcedTranscript

    forcer = rb.TimedForcer(ForcedTranscript(backend.tokenizer, script))
    forcer.forcer.pad_token_id = backend.pad_token_id
    backend.logits_processors = [forcer]
    engine = RolloutEngine(backend, FakeRetriever(rb.DOCS), cfg)
    t0 = time.perf_counter()
    traces = engine.run(requests)
    return traces, engine.stats, time.perf_counter() - t0, forcer.seconds


def _one(backend, requests, script, cfg, prompt_engine, plain_cache: dict) -> dict[str, Any]:
    if backend.kv_cache:
        backend.kv_cache.clear()  # every run starts cold: no prompt kept from an earlier run
    reused0 = backend.kv_cache.reused_tokens if backend.kv_cache else 0
    traces, stats, wall, forcing_s = run_exact(backend, requests, script, cfg)
    n_new = max(t.num_model_tokens for t in traces)
    key = (len(requests), n_new)
    if key not in plain_cache:
        plain = run_plain_mm if requests[0].images else rb.run_plain
        plain_cache[key] = plain(backend, requests, prompt_engine, n_new)
    net = wall - forcing_s - stats.retrieval_s
    return {"wall_s": wall, "net_s": net, "forcing_s": forcing_s, "retrieval_s": stats.retrieval_s,
            "plain_s": plain_cache[key], "rwr_over_plain": net / plain_cache[key], "model_tokens": n_new,
            "inserted_tokens": sum(t.num_inserted_tokens for t in traces), "rounds": [t.rounds for t in traces],
            "reused_tokens": (backend.kv_cache.reused_tokens - reused0) if backend.kv_cache else 0, "traces": traces}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = min(runs, key=lambda r: r["net_s"])
    return {k: v for k, v in best.items() if k != "traces"} | {"plain_s": min(r["plain_s"] for r in runs)} | {
        "rwr_over_plain": best["net_s"] / min(r["plain_s"] for r in runs)}


def bench(model, tok, batch: int, rounds: int, think: int, repeats: int, images: bool = False) -> dict[str, Any]:
    """``tok``: the tokenizer, or a VLM's processor (then every request gets an image)."""
    from medrwr.config import RolloutConfig
    from medrwr.rollout.backends.hf import HFBackend
    from medrwr.rollout.engine import RolloutEngine

    cfg = RolloutConfig(max_rounds=rounds, max_new_tokens_per_turn=think + 48,
                        max_total_new_tokens=(rounds + 1) * (think + 48))
    script = rb._script(getattr(tok, "tokenizer", tok), rounds, think)
    backends = {mode: HFBackend(model, tok, seed=0, kv_cache=mode) for mode in ("off", "on")}
    prompt_engine = RolloutEngine(backends["off"], None, cfg)
    for b in backends.values():  # warm-up: first-call costs, not timed
        run_exact(b, _requests(1, images), script[-1:], cfg)
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": [], "on_1row": []}
    plain: dict = {}
    requests = _requests(batch, images)
    for _ in range(repeats):
        for mode in ("off", "on"):
            backends[mode].forward_calls = 0  # same sampling stream in both modes
            runs[mode].append(_one(backends[mode], requests, script, cfg, prompt_engine, plain))
        backends["on"].forward_calls = 0
        runs["on_1row"].append(_one(backends["on"], requests[:1], script, cfg, prompt_engine, plain))
    same_ids = all(a.completion_ids == b.completion_ids
                   for a, b in zip(runs["off"][0]["traces"], runs["on"][0]["traces"]))
    max_diff = max(abs(x - y) for a, b in zip(runs["off"][0]["traces"], runs["on"][0]["traces"])
                   for x, y in zip(a.logprobs, b.logprobs))
    out = {mode: _best(r) for mode, r in runs.items()}
    out.update(batch=batch, rounds=rounds, think_tokens=think, repeats=repeats, same_ids=same_ids,
               max_abs_logprob_diff=max_diff, images=images)
    return out


def table(r: dict[str, Any], threads: int, name: str = "SmolLM2-135M-Instruct") -> str:
    lines = [(f"torch threads: {threads}; {name}, {r['rounds']} rounds, "
              f"think {r['think_tokens']} tok, min of {r['repeats']}"),
             "| kv_cache | rows | model tok/row | inserted tok | reused tok | RwR net s | plain s | RwR/plain | s/row |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, rows in (("off", r["batch"]), ("on", r["batch"]), ("on_1row", 1)):
        m = r[mode]
        lines.append(f"| {mode.split('_')[0]} | {rows} | {m['model_tokens']} | {m['inserted_tokens']} | "
                     f"{m['reused_tokens']} | {m['net_s']:.2f} | {m['plain_s']:.2f} | {m['rwr_over_plain']:.2f} | "
                     f"{m['net_s'] / rows:.2f} |")
    lines.append(f"reuse on vs off: same ids {r['same_ids']}, max |log-prob diff| {r['max_abs_logprob_diff']:.2e}; "
                 f"RwR speed-up {r['off']['net_s'] / r['on']['net_s']:.2f}x; "
                 f"batched vs 1 row (reuse on): {r['on_1row']['net_s'] / (r['on']['net_s'] / r['batch']):.2f}x "
                 "throughput per row")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rows, 2 rounds, 12-token thinks, one repeat")
    ap.add_argument("--out", default=None, help=f"default {RESULTS} ({RESULTS_VLM.name} for --model tiny-vlm)")
    ap.add_argument("--model", choices=("smollm2", "tiny-vlm"), default="smollm2",
                    help="the packaged SmolLM2, or the tiny random Qwen2.5-VL with one image per row")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--think", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from medrwr.rollout.backends.hf import load_hf_policy

    torch.set_num_threads(args.threads)
    batch, rounds, think, repeats = (2, 2, 12, 1) if args.quick else (args.batch, args.rounds, args.think,
                                                                        args.repeats)
    if args.model == "tiny-vlm":
        from transformers import Qwen2_5_VLForConditionalGeneration

        from medrwr.rollout.backends.processing import load_processor
        from medrwr.testing import tiny_qwen2_5_vl

        folder = tiny_qwen2_5_vl()
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
        result = bench(model, load_processor(folder), batch, rounds, think, repeats, images=True)
        text = table(result, torch.get_num_threads(), "tiny random Qwen2.5-VL, one image per row")
    else:
        smol = load_hf_policy(None, seed=0)
        result = bench(smol.model, smol.tokenizer, batch, rounds, think, repeats)
        text = table(result, torch.get_num_threads())
    print(text)
    payload = {"benchmark": "rollout_kv", "model": args.model, "quick": args.quick, "table": text, "result": result,
               "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                           "threads": torch.get_num_threads()}}
    out = Path(args.out or (RESULTS_VLM if args.model == "tiny-vlm" else RESULTS))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, payload)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
