"""Serving benchmark: the chat API's batched scheduler vs the same engine called one request at a time.

Run ``python benchmarks/serve.py --quick`` (1 and 8 users, short rollouts) or without ``--quick`` (1, 8 and 32
users). Prints a table and writes ``benchmarks/results/serve.json``.

Policy: the packaged SmolLM2-135M-Instruct (the default policy of ``medrwr demo``), greedy, grammar-constrained
to the protocol (``rollout.constrain: auto``), over the default knowledge base (hybrid retrieval), as
``medrwr serve api`` builds it. Think blocks are capped (``--think``) and one retrieval round is allowed so a
rollout is ~60-120 model tokens on CPU.

For each number of concurrent users N, in the same run:

* **batched server**: the API on a loopback port (uvicorn in a thread); N clients post streamed requests at
  once (different questions); per request: time to first streamed token (TTFT) and total latency; throughput =
  model tokens / wall time of the whole burst.
* **one at a time**: the same engine object, ``engine.run([request])`` for the N requests in turn, all
  considered to arrive at t=0 (what a server without batching gives a burst): TTFT (first token event) and
  completion time of each.

The ratio row compares throughput (batched / one at a time). Memory: peak RSS of the process (VmHWM) and RSS
after each phase. Torch threads: ``--threads`` (default 1), recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "serve.json"
sys.path.insert(0, str(ROOT))
from forward_clock import ForwardClock, split_ratios  # noqa: E402

QUESTIONS = [
    ("Which vitamin deficiency causes scurvy?", ["vitamin C", "vitamin D", "vitamin B12", "vitamin K"]),
    ("Which drug is a first-line treatment for type 2 diabetes?", ["metformin", "insulin glargine", "warfarin",
                                                                    "amoxicillin"]),
    ("Which organ is inflamed in hepatitis?", ["liver", "kidney", "lung", "heart"]),
    ("What does a chest X-ray show in lobar pneumonia?", ["consolidation", "pneumothorax", "cardiomegaly",
                                                           "pleural plaques"]),
    ("Which symptom is typical of migraine?", ["unilateral throbbing headache", "chest pain", "joint swelling",
                                               "haematuria"]),
    ("Which condition is caused by thyroid hormone deficiency?", ["hypothyroidism", "gout", "asthma", "psoriasis"]),
    ("Which test confirms pulmonary embolism?", ["CT pulmonary angiography", "spirometry", "ECG only",
                                                  "skin biopsy"]),
    ("Which finding suggests appendicitis?", ["right iliac fossa pain", "photophobia", "koilonychia",
                                              "resting tremor"]),
]


def _rss_mb(field: str = "VmRSS") -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _question(i: int) -> tuple[str, list[str]]:
    q, opts = QUESTIONS[i % len(QUESTIONS)]
    return (q if i < len(QUESTIONS) else f"{q} (case {i})"), opts


def build(args) -> Any:
    import torch

    from medrwr.config import Config
    from medrwr.serve.api.server import build_engine

    torch.set_num_threads(args.threads)
    cfg = Config()
    cfg.model.threads = args.threads
    cfg.model.dtype = args.dtype
    cfg.rollout.max_rounds = 1
    cfg.rollout.constrain_max_think_tokens = args.think
    cfg.rollout.max_new_tokens_per_turn = args.max_tokens
    cfg.rollout.max_total_new_tokens = args.max_tokens
    return cfg, build_engine(cfg)


def one_at_a_time(engine, n: int) -> dict[str, Any]:
    from medrwr.rollout.engine import RolloutRequest

    t0 = time.perf_counter()
    ttft, done, tokens = [], [], 0
    for i in range(n):
        q, opts = _question(i)
        first: list[float] = []

        def on_event(ev, first=first):
            if ev.kind == "tokens" and not first:
                first.append(time.perf_counter() - t0)

        (tr,) = engine.run([RolloutRequest(question=q, options=opts, request_id=f"seq-{i}")], on_event=on_event)
        done.append(time.perf_counter() - t0)
        ttft.append(first[0] if first else done[-1])
        tokens += tr.num_model_tokens
    wall = time.perf_counter() - t0
    return _summary(ttft, done, tokens, wall, n, errors=0)


def batched(url: str, n: int) -> dict[str, Any]:
    import httpx

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
            t0 = time.perf_counter()

            async def one(i: int):
                q, opts = _question(i)
                body = {"messages": [{"role": "user", "content": q}], "stream": True,
                        "medrwr_options": opts}
                first = None
                usage = None
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        return None
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and "reasoning_content" in (chunk["choices"] or [{}])[0].get("delta", {}):
                            first = time.perf_counter() - t0
                        usage = chunk.get("usage") or usage
                end = time.perf_counter() - t0
                return (first if first is not None else end), end, (usage or {}).get("completion_tokens", 0)

            results = await asyncio.gather(*(one(i) for i in range(n)))
            return results, time.perf_counter() - t0

    results, wall = asyncio.run(main())
    ok = [r for r in results if r is not None]
    return _summary([r[0] for r in ok], [r[1] for r in ok], sum(r[2] for r in ok), wall, n,
                    errors=len(results) - len(ok))


def _summary(ttft, done, tokens, wall, n, errors) -> dict[str, Any]:
    def pct(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")

    return {"users": n, "errors": errors, "wall_s": wall, "model_tokens": tokens,
            "tokens_per_s": tokens / wall if wall else 0.0,
            "ttft_mean_s": statistics.fmean(ttft) if ttft else float("nan"), "ttft_p50_s": pct(ttft, 50),
            "ttft_p95_s": pct(ttft, 95), "latency_mean_s": statistics.fmean(done) if done else float("nan"),
            "latency_p50_s": pct(done, 50), "latency_p95_s": pct(done, 95), "rss_mb": _rss_mb()}


class _Server:
    def __init__(self, app, cfg):
        from medrwr.retrieval.service.server import bind_socket, make_uvicorn_server

        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = make_uvicorn_server(app, cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 8 users, shorter rollouts")
    ap.add_argument("--users", default=None, help="comma-separated concurrency levels (default 1,8,32)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="policy weights (model.dtype); bfloat16 needs a CPU with native bf16 to be fast")
    ap.add_argument("--think", type=int, default=None, help="longest think block, tokens (default 24; quick 12)")
    ap.add_argument("--max-tokens", type=int, default=None, help="model tokens per rollout (default 160; quick 96)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    args.think = args.think or (12 if args.quick else 24)
    args.max_tokens = args.max_tokens or (96 if args.quick else 160)
    users = [int(x) for x in (args.users or ("1,8" if args.quick else "1,8,32")).split(",")]

    from medrwr.config import ServerConfig
    from medrwr.serve.api.app import create_app

    t0 = time.perf_counter()
    cfg, engine = build(args)
    load_s = time.perf_counter() - t0
    print(f"engine loaded in {load_s:.1f}s (policy: packaged SmolLM2-135M, constrain={engine.constrain}, "
          f"threads={args.threads}); rss {_rss_mb():.0f} MB", flush=True)
    engine.run([__import__("medrwr.rollout.engine", fromlist=["RolloutRequest"]).RolloutRequest(
        question=QUESTIONS[0][0], options=QUESTIONS[0][1])])  # warm-up (grammar compile, caches)
    scfg = ServerConfig(api_max_batch=max(users), api_max_queue=max(64, max(users)), api_batch_wait_ms=20)
    rows = []
    with _Server(create_app(engine, scfg, model_name="smollm2"), scfg) as srv:
        kv = getattr(engine.backend, "kv_cache", None)  # the transformers backend's KV store (None when off)
        clock = ForwardClock(engine.backend.model)
        for n in users:
            if kv is not None:
                kv.clear()  # each arm starts cold: the second must not reuse the first's cached prompts
            clock.reset()
            b = batched(srv.url, n)
            b["forward"] = clock.snapshot()
            if kv is not None:
                kv.clear()
            clock.reset()
            s = one_at_a_time(engine, n)
            s["forward"] = clock.snapshot()
            rows.append({"users": n, "batched": b, "sequential": s,
                         "throughput_ratio": b["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else None,
                         "split": split_ratios(b["forward"], s["forward"])})
            print(f"  {n} users: batched {b['tokens_per_s']:.1f} tok/s, one-at-a-time {s['tokens_per_s']:.1f} tok/s",
                  flush=True)
    print()
    head = (f"{'users':>5} {'mode':<14} {'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>8} {'lat p95':>8} "
            f"{'wall s':>7} {'tok/s':>7} {'errors':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for name, m in (("batched", r["batched"]), ("one-at-a-time", r["sequential"])):
            print(f"{r['users']:>5} {name:<14} {m['ttft_p50_s']:>9.2f} {m['ttft_p95_s']:>9.2f} "
                  f"{m['latency_p50_s']:>8.2f} {m['latency_p95_s']:>8.2f} {m['wall_s']:>7.1f} "
                  f"{m['tokens_per_s']:>7.1f} {m['errors']:>6}")
        print(f"{'':>5} {'ratio':<14} throughput batched / one-at-a-time = {r['throughput_ratio']:.2f}x")
        fb, fs, sp = r["batched"]["forward"], r["sequential"]["forward"], r["split"]
        print(f"{'':>5} {'where':<14} prefill {fb['prefill_s']:.1f} s / {fs['prefill_s']:.1f} s, decode "
              f"{fb['decode_s']:.1f} s / {fs['decode_s']:.1f} s (batched / one at a time): decode "
              f"{sp['decode_speedup']:.2f}x; with free decoding at most {sp['bound_if_decode_free']:.2f}x")
    peak = _rss_mb("VmHWM")
    print(f"\npeak RSS {peak:.0f} MB; torch threads {args.threads}; think <= {args.think} tokens; "
          f"<= {args.max_tokens} model tokens per rollout")
    out = {"benchmark": "serve", "quick": args.quick, "threads": args.threads, "dtype": args.dtype, "think_tokens": args.think,
           "max_tokens": args.max_tokens, "load_s": load_s, "peak_rss_mb": peak, "rows": rows,
           "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
