"""Retrieval-server benchmark: our batched service vs a server built the reference way, same index.

Run ``python benchmarks/retrieval_server.py --quick`` (5k passages, ~5 min on 2 cores) or without
``--quick`` (20k passages; the first run embeds them with the packaged MiniLM, ~6-10 min, cached under
``benchmarks/results/cache``). Prints a table and writes ``benchmarks/results/retrieval_server.json``.

What runs, each in its own process (the box has 2 cores; the load generator never shares a process
with a server):

1. **In-process ceiling**: ``HybridRetriever.search`` on the same queries, one at a time and in
   batches of 32 / 64 (what the library can do with no HTTP at all).
2. **Ours**: ``medrwr serve retrieval`` (dynamic batching, uvicorn) on loopback.
3. **Baseline, the reference implementation's design**: a single-threaded stdlib ``HTTPServer``
   (one request at a time, default listen backlog) whose ``/queries`` handler encodes and searches
   each query on its own with the same index and encoder, and does no input checking.

Both servers get identical requests: ``POST /queries {"queries": [q], "k": 3}`` (the reference's
route, which ours keeps), single-query, from C concurrent clients (C = 1, 8, 32, 64), through one
async httpx driver process. Reported: QPS, p50/p99 latency, errors; ratios ours/baseline and
ours/in-process. A last row mixes 20% malformed requests (bad JSON, empty query, k=0, k=10^6,
1 MB query) at 32 clients: good requests must still get correct answers, malformed ones a 4xx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "retrieval_server.json"
DRIVER = ["raw"]
CACHE = ROOT / "results" / "cache"
K = 3


# ------------------------------------------------------------------------------------------ data


def _corpus(n: int):
    """A deterministic, source-balanced subset of the shipped default KB (real medical passages)."""
    from medrwr.kb.default import iter_default_kb_documents

    docs = list(iter_default_kb_documents())
    step = max(1, len(docs) // n)
    return docs[::step][:n], docs


def _queries(all_docs, n: int = 512, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    templates = ["{t}", "what causes {t}", "symptoms of {t}", "treatment of {t}", "{t} in children",
                 "differential diagnosis of {t}", "is {t} dangerous", "{t} lab findings"]
    picks = rng.sample(all_docs, n)
    return [rng.choice(templates).format(t=d.title.split("(")[0].strip().lower()[:80]) for d in picks]


def build_or_reuse_index(n: int) -> tuple[Path, list[str]]:
    from medrwr.retrieval.index.hybrid import build_index

    path = CACHE / f"kb-subset-{n}-minilm"
    docs, all_docs = _corpus(n)
    queries = _queries(all_docs)
    if (path / "manifest.json").is_file():
        print(f"reusing index {path}", flush=True)
        return path, queries
    print(f"building index of {len(docs)} passages with the packaged MiniLM into {path} (cached) ...", flush=True)
    t0 = time.perf_counter()
    build_index(docs, path, encoder="default", show_progress=True)
    print(f"built in {time.perf_counter() - t0:.0f}s", flush=True)
    return path, queries


# ------------------------------------------------------------------------------------------ in-process ceiling


def in_process(index: Path, queries: list[str], mode: str, single: int) -> dict[str, Any]:
    """Library speed with no HTTP, measured on a fresh thread like the server's search thread.

    OpenMP thread counts are per thread, and ``HybridRetriever.load`` sets FAISS (and, through the
    shared libgomp, torch) to one thread in the loading thread; a fresh thread runs with the
    defaults. Measuring on a fresh thread compares the server with the library under the same
    settings, so the ratio isolates the cost of HTTP and batching.
    """
    from concurrent.futures import ThreadPoolExecutor

    from medrwr.retrieval.index.hybrid import HybridRetriever

    r = HybridRetriever.load(index)

    def measure() -> dict[str, Any]:
        r.warmup()
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        for q in queries[:single]:
            r.search([q], k=K, mode=mode)
        out["batch_1"] = single / (time.perf_counter() - t0)
        for b in (32, 64):
            n = (len(queries) // b) * b
            r.search(queries[:b], k=K, mode=mode)  # warm the shape
            t0 = time.perf_counter()
            for i in range(0, n, b):
                r.search(queries[i : i + b], k=K, mode=mode)
            out[f"batch_{b}"] = n / (time.perf_counter() - t0)
        return out

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(measure).result()


# ------------------------------------------------------------------------------------------ baseline server


def run_baseline_server(index: str, port: int, mode: str) -> None:
    """The reference design: one thread, one request at a time, each query encoded and searched alone."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from medrwr.retrieval.index.hybrid import HybridRetriever

    retriever = HybridRetriever.load(index)
    # Same OpenMP settings as a fresh thread (what our server's search thread and the in-process
    # measurement get): undo the loader's one-thread setting on this, the serving, thread.
    import faiss
    import torch

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    torch.set_num_threads(os.cpu_count() or 1)
    retriever.warmup()

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0, one connection per request: what Werkzeug's single-threaded dev server speaks
        # (it enables keep-alive only when threaded). Listen backlog: socketserver's default, 5.

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # no input checks, as in the reference's Flask route
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            queries, k = body["queries"], body.get("k", 3)
            answers = [[h.text for h in retriever.search([q], k=k, mode=mode)[0]] for q in queries]
            data = json.dumps({"queries": queries, "answers": answers}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = HTTPServer(("127.0.0.1", port), Handler)
    print("READY", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ------------------------------------------------------------------------------------------ driver


def _payloads(queries: list[str], malformed_share: float, seed: int = 1) -> list[tuple[bytes, bool]]:
    rng = random.Random(seed)
    bad = [
        b'{"queries": ["chest pain"',  # bad JSON
        json.dumps({"queries": [""], "k": K}).encode(),
        json.dumps({"queries": ["fever"], "k": 0}).encode(),
        json.dumps({"queries": ["fever"], "k": 10**6}).encode(),
        json.dumps({"queries": ["x" * 1_000_000], "k": K}).encode(),
    ]
    out = []
    for i, q in enumerate(queries):
        if rng.random() < malformed_share:
            out.append((bad[i % len(bad)], False))
        else:
            out.append((json.dumps({"queries": [q], "k": K}).encode(), True))
    return out


class _RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (one connection, one request at a time).

    The load generator shares the 2 cores with the server it measures; httpx costs ~2 ms of CPU per
    request here, this ~0.1 ms, so the instrument takes less of the machine it measures.
    """

    def __init__(self, url: str, timeout: float):
        hostport = url.split("://", 1)[1].rstrip("/")
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def _exchange(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None and self._writer is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("ascii")
        self._writer.write(head + body)
        await self._writer.drain()
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionResetError("server closed the connection without answering")
        version, status = status_line.split(b" ", 2)[:2]
        length, close = None, version == b"HTTP/1.0"
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection":
                close = value.strip().lower() == b"close" or (close and value.strip().lower() != b"keep-alive")
        data = await self._reader.readexactly(length) if length is not None else await self._reader.read()
        if close or length is None:
            await self._close()
        return int(status), data

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._exchange(path, body), self.timeout)
        except BaseException:
            await self._close()
            raise


async def _drive(url: str, payloads: list[tuple[bytes, bool]], concurrency: int, total: int,
                 timeout: float, budget_s: float, driver: str = "raw") -> dict[str, Any]:
    """C workers send single-query requests until ``total`` are sent or ``budget_s`` has passed.

    ``driver="httpx"``: each worker has its own one-connection ``httpx.AsyncClient`` (one shared pool
    of 64 connections costs httpcore ~8 ms of CPU per request here, which made the load generator
    the bottleneck). ``driver="raw"`` (default): :class:`_RawHTTP`, ~20x less CPU per request.
    """
    import httpx

    latencies: list[float] = []
    errors: Counter = Counter()
    counts: Counter = Counter()
    counter = itertools.count()
    if driver == "httpx":
        headers = {"content-type": "application/json"}
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        hx = [httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) for _ in range(concurrency)]

        def make_post(i: int) -> Any:
            async def post(path: str, body: bytes) -> tuple[int, bytes]:
                r = await hx[i].post(path, content=body, headers=headers)
                return r.status_code, r.content
            return post

        async def close() -> None:
            await asyncio.gather(*(c.aclose() for c in hx), return_exceptions=True)
    else:
        raws = [_RawHTTP(url, timeout) for _ in range(concurrency)]

        def make_post(i: int) -> Any:
            return raws[i].post

        async def close() -> None:
            await asyncio.gather(*(r._close() for r in raws), return_exceptions=True)

    posts = [make_post(i) for i in range(concurrency)]
    try:
        warm = [p("/queries", body) for p, (body, good) in zip(posts[:8], payloads[:8]) if good]
        await asyncio.gather(*warm, return_exceptions=True)

        async def worker(post: Any) -> None:
            while True:
                i = next(counter)
                if i >= total or time.perf_counter() - t0 > budget_s:
                    return
                body, good = payloads[i % len(payloads)]
                counts["sent"] += 1
                sent_at = time.perf_counter()
                try:
                    status, data = await post("/queries", body)
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    errors["timeout"] += 1
                    continue
                except (OSError, EOFError, ValueError, httpx.HTTPError) as exc:
                    errors[type(exc).__name__] += 1
                    continue
                dt = time.perf_counter() - sent_at
                if good:
                    if status == 200 and len(json.loads(data)["answers"][0]) == K:
                        latencies.append(dt)
                    else:
                        errors[f"good_got_{status}"] += 1
                elif 400 <= status < 500:
                    counts["rejected"] += 1
                else:
                    errors[f"bad_got_{status}"] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(p) for p in posts))
        wall = time.perf_counter() - t0
    finally:
        await close()
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {
        "concurrency": concurrency, "sent": counts["sent"], "ok": len(latencies), "rejected_4xx": counts["rejected"],
        "errors": dict(errors), "n_errors": int(sum(errors.values())), "wall_s": round(wall, 2),
        "qps": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1), "driver": driver,
    }


def drive_main(args: argparse.Namespace) -> None:
    queries = json.loads(Path(args.queries_file).read_text())
    payloads = _payloads(queries, args.malformed)
    res = asyncio.run(_drive(args.url, payloads, args.concurrency, args.total, args.timeout, args.budget, args.driver))
    print(json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------ orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code in (200, 404):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_driver(url: str, qfile: Path, concurrency: int, total: int, malformed: float, timeout: float,
                budget: float) -> dict:
    cmd = [sys.executable, __file__, "--_drive", url, "--queries-file", str(qfile), "--concurrency", str(concurrency),
           "--total", str(total), "--malformed", str(malformed), "--timeout", str(timeout), "--budget", str(budget),
           "--driver", DRIVER[0]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"driver failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _level(server: str, url: str, qfile: Path, c: int, total: int, malformed: float, timeout: float,
           budget: float) -> dict:
    res = _run_driver(url, qfile, c, total, malformed, timeout, budget)
    res.update(server=server, workload="clean" if not malformed else f"{malformed:.0%} malformed")
    extra = f", 4xx {res['rejected_4xx']}, errors {res['errors']}" if malformed else f", errors {res['n_errors']}"
    print(f"  {server:8s} C={c:3d} {res['workload']:14s}: {res['qps']:7.1f} good q/s  p50 {res['p50_ms']:8.1f} ms"
          f"  p99 {res['p99_ms']:8.1f} ms{extra}", flush=True)
    return res



def _torch_threads() -> int | None:
    """torch's intra-op thread count in this process (printed and recorded with every benchmark), or None."""
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5k passages, fewer requests")
    ap.add_argument("--passages", type=int, default=None, help="index size (default 20000; --quick 5000)")
    ap.add_argument("--mode", default="dense", choices=["bm25", "dense", "hybrid"])
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request client timeout (s)")
    ap.add_argument("--budget", type=float, default=None, help="max seconds per load level (default 45; --quick 25)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--driver", default="raw", choices=["raw", "httpx"],
                    help="load generator: a minimal asyncio HTTP/1.1 client (default) or httpx")
    ap.add_argument("--_drive", dest="drive", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_baseline", dest="baseline", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_inproc", dest="inproc", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--single", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--malformed", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.drive:
        args.url, args.concurrency = args.drive, int(args.concurrency)
        return drive_main(args)
    if args.baseline:
        return run_baseline_server(args.baseline, args.port, args.mode)
    if args.inproc:
        res = in_process(Path(args.inproc), json.loads(Path(args.queries_file).read_text()), args.mode, args.single)
        print(json.dumps(res), flush=True)
        return None

    DRIVER[0] = args.driver
    n = args.passages or (5000 if args.quick else 20000)
    conc = [int(c) for c in args.concurrency.split(",")]
    per = 25 if args.quick else 50
    plan = [(c, max(100, min(c * per, 1600 if not args.quick else 800))) for c in conc]
    mixed = (32, 400 if args.quick else 800)
    budget = args.budget or (25.0 if args.quick else 45.0)
    started = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": os.getloadavg()}
    index, queries = build_or_reuse_index(n)
    qfile = CACHE / f"queries-{n}.json"
    qfile.write_text(json.dumps(queries))

    def ceiling_run(when: str) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--_inproc", str(index), "--queries-file", str(qfile), "--mode", args.mode,
               "--single", str(64 if args.quick else 128)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"in-process ({when}, {args.mode}, k={K}): " + ", ".join(f"{k}: {v:.1f} q/s" for k, v in res.items()),
              flush=True)
        return res

    print(flush=True)
    ceilings = [ceiling_run("before the servers")]
    # Both servers run side by side (an idle server costs nothing) and each load level drives one
    # right after the other, alternating which goes first: the box is shared, so its load drifts,
    # and paired measurements keep the ratios honest. The in-process ceiling is measured before,
    # in the middle and after; its mean is the reference.
    env = dict(os.environ)
    urls = {name: f"http://127.0.0.1:{_free_port()}" for name in ("ours", "baseline")}
    ours = subprocess.Popen(
        [sys.executable, "-m", "medrwr.cli", "serve", "retrieval", "--index", str(index),
         "--port", urls["ours"].rsplit(":", 1)[1], "--set", f"retrieval.mode={args.mode}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = subprocess.Popen(
        [sys.executable, __file__, "--_baseline", str(index), "--port", urls["baseline"].rsplit(":", 1)[1],
         "--mode", args.mode],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    rows: list[dict] = []
    try:
        assert base.stdout is not None
        if "READY" not in base.stdout.readline():
            raise RuntimeError("baseline server did not start")
        _wait_ready(urls["ours"], ours)
        print(f"ours: medrwr serve retrieval at {urls['ours']}; baseline (reference design) at {urls['baseline']}",
              flush=True)
        levels = [(c, total, 0.0) for c, total in plan] + [(mixed[0], mixed[1], 0.2)]
        for i, (c, total, bad) in enumerate(levels):
            order = ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours")
            for name in order:
                rows.append(_level(name, urls[name], qfile, c, total, bad, args.timeout, budget))
            if i == len(levels) // 2 - 1:
                ceilings.append(ceiling_run("between load levels"))
    finally:
        _stop(ours)
        _stop(base)
    ceilings.append(ceiling_run("after the servers"))
    ceiling = {k: float(np.mean([c[k] for c in ceilings])) for k in ceilings[0]}

    table = _table(rows, ceiling) + f"\ntorch threads: {_torch_threads()} (driver; the servers set os.cpu_count())"
    print("\n" + table)
    result = {
        "benchmark": "retrieval_server", "driver": args.driver, "quick": args.quick, "passages": n,
        "mode": args.mode, "k": K,
        "encoder": "all-MiniLM-L6-v2 (packaged)", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                              "python": platform.python_version(),
                                                              "torch_threads": _torch_threads()},
        "load_start": started, "load_end": os.getloadavg(),
        "in_process_qps": {k: round(v, 1) for k, v in ceiling.items()},
        "in_process_runs": ceilings, "rows": rows, "summary": _summary(rows, ceiling),
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"\nwrote {out}")


def _summary(rows: list[dict], ceiling: dict[str, float]) -> dict[str, Any]:
    ours = {r["concurrency"]: r for r in rows if r["server"] == "ours" and r["workload"] == "clean"}
    base = {r["concurrency"]: r for r in rows if r["server"] == "baseline" and r["workload"] == "clean"}
    out: dict[str, Any] = {}
    if 32 in ours and 32 in base:
        out["ours_over_baseline_qps_at_32"] = round(ours[32]["qps"] / max(base[32]["qps"], 1e-9), 2)
        out["ours_over_in_process_batch32_at_32"] = round(ours[32]["qps"] / ceiling["batch_32"], 2)
        out["ours_over_in_process_best_at_32"] = round(ours[32]["qps"] / max(ceiling.values()), 2)
        out["targets"] = {
            ">=5x baseline at 32 clients": out["ours_over_baseline_qps_at_32"] >= 5,
            ">=0.7x in-process batched (batch 32)": out["ours_over_in_process_batch32_at_32"] >= 0.7,
        }
    return out


def _table(rows: list[dict], ceiling: dict[str, float]) -> str:
    base = {(r["concurrency"], r["workload"]): r for r in rows if r["server"] == "baseline"}
    lines = [
        "| clients | workload | ours q/s | ours p50 / p99 ms | ours errors | baseline q/s | baseline p50 / p99 ms "
        "| baseline errors | ours / baseline | ours / in-process (batch 32) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in rows if r["server"] == "ours"):
        b = base.get((r["concurrency"], r["workload"]))
        bq = b["qps"] if b else float("nan")
        lines.append(
            f"| {r['concurrency']} | {r['workload']} | {r['qps']:.1f} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} | "
            f"{r['n_errors']} | {bq:.1f} | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} | {b['n_errors']} | "
            f"{r['qps'] / bq if bq else float('inf'):.1f}x | {r['qps'] / ceiling['batch_32']:.2f} |"
            if b else f"| {r['concurrency']} | {r['workload']} | {r['qps']:.1f} | | | | | | | |"
        )
    lines.append("")
    speeds = ", ".join(f"{k.replace('_', ' ')}: {v:.1f} q/s" for k, v in ceiling.items())
    lines.append(f"in-process (no HTTP; mean of runs before, between and after the load levels): {speeds}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
