"""Rollout benchmark: the token-exact reason-query-retrieve loop vs plain generation and vs the naive loop.

Run ``python benchmarks/rollout.py --quick`` (sections 1-4 under 2 minutes on 2 cores; section 5, 50 questions
twice, about 10 more: ``--no-constrained`` skips it) or without ``--quick``. Prints a table and writes
``benchmarks/results/rollout.json``.

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
5. **Constrained decoding** (``rollout.constrain: protocol``, llguidance): SmolLM2 answers questions built from
   the default KB (HPO definitions -> "which term is defined as ...?", 4 options; ``--questions``, 50), with no
   forcing at all, greedy, once free and once constrained: grammar-valid rate, rollouts with at least one query,
   answers inside the options, accuracy, tokens/s. The tokens/s cost is also measured where the texts are the
   same: the grammar processor's own share of generation time, and one first-turn ``generate`` over the same
   prompts with and without the grammar. Retrieval is an in-memory FakeRetriever over the HPO passages.

Every run prints and records the torch thread count (``--threads``, default 1).
KV-cache reuse across turns (``rollout.kv_cache``), on vs off: ``--cache`` runs ``benchmarks/rollout_kv.py``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic

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

    prompts = [engine_for_prompts._prepare(r, i).transcript.prompt_ids for i, r in enumerate(requests)]
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


def kb_questions(n: int, seed: int = 0):
    """``n`` multiple-choice questions from the default KB's HPO passages (definition -> term, 4 options), and
    the passages as a FakeRetriever corpus. Deterministic."""
    import itertools
    import random

    from medrwr.kb.default import iter_default_kb_documents
    from medrwr.rollout.engine import RolloutRequest

    docs = list(itertools.islice(iter_default_kb_documents(["HPO"]), 2000))

    def definition(d) -> str:
        body = d.text.split("). ", 1)[1] if "). " in d.text else ""
        return body.split(". ")[0].strip().rstrip(".")

    cands = [d for d in docs if 40 <= len(definition(d)) <= 200 and "<" not in d.title and ">" not in d.title]
    rng = random.Random(seed)
    picked = cands[:: max(1, len(cands) // n)][:n]
    titles = sorted({c.title for c in cands})
    requests, gold = [], []
    for i, d in enumerate(picked):
        opts = rng.sample([t for t in titles if t != d.title], 3)
        at = rng.randrange(4)
        opts.insert(at, d.title)
        requests.append(RolloutRequest(f"Which term is defined as: {definition(d)}?", opts, request_id=f"kb{i}"))
        gold.append("ABCD"[at])
    return requests, gold, {d.doc_id: d.text for d in docs}


class _GrammarTimer:
    """Times GrammarLogitsProcessor calls (mask computation and application) across a run."""

    def __enter__(self):
        from medrwr.rollout import constrain

        self.cls, self.orig, self.seconds = constrain.GrammarLogitsProcessor, constrain.GrammarLogitsProcessor.__call__, 0.0
        timer = self

        def timed(proc, input_ids, scores):
            t0 = time.perf_counter()
            try:
                return timer.orig(proc, input_ids, scores)
            finally:
                timer.seconds += time.perf_counter() - t0

        self.cls.__call__ = timed
        return self

    def __exit__(self, *exc):
        self.cls.__call__ = self.orig


def bench_constrained(backend, n_questions: int, batch: int, think_tokens: int,
                      modes: tuple[str, ...] = ("none", "protocol")) -> dict[str, Any]:
    """Section 5: SmolLM2 free vs constrained on KB questions (no forcing), plus matched tokens/s."""
    from medrwr.config import RolloutConfig
    from medrwr.retrieval.base import FakeRetriever
    from medrwr.rollout.backends.base import GenerationState
    from medrwr.rollout.engine import RolloutEngine

    backend.logits_processors = []
    requests, gold, docs = kb_questions(n_questions)
    retriever = FakeRetriever(docs)
    out: dict[str, Any] = {"questions": len(requests), "batch": batch, "think_tokens": think_tokens}
    for mode in modes:
        cfg = RolloutConfig(max_rounds=2, max_new_tokens_per_turn=think_tokens + 40,
                            max_total_new_tokens=3 * (think_tokens + 40), temperature=0.0, constrain=mode,
                            constrain_max_think_tokens=think_tokens, constrain_max_query_tokens=16)
        engine = RolloutEngine(backend, retriever, cfg)
        traces = []
        t0 = time.perf_counter()
        with _GrammarTimer() as gt:
            for b in range(0, len(requests), batch):
                traces += engine.run(requests[b : b + batch])
        wall = time.perf_counter() - t0
        st = engine.stats
        out[mode] = {
            "wall_s": wall,
            "generate_s": st.generate_s,
            "model_tokens": st.model_tokens,
            "tokens_per_s": st.model_tokens / st.generate_s if st.generate_s else None,
            "grammar_s": gt.seconds,
            "grammar_frac_of_generate": gt.seconds / st.generate_s if st.generate_s else 0.0,
            "valid": sum(t.valid for t in traces),
            "with_query": sum(t.rounds > 0 for t in traces),
            "choice_in_options": sum(t.choice is not None and t.choice in "ABCD" for t in traces),
            "correct": sum(t.choice == g for t, g in zip(traces, gold)),
            "stop_reasons": {r: sum(t.stop_reason == r for t in traces) for r in sorted({t.stop_reason for t in traces})},
            "example": traces[0].completion_text[:600],
        }
    # Matched A/B: the same prompts one at a time (batch 1: no padding steps for rows that stopped early),
    # free and constrained interleaved so load drift on a shared machine hits both alike.
    engine = RolloutEngine(backend, None, RolloutConfig(max_rounds=2, constrain="protocol",
                                                         constrain_max_think_tokens=think_tokens))
    budget = think_tokens + 40
    tokens = {"none": 0, "protocol": 0}
    seconds = {"none": 0.0, "protocol": 0.0}
    for i, req in enumerate(requests[:6]):
        row = engine._prepare(req, i)
        state = GenerationState(row.transcript.next_input(), None, row.request_id)
        grammar = engine.turn_grammar(row, budget)
        for mode, cons in (("none", None), ("protocol", [grammar])):
            t0 = time.perf_counter()
            (cont,) = backend.generate([state], ("</query>", "</answer>"), budget, constraints=cons)
            seconds[mode] += time.perf_counter() - t0
            tokens[mode] += len(cont.token_ids)
    ab = {m: tokens[m] / seconds[m] for m in tokens}
    ab["prompts"] = min(6, len(requests))
    ab["cost_frac"] = 1 - ab["protocol"] / ab["none"]
    out["matched_first_turn_tokens_per_s"] = ab
    return out


def _constrained_table(c: dict[str, Any], threads: int) -> str:
    lines = [
        (f"Constrained decoding, SmolLM2-135M-Instruct on {c['questions']} default-KB questions "
         f"(greedy, batch {c['batch']}, torch threads {threads})"),
        ("| decoding | grammar-valid | with >= 1 query | choice in options | correct | model tok | tok/s | "
         "grammar share of generate |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("none", "protocol"):
        if mode not in c:
            continue
        r = c[mode]
        n = c["questions"]
        lines.append(
            f"| {mode} | {r['valid']}/{n} | {r['with_query']}/{n} | {r['choice_in_options']}/{n} | {r['correct']}/{n} | "
            f"{r['model_tokens']} | {r['tokens_per_s']:.2f} | {100 * r['grammar_frac_of_generate']:.1f}% |"
        )
    ab = c["matched_first_turn_tokens_per_s"]
    lines.append(
        f"Matched first turn (same {ab['prompts']} prompts, batch 1): {ab['none']:.2f} tok/s free, "
        f"{ab['protocol']:.2f} tok/s "
        f"constrained: cost {100 * ab['cost_frac']:.1f}%"
    )
    return "\n".join(lines)


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
    ap.add_argument("--questions", type=int, default=50, help="default-KB questions for the constrained section")
    ap.add_argument("--only-constrained", action="store_true", help="run only section 5 (constrained decoding)")
    ap.add_argument("--no-constrained", action="store_true", help="skip section 5 (constrained decoding)")
    ap.add_argument("--think", type=int, default=None,
                    help="section 5: think-block cap in tokens (default: rollout.constrain_max_think_tokens)")
    ap.add_argument("--modes", default="none,protocol", help="section 5: decodings to run (none,protocol)")
    ap.add_argument("--cache", action="store_true",
                    help="run only the KV-cache reuse benchmark (benchmarks/rollout_kv.py: RwR/plain, reuse on vs off)")
    args = ap.parse_args(argv)
    if args.cache:
        import rollout_kv

        return rollout_kv.main((["--quick"] if args.quick else []) + ["--threads", str(args.threads)])

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
    print(f"loaded SmolLM2-135M-Instruct (GGUF -> fp32) in {load_s:.1f}s; torch threads {torch.get_num_threads()}",
          file=sys.stderr)
    if not args.only_constrained:
        results.append(bench_policy("SmolLM2-135M-Instruct", smol, batch, rounds, think, do_plain=True))
    constrained = None
    if not args.no_constrained:
        from medrwr.config import RolloutConfig

        think_cap = args.think or RolloutConfig().constrain_max_think_tokens  # what `medrwr ask` uses
        constrained = bench_constrained(smol, args.questions, batch=10, think_tokens=think_cap,
                                        modes=tuple(args.modes.split(",")))
    del smol
    if not args.no_qwen and not args.only_constrained:
        from medrwr.testing import tiny_causal_lm

        folder = tiny_causal_lm()
        qwen = HFBackend(AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder), seed=0)
        results.append(bench_policy("tiny Qwen2 (Qwen2.5 tokenizer)", qwen, batch, rounds, think, do_plain=True))
    table = f"torch threads: {torch.get_num_threads()}\n" + (_table(results) if results else "")
    if constrained is not None:
        table += "\n\n" + _constrained_table(constrained, torch.get_num_threads())
    print(table)
    payload = {
        "benchmark": "rollout",
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads()},
        "smollm2_load_s": load_s,
        "results": results,
        "constrained": constrained,
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, payload)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
