"""Reward throughput: per-reward time per 1,000 traces, against naive baselines measured in the same run.

Run ``python benchmarks/rewards.py --quick`` (about a minute on 2 cores) or without ``--quick`` (more
repetitions). Prints a table and writes ``benchmarks/results/rewards.json``.

Workload: synthetic GRPO batches of 64 rollouts (8 prompts × 8 rollouts; a group shares its question, gold
answer, explanation and image and, as in practice, often its retrieved documents), 0-3 search rounds of 3
documents of ~60-120 words of medical text each, lettered answers. Times exclude model forward passes: the
image encoder is a hash stand-in (its forward is the encoder's cost, not the reward's) and the confidence
gain row times everything but the forward (a stub model that returns zero logits).

Baselines (what a straightforward implementation does; the reference code's approach):

- accuracy / format / length: re-parse every completion string in every reward with regexes
  (``re.search(r"<answer>(.*?)</answer>")``, the reference's ``MultiStepFormatORM`` regexes, ``re.sub`` of
  retrieve blocks), versus ours reading the trace fields (``valid``, ``answer``, ``choice``).
- σq_text: extract entities from every query/document/gold text of every sample separately, no
  de-duplication or memo (the reference ran scispaCy per sample), versus ours (one batched extract over the
  distinct texts, LRU memo across steps). The one-time lexicon compile and its cached load are reported too.
- σq_img: encode each sample's image(s) and queries per sample, versus ours (distinct images once per step,
  LRU cache keyed by content hash).
- total (σc excluded): the sum of the baselines, versus one ``TotalReward`` call (one parse, shared views).
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "rewards.json"

SENTENCES = [
    "Pneumothorax is air in the pleural space and a rim of less than 2 cm is small.",
    "Tension pneumothorax needs immediate needle decompression.",
    "Pleural effusion appears as blunting of the costophrenic angle on a chest radiograph.",
    "Community-acquired pneumonia is treated with amoxicillin or doxycycline in adults.",
    "Pulmonary edema from congestive heart failure shows Kerley B lines and cardiomegaly.",
    "Myocardial infarction presents with chest pain, ST elevation and raised troponin.",
    "Patients with COPD have a reduced FEV1/FVC ratio and hyperinflated lungs.",
    "Pulmonary embolism is diagnosed with CT pulmonary angiography; treat with heparin.",
    "Tuberculosis causes upper lobe cavitation, night sweats and weight loss.",
    "Sarcoidosis shows bilateral hilar lymphadenopathy and non-caseating granulomas.",
    "Asthma is reversible airway obstruction treated with inhaled corticosteroids.",
    "Lung cancer may present as a spiculated nodule larger than 8 mm (<5 mm nodules are low risk).",
]
OPTIONS = [
    ["Pneumonia", "Pneumothorax", "Pleural effusion", "Pulmonary edema"],
    ["Myocardial infarction", "Pulmonary embolism", "Asthma", "Sarcoidosis"],
]


def _doc(rng: random.Random) -> str:
    return " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(4, 8)))


def make_batch(rng: random.Random, n: int = 64, group: int = 8):
    """(traces, completions, columns) for one GRPO step."""
    from medrwr.protocol import extract_choice, format_retrieval, parse_completion
    from medrwr.retrieval.base import Hit
    from medrwr.rollout.trace import RetrievalRecord, RolloutTrace

    traces, texts = [], []
    cols: dict[str, list[Any]] = {"answer": [], "options": [], "explanation": [], "images": []}
    from PIL import Image

    for g in range(n // group):
        opts = OPTIONS[g % 2]
        gold = "ABCD"[g % 4]
        image = Image.new("RGB", (64, 64), (g * 20 % 255, 40, 90))
        shared_docs = [[_doc(rng) for _ in range(3)] for _ in range(3)]
        for _ in range(group):
            rounds = rng.randint(0, 3)
            text, records, queries = "", [], []
            for r in range(rounds):
                q = rng.choice(
                    [
                        "pneumothorax size",
                        "pleural effusion signs",
                        "COPD spirometry",
                        "MI troponin",
                        "tension pneumothorax treatment",
                        "pulmonary edema radiograph",
                    ]
                )
                docs = shared_docs[r] if rng.random() < 0.7 else [_doc(rng) for _ in range(3)]
                text += f"<think>{_doc(rng)[:300]}</think>\n<query>{q}</query>\n{format_retrieval(docs)}"
                records.append(RetrievalRecord(r, [q], [[Hit(str(i), d) for i, d in enumerate(docs)]]))
                queries.append(q)
            letter = gold if rng.random() < 0.5 else rng.choice("ABCD")
            text += (
                f"<think>{_doc(rng)[:400]}</think>\n<answer>{letter}. {opts['ABCD'.index(letter)]}</answer>"
            )
            p = parse_completion(text)
            traces.append(
                RolloutTrace(
                    prompt_ids=[1],
                    completion_text=text,
                    queries=queries,
                    retrievals=records,
                    answer=p.answer,
                    choice=extract_choice(p.answer),
                    valid=p.valid,
                    images=[],
                )
            )
            texts.append(text)
            cols["answer"].append(gold)
            cols["options"].append(opts)
            cols["explanation"].append(SENTENCES[g % len(SENTENCES)])
            cols["images"].append([image])
    return traces, texts, cols


# ------------------------------------------------------------------------------------------- baselines

_ANS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_RET = re.compile(r"<retrieve>.*?</retrieve>", re.DOTALL)
_QRY = re.compile(r"<query>(.*?)</query>", re.DOTALL)


def naive_accuracy(completions, answer, **_):
    from medrwr.protocol import extract_choice

    out = []
    for c, g in zip(completions, answer):
        m = _ANS.search(c)
        out.append(1.0 if m and extract_choice(m.group(1)) == g else 0.0)
    return out


def naive_format(completions, answer, **_):
    from medrwr.protocol import parse_completion

    acc = naive_accuracy(completions, answer)
    out = []
    for c, a in zip(completions, acc):
        p = parse_completion(c)  # re-parsed in every reward, every call
        out.append(float(p.valid) + float(p.valid and p.retrieve_count > 0 and a == 1.0))
    return out


def naive_format_compat(completions, answer, **_):
    """The reference's MultiStepFormatORM regexes, applied directly to the completion."""
    full = re.compile(
        r"^(?:<think>[^<>]*?</think>(?:\s*<query>[^<>]*?</query>\s*<retrieve>[^<>]*?</retrieve>)?\s*)*"
        r"<answer>[^<>]*?</answer>\s*$",
        re.DOTALL,
    )
    acc = naive_accuracy(completions, answer)
    out = []
    for c, a in zip(completions, acc):
        tags = re.findall(r"<[^>]+>", c)
        bad = any(
            t
            not in (
                "<think>",
                "</think>",
                "<query>",
                "</query>",
                "<retrieve>",
                "</retrieve>",
                "<answer>",
                "</answer>",
            )
            for t in tags
        )
        r = 0.0 if bad else (3.0 if a else 1.0) if full.match(c) else 0.0
        r -= 1.0 if re.search(r"[\n\r]{3,}", c) else 0.0
        out.append(r)
    return out


def naive_length(completions, **_):
    return [0.0 if 512 <= len(_RET.sub("", c)) <= 3072 else -1.0 for c in completions]


def naive_semantic(completions, answer, options, explanation, extractor, **_):
    out = []
    for c, g, o, e in zip(completions, answer, options, explanation):
        queries = _QRY.findall(c)
        if not queries:
            out.append(0.0)
            continue
        docs = [m[len("<retrieve>") : -len("</retrieve>")] for m in _RET.findall(c)]
        gold = o["ABCD".index(g)] + "\n" + e
        (G,) = extractor.lexicon_match([gold])
        Q = set().union(*extractor.lexicon_match(queries))
        K = set().union(*extractor.lexicon_match(docs)) if docs else set()
        out.append((len(Q & G) / len(Q) if Q else 0.0) + (len(K & G) / len(K) if K else 0.0))
    return out


def naive_image(completions, images, encoder, **_):
    out = []
    for c, imgs in zip(completions, images):
        queries = _QRY.findall(c)
        if not queries:
            out.append(0.0)
            continue
        I = encoder.encode_images(imgs)
        Q = encoder.encode_texts(queries)
        out.append(float(np.mean(I @ Q.T)))
    return out


class HashEncoder:
    """Joint-encoder stand-in: a content hash per image/text (the reward's overhead, not a model's forward)."""

    name, dim, joint = "hash", 64, True

    def _vec(self, key: bytes) -> np.ndarray:
        import hashlib

        seed = int.from_bytes(hashlib.sha1(key).digest()[:4], "little")
        v = np.random.default_rng(seed).normal(size=self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode_images(self, images, batch_size=32):
        return np.stack([self._vec(im.tobytes()) for im in images])

    def encode_texts(self, texts, batch_size=64):
        return np.stack([self._vec(t.encode()) for t in texts])


class StubLM:
    """A model whose forward returns zero logits: times the confidence reward without a forward pass."""

    training = False

    def __init__(self, vocab: int):
        import torch

        self.vocab = vocab
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self._p

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, input_ids, **kw):
        from types import SimpleNamespace

        import torch

        if not hasattr(self, "_row"):
            self._row = torch.zeros(1, 1, self.vocab)
        return SimpleNamespace(logits=self._row.expand(input_ids.shape[0], 1, self.vocab))


# ----------------------------------------------------------------------------------------------- timing


def _time(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up (caches, lazy loads)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)



def _torch_threads() -> int | None:
    """torch's intra-op thread count in this process (printed and recorded with every benchmark), or None."""
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and repetitions")
    args = ap.parse_args(argv)
    reps = 3 if args.quick else 7
    n_batches = 4 if args.quick else 16  # batches of 64 per repetition
    rng = random.Random(0)

    from medrwr.config import RewardConfig
    from medrwr.rewards import (
        accuracy_reward,
        format_compat_reward,
        format_reward,
        get_query_semantic_image_reward,
        get_total_reward,
        length_reward,
    )
    from medrwr.rewards import entities as E
    from medrwr.rewards import entities_lexicon as L
    from medrwr.rewards.confidence_gain import ConfidenceGainReward
    from medrwr.rewards.query_semantic import get_query_semantic_text_reward

    batches = [make_batch(rng) for _ in range(n_batches)]
    n_traces = 64 * n_batches
    per_k = 1000.0 / n_traces

    t0 = time.perf_counter()
    lex = L.build_lexicon()
    build_s = time.perf_counter() - t0
    L._LEXICONS.clear()
    load_s = _time(lambda: (L._LEXICONS.clear(), L.load_lexicon()), 1)
    extractor = E.LexiconEntityExtractor(lex)
    extractor.lexicon_match = lambda texts: [lex.match(t) for t in texts]  # naive: no memo, no de-duplication
    text_reward = get_query_semantic_text_reward(E.LexiconEntityExtractor(lex))
    image_reward = get_query_semantic_image_reward(HashEncoder())
    total = get_total_reward(
        RewardConfig(confidence_weight=0.0),
        extractor=E.LexiconEntityExtractor(lex),
        image_encoder=HashEncoder(),
    )

    from medrwr.testing import qwen2_5_tokenizer

    tok = qwen2_5_tokenizer()
    conf = ConfidenceGainReward(StubLM(len(tok)), tok, batch_size=16)
    # token ids for the confidence row (built once: the engine records them during the rollout)
    for traces, texts, _ in batches:
        for tr in traces:
            ids, mask = [], []
            from medrwr.protocol import split_segments

            for seg in split_segments(tr.completion_text):
                piece = tok.encode(tr.completion_text[seg.start : seg.end], add_special_tokens=False)
                ids += piece
                mask += [0 if seg.kind == "retrieve" else 1] * len(piece)
            tr.prompt_ids = tok.encode(
                "<|im_start|>user\nWhich finding?\nA. a\nB. b\nC. c\nD. d<|im_end|>\n<|im_start|>assistant\n"
            )
            tr.completion_ids, tr.completion_mask, tr.logprobs = ids, mask, [0.0] * len(ids)

    def run_all(fn: Callable[..., Any], use_traces: bool, **extra):
        def go():
            for traces, texts, cols in batches:
                if use_traces:
                    fn(traces=traces, completions=texts, **cols, **extra)
                else:
                    fn(completions=texts, **cols, **extra)

        return go

    def clear_parse_cache():
        from medrwr.rewards._common import _parse_cached

        _parse_cached.cache_clear()

    def strings_cold(fn):
        def go():
            for traces, texts, cols in batches:
                clear_parse_cache()
                fn(completions=texts, **cols)

        return go

    rows = []

    def row(name, ours_fn, base_fn=None, strings_fn=None, note=""):
        ours = _time(ours_fn, reps) * per_k * 1000
        strings = _time(strings_fn, reps) * per_k * 1000 if strings_fn else None
        base = _time(base_fn, reps) * per_k * 1000 if base_fn else None
        rows.append(
            {
                "reward": name,
                "ours_traces_ms_per_1k": ours,
                "ours_strings_ms_per_1k": strings,
                "baseline_ms_per_1k": base,
                "speedup": (base / ours) if base else None,
                "note": note,
            }
        )

    row(
        "accuracy",
        run_all(accuracy_reward, True),
        run_all(naive_accuracy, False),
        strings_cold(accuracy_reward),
    )
    row("format", run_all(format_reward, True), run_all(naive_format, False), strings_cold(format_reward))
    row(
        "format_compat",
        run_all(format_compat_reward, True),
        run_all(naive_format_compat, False),
        strings_cold(format_compat_reward),
        "both regex-based over the text",
    )
    row("length", run_all(length_reward, True), run_all(naive_length, False), strings_cold(length_reward))
    row(
        "query_semantic_text",
        run_all(text_reward, True),
        run_all(lambda **kw: naive_semantic(extractor=extractor, **kw), False),
        strings_cold(text_reward),
        "ours warm (memo across steps)",
    )
    row(
        "query_semantic_image",
        run_all(image_reward, True),
        run_all(lambda **kw: naive_image(encoder=HashEncoder(), **kw), False),
        None,
        "hash encoder stand-in",
    )

    def naive_total():
        for traces, texts, cols in batches:
            naive_accuracy(texts, **cols), naive_format(texts, **cols), naive_length(texts)
            (
                naive_semantic(texts, extractor=extractor, **cols),
                naive_image(texts, encoder=HashEncoder(), **cols),
            )

    row("total (σc excluded)", run_all(total, True), naive_total, strings_cold(total))
    row(
        "confidence_gain (no forward)",
        run_all(conf, True),
        None,
        None,
        "stub model: answer location, batching",
    )

    step_ms = (
        sum(
            r["ours_traces_ms_per_1k"]
            for r in rows
            if r["reward"] in ("total (σc excluded)", "confidence_gain (no forward)")
        )
        * 64
        / 1000
    )

    hdr = f"{'reward':30s} {'ours/traces':>12s} {'ours/strings':>13s} {'baseline':>10s} {'speedup':>8s}  note"
    print(f"Reward time per 1,000 traces (ms), median of {reps}; {n_traces} traces in batches of 64; "
          f"torch threads: {_torch_threads()}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        s = f"{r['ours_strings_ms_per_1k']:.1f}" if r["ours_strings_ms_per_1k"] is not None else "-"
        b = f"{r['baseline_ms_per_1k']:.1f}" if r["baseline_ms_per_1k"] is not None else "-"
        x = f"{r['speedup']:.1f}x" if r["speedup"] else "-"
        print(f"{r['reward']:30s} {r['ours_traces_ms_per_1k']:12.1f} {s:>13s} {b:>10s} {x:>8s}  {r['note']}")
    print(
        f"\nAll rewards for one step of 64 traces (total + confidence-gain overhead, no forwards): {step_ms:.1f} ms"
    )
    print(
        f"Lexicon: compile from the packaged sources {build_s:.1f} s (once), load from the JSON cache {load_s:.2f} s"
    )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": "rewards",
        "quick": args.quick,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch_threads": _torch_threads(),
        "n_traces": n_traces,
        "repetitions": reps,
        "rows": rows,
        "step_of_64_ms": step_ms,
        "lexicon_compile_s": build_s,
        "lexicon_cached_load_s": load_s,
        "lexicon": {
            "concepts": len(lex.concepts),
            "phrases": len(lex.phrases),
            "abbreviations": len(lex.abbreviations),
        },
    }
    write_json_atomic(RESULTS, out)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
