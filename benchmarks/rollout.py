"""Rollout benchmark: the token-exact reason-query-retrieve loop vs plain generation and vs the naive loop.

Run ``python benchmarks/rollout.py --quick`` (under 2 minutes on 2 cores) or without ``--quick``. Prints a
table and writes ``benchmarks/results/rollout.json``.

Policy: the packaged SmolLM2-135M-Instruct (GGUF, CPU, float32), prompted with the protocol. A random or small
model does not write our tags, so every row follows a forced transcript (medrwr.testing.ForcedTranscript) of
several rounds whose think blocks are FREE holes the model samples itself (any token without ``<``/``>``) and
whose answer letter the model picks. Retrieval is an in-memory FakeRetriever (its time is reported separately).

Measured in one run:

1. **RwR loop** (``RolloutEngine`` on ``HFBackend``): wall time, time inside ``generate`` (less the test
   harness's forcing processor, timed separately), retrieval time, and the engine's own overhead = wall -
   generate - retrieval (parsing, batching, span tracking, formatting, tokenising inserted text, prefix
   checks), as a fraction of generation time (target <= 10%).
2. **Plain generate** of the same number of new tokens per row from the same prompts in one call: the cost of
   the multi-turn loop (re-prefilling each turn, per-step log-prob recording, stop checks) as a ratio
   (RwR wall less forcing and retrieval, over plain).
3. **Naive loop**: the same transcript, built the way many implementations do it: decode the model's turn,
   concatenate strings (prompt text + completion text + retrieved text), re-tokenise the whole text each turn,
   and re-tokenise the final completion for training. Counted: turns whose re-tokenised context differs from
   the tokens the model actually produced/was fed, and completion tokens that differ in the final sequence.
   The token-exact engine's prefix check runs on every turn: its mismatch count must be 0.
4. The same naive-vs-exact mismatch count with the Qwen2.5 tokenizer (tiny random Qwen2 LM, fast), where BPE
   merges across block boundaries (``">\\n"``) make the drift visible even in forced text.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "rollout.json"

DOCS = {
    f"d{i}": text
    for i, text in enumerate(
        [
            "Lobar pneumonia shows consolidation with air bronchograms on chest radiographs.",
            "A pneumothorax shows a visceral pleural line without lung markings beyond it.",
            "Pleural effusion blunts the costophrenic angle on an upright chest film.",
            "Pulmonary edema shows bilateral perihilar opacities, Kerley B lines and cardiomegaly.",
            "Atelectasis causes volume loss with displacement of fissures toward the collapsed lobe.",
            "Tuberculosis reactivation favours the apical and posterior segments of the upper lobes.",
        ]
    )
}
QUERIES = ["pneumonia consolidation radiograph", "pleural line pneumothorax", "costophrenic angle effusion",
           "perihilar opacities edema"]


def _allowed_free_ids(tok) -> list[int]:
    """Ordinary tokens for FREE think holes: no angle brackets (no tags), no special tokens."""
    special = set(tok.all_special_ids)
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return [i for i, s in enumerate(texts) if i not in special and s and "<" not in s and ">" not in s
            and s.isprintable()]


def _script(tok, rounds: int, think_tokens: int):
    from medrwr.testing import FREE

    free = FREE(think_tokens, _allowed_free_ids(tok))
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    turns = [["<think>", free, f"</think>\n<query>{QUERIES[r % len(QUERIES)]}</query>"] for r in range(rounds)]
    turns.append(["<think>", free, "</think>\n<answer>", FREE(1, letters), "</answer>"])
    return turns


def _requests(n: int):
    from medrwr.rollout.engine import RolloutRequest

    return [
        RolloutRequest(f"Case {i}: which finding best explains the chest radiograph?",
                       ["pleural effusion", "lobar pneumonia", "pneumothorax", "pulmonary edema"])
        for i in range(n)
    ]


class TimedForcer:
    """Wraps the test harness's forcing processor and times it, so its cost is not booked as generation."""

    def __init__(self, forcer):
        self.forcer = forcer
        self.seconds = 0.0

    def __call__(self, input_ids, scores):
        t0 = time.perf_counter()
        out = self.forcer(input_ids, scores)
        self.seconds += time.perf_counter() - t0
        return out


def run_exact(backend, requests, script, cfg):
    from medrwr.retrieval.base import FakeRetriever
    from medrwr.rollout.engine import RolloutEngine
    from medrwr.testing import ForcedTranscript

    forcer = TimedForcer(ForcedTranscript(backend.tokenizer, script))
    backend.logits_processors = [forcer]
    engine = RolloutEngine(backend, FakeRetriever(DOCS), cfg)
    t0 = time.perf_counter()
    traces = engine.run(requests)
    wall = time.perf_counter() - t0
    return traces, engine.stats, wall, forcer.seconds


def run_plain(backend, requests, engine_for_prompts, n_new: int) -> float:
    """One batched generate of ``n_new`` tokens per row from the same prompts (no loop, no recording)."""
    import torch

    prompts = [engine_for_prompts._prepare(r, i).prompt_ids for i, r in enumerate(requests)]
    width = max(map(len, prompts))
    pad = backend.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        backend.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                               do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=pad)
    return time.perf_counter() - t0


def run_naive(backend, requests, script, cfg, engine_for_prompts) -> dict[str, Any]:
    """The decode / concatenate / re-tokenise loop, with a per-turn forcer so it follows the same script."""
    from medrwr import protocol
    from medrwr.retrieval.base import FakeRetriever
    from medrwr.rollout.backends.base import GenerationState
    from medrwr.testing import ForcedTranscript

    tok = backend.tokenizer
    retriever = FakeRetriever(DOCS)
    rows = []
    for i, r in enumerate(requests):
        messages = engine_for_prompts._messages_for(r, [])
        prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rows.append({"prompt_text": prompt_text, "text": "", "actual": [], "done": False, "fed": None})
    drift_turns = turns = 0
    t0 = time.perf_counter()
    for turn in range(len(script)):
        active = [r for r in rows if not r["done"]]
        if not active:
            break
        backend.logits_processors = [ForcedTranscript(tok, [script[turn]])]
        states = []
        for j, r in enumerate(active):
            ids = tok.encode(r["prompt_text"] + r["text"], add_special_tokens=False)
            if r["fed"] is not None:  # what the model actually conditioned on last turn + what it produced
                turns += 1
                expect = r["fed"] + r["last_out"] + r["last_inserted"]
                if ids != expect:
                    drift_turns += 1
            r["fed"] = ids
            states.append(GenerationState(ids, None, str(j)))
        conts = backend.generate(states, protocol.STOP_STRINGS, cfg.max_new_tokens_per_turn)
        queries = []
        for r, c in zip(active, conts):
            new_text = tok.decode(c.token_ids, skip_special_tokens=True)
            r["text"] += new_text
            r["actual"] += list(c.token_ids)
            r["last_out"], r["last_inserted"] = list(c.token_ids), []
            parsed = protocol.split_segments(new_text)
            qs = [s.content.strip() for s in parsed if s.kind == "query" and s.closed]
            if c.stop_string == protocol.QUERY_STOP and qs:
                queries.append((r, qs[0]))
            else:
                r["done"] = True
        if queries:
            hits = retriever.search([q for _, q in queries], k=3)
            for (r, _), hs in zip(queries, hits):
                block = ("" if r["text"][-1:].isspace() else "\n") + protocol.format_retrieval([h.text for h in hs])
                r["text"] += block
                ins = tok.encode(block, add_special_tokens=False)
                r["actual"] += ins
                r["last_inserted"] = ins
    wall = time.perf_counter() - t0
    # Training on the naive rollout re-tokenises the final completion text.
    rows_affected = mismatched = total = 0
    for r in rows:
        retok = tok.encode(r["text"], add_special_tokens=False)
        sm = difflib.SequenceMatcher(a=r["actual"], b=retok, autojunk=False)
        diff = sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in sm.get_opcodes() if op != "equal")
        mismatched += diff
        total += len(r["actual"])
        rows_affected += diff > 0
    return {"wall_s": wall, "turns_checked": turns, "drift_turns": drift_turns, "rows": len(rows),
            "rows_with_mismatch": rows_affected, "mismatched_tokens": mismatched, "completion_tokens": total}


def _exact_report(traces, stats, wall, forcing_s) -> dict[str, Any]:
    n_model = [t.num_model_tokens for t in traces]
    net = stats.generate_s - forcing_s
    return {
        "wall_s": wall,
        "generate_s": stats.generate_s,
        "forcing_s": forcing_s,
        "generate_net_s": net,
        "retrieval_s": stats.retrieval_s,
        "overhead_s": stats.overhead_s,
        "overhead_frac_of_generate": stats.overhead_s / net if net > 0 else None,
        "generate_calls": stats.generate_calls,
        "retrieval_calls": stats.retrieval_calls,
        "model_tokens": sum(n_model),
        "max_model_tokens_per_row": max(n_model),
        "inserted_tokens": sum(t.num_inserted_tokens for t in traces),
        "rounds": [t.rounds for t in traces],
        "stop_reasons": sorted({t.stop_reason for t in traces}),
        "valid": sum(t.valid for t in traces),
        "prefix_mismatches": 0,  # the engine raises RolloutDriftError on any; reaching here means none
        "turns_checked": sum(t.metadata.get("turns", 0) - 1 for t in traces),
    }


def bench_policy(name: str, backend, batch: int, rounds: int, think_tokens: int, do_plain: bool) -> dict[str, Any]:
    from medrwr.config import RolloutConfig
    from medrwr.rollout.engine import RolloutEngine

    cfg = RolloutConfig(max_rounds=rounds, max_new_tokens_per_turn=think_tokens + 48,
                        max_total_new_tokens=(rounds + 1) * (think_tokens + 48))
    tok = backend.tokenizer
    script = _script(tok, rounds, think_tokens)
    requests = _requests(batch)
    prompt_engine = RolloutEngine(backend, None, cfg)
    # Warm-up (first-call costs) on one row and a one-turn transcript, not timed.
    run_exact(backend, requests[:1], script[-1:], cfg)
    traces, stats, wall, forcing_s = run_exact(backend, requests, script, cfg)
    exact = _exact_report(traces, stats, wall, forcing_s)
    out: dict[str, Any] = {"policy": name, "batch": batch, "rounds": rounds, "think_tokens": think_tokens,
                           "exact": exact}
    if do_plain:
        plain = run_plain(backend, requests, prompt_engine, exact["max_model_tokens_per_row"])
        rwr_net = wall - forcing_s - exact["retrieval_s"]
        out["plain"] = {"wall_s": plain, "new_tokens_per_row": exact["max_model_tokens_per_row"],
                        "rwr_net_s": rwr_net, "rwr_over_plain": rwr_net / plain if plain else None}
    out["naive"] = run_naive(backend, requests, script, cfg, prompt_engine)
    return out


def _table(results: list[dict[str, Any]]) -> str:
    header = (
        "| policy | batch x rounds | model tok | inserted tok | RwR wall s | generate s (forcing) | retrieval s | "
        "engine overhead s (% of generate) | plain generate s (RwR/plain) | naive wall s | naive drift turns | "
        "naive mismatched tok (rows) | exact prefix mismatches |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e, n = r["exact"], r["naive"]
        plain = r.get("plain")
        plain_s = f"{plain['wall_s']:.2f} ({plain['rwr_over_plain']:.2f}x)" if plain else "–"
        lines.append(
            f"| {r['policy']} | {r['batch']} x {r['rounds']} | {e['model_tokens']} | {e['inserted_tokens']} | "
            f"{e['wall_s']:.2f} | {e['generate_net_s']:.2f} ({e['forcing_s']:.2f}) | {e['retrieval_s']:.3f} | "
            f"{e['overhead_s']:.3f} ({100 * e['overhead_frac_of_generate']:.1f}%) | {plain_s} | {n['wall_s']:.2f} | "
            f"{n['drift_turns']}/{n['turns_checked']} | {n['mismatched_tokens']}/{n['completion_tokens']} "
            f"({n['rows_with_mismatch']}/{n['rows']}) | {e['prefix_mismatches']}/{e['turns_checked']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batch and transcript (< 2 minutes)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-qwen", action="store_true", help="skip the tiny-Qwen tokenizer row")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared 2-core box 2 threads run ~5x slower)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from medrwr.rollout.backends.hf import HFBackend, load_hf_policy
    from medrwr.rollout.backends.processing import load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, rounds, think = (2, 2, 12) if args.quick else (4, 3, 32)
    results = []
    t0 = time.perf_counter()
    smol = load_hf_policy(None, seed=0)
    load_s = time.perf_counter() - t0
    print(f"loaded SmolLM2-135M-Instruct (GGUF -> fp32) in {load_s:.1f}s", file=sys.stderr)
    results.append(bench_policy("SmolLM2-135M-Instruct", smol, batch, rounds, think, do_plain=True))
    del smol
    if not args.no_qwen:
        from medrwr.testing import tiny_causal_lm

        folder = tiny_causal_lm()
        qwen = HFBackend(AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder), seed=0)
        results.append(bench_policy("tiny Qwen2 (Qwen2.5 tokenizer)", qwen, batch, rounds, think, do_plain=True))
    table = _table(results)
    print(table)
    payload = {
        "benchmark": "rollout",
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads()},
        "smollm2_load_s": load_s,
        "results": results,
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
