"""GRPO step benchmark: seconds per step on the tiny Qwen2.5-VL, with and without retrieval, split by phase.

Run ``python benchmarks/train.py --quick`` (about a minute on 2 cores) or without ``--quick`` for more steps.
Prints a table and writes ``benchmarks/results/train.json`` (``--out``).

Setup: the tiny random Qwen2.5-VL from ``medrwr.testing`` (real Qwen vocabulary, 152k), one image per question
(the image variant of the prompt), TRL's ``GRPOTrainer`` built by ``medrwr.train.grpo`` (groups of 4, 4
completions per step, beta 0.001 so the frozen reference runs), the total reward of stage 2 (accuracy, format,
query-semantic text, confidence gain). A random model writes no tags, so generation follows a forced transcript
(``medrwr.testing.ForcedTranscript``) whose answer letter the model samples:

* **with retrieval**: ``<think>..</think><query>..</query>`` -> a real in-process BM25 index (k=3) inserts a
  retrieve block -> ``<think>..</think><answer>X</answer>``;
* **without**: the same model-written tokens in one turn (the query text written inside a think block), no
  retriever call, no inserted block, ``rollout.max_rounds: 0``.

Phases per step (mean over the measured steps, after one warm-up step): generation (time inside the backend's
``generate``), retrieval (the retriever call), rewards (every reward function), reference forward (the frozen
model's log-probs), training forward + backward + optimiser (the rest of ``training_step`` after inputs were
prepared), other (TRL's bookkeeping: padding, image processing, gathering). Also the LM head variants
(``train.logprob_head``: ``plain`` vs TRL's ``fused``) on the with-retrieval step. The torch thread count is
recorded (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
DEFAULT_OUT = ROOT / "results" / "train.json"

CORPUS = [
    "Community-acquired pneumonia presents with fever, productive cough and lobar consolidation.",
    "Pleural effusion blunts the costophrenic angle on an upright chest radiograph.",
    "Cardiomegaly is a cardiothoracic ratio above 0.5 on a posteroanterior film.",
    "Pneumothorax shows a visceral pleural line with absent lung markings beyond it.",
    "Pulmonary oedema gives bat-wing perihilar opacities and Kerley B lines.",
    "Tuberculosis reactivation favours the apical and posterior upper lobe segments.",
]


class _Timed:
    """Wraps a callable and adds its wall time to ``sink[key]``."""

    def __init__(self, fn: Any, sink: dict[str, float], key: str):
        self.fn, self.sink, self.key = fn, sink, key
        self.__name__ = getattr(fn, "__name__", key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.sink[self.key] = self.sink.get(self.key, 0.0) + time.perf_counter() - t0


def _setup(tmp: Path, model: str = "tiny-vlm") -> tuple[str, Path, Any]:
    from PIL import Image

    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import build_index
    from medrwr.testing import tiny_qwen2_5_vl
    from medrwr.train.data import MCQSample, build_dataset

    index = build_index([Document(f"d{i}", "chest", t) for i, t in enumerate(CORPUS)], tmp / "idx",
                        dense=False, show_progress=False)
    img = tmp / "film.png"
    Image.radial_gradient("L").convert("RGB").resize((96, 96)).save(img)
    images = [str(img)] if model == "tiny-vlm" else []
    samples = [MCQSample(f"Which finding does film {i} show?", ["Effusion", "Cardiomegaly", "Pneumothorax"],
                         "B", "Cardiomegaly: cardiothoracic ratio above 0.5.", images) for i in range(32)]
    if model == "smollm2":  # the packaged default policy, converted once into the cache (text only)
        from medrwr.assets import smollm2_gguf_path
        from medrwr.rollout.backends.policy_cache import convert_gguf_policy

        return str(convert_gguf_policy(smollm2_gguf_path())), index, build_dataset(samples)
    return tiny_qwen2_5_vl(), index, build_dataset(samples)


def _run(model_dir: str, index: Path, dataset: Any, *, retrieval: bool, head: str, steps: int, tmp: Path,
         threads: int) -> dict[str, Any]:
    import torch

    from medrwr.config import load_config
    from medrwr.rollout.backends.hf import load_hf_policy
    from medrwr.testing import FREE, ForcedTranscript
    from medrwr.train.grpo import build_grpo_trainer, build_rewards

    cfg = load_config(None, [
        f"model.name={model_dir}", f"model.threads={threads}", "rollout.temperature=1.0",
        "rollout.max_new_tokens_per_turn=48", "rollout.max_total_new_tokens=96", "rollout.max_inserted_tokens=96",
        f"rollout.max_rounds={1 if retrieval else 0}", f"retrieval.index={index}", "retrieval.mode=bm25",
        "retrieval.k=3", f"train.stage={2 if 'images' in dataset.column_names and dataset[0]['images'] else 1}",
        "train.num_generations=4", "train.per_device_batch_size=4",
        f"train.max_steps={steps + 1}", "train.beta=0.001", "train.learning_rate=0.0001", f"train.logprob_head={head}",
        "train.trl={save_steps: 100000}",
    ])
    backend = load_hf_policy(model_dir, temperature=1.0, seed=0)
    tok = backend.tokenizer
    letters = FREE(1, [tok.convert_tokens_to_ids(c) for c in "ABC"])
    think = "<think>The film shows a large cardiac silhouette relative to the chest width.</think>"
    answer = ["<think>The ratio criterion fits option B best.</think><answer>", letters, "</answer>"]
    query = "<query>cardiothoracic ratio enlarged heart</query>"
    # without retrieval the model writes the same tokens in one turn (the query text inside a think block)
    script = [think + query, answer] if retrieval else [
        [think + query.replace("query>", "think>") + answer[0], letters, answer[2]]]
    backend.logits_processors = [ForcedTranscript(tok, script)]
    sink: dict[str, float] = {}
    funcs, weights = build_rewards(cfg, model=backend.model, processing_class=backend.processor)
    funcs = [_Timed(f, sink, "rewards") for f in funcs]
    trainer, rollout = build_grpo_trainer(cfg, dataset, tmp / f"run-{retrieval}-{head}", backend=backend,
                                          reward_funcs=funcs, reward_weights=weights)
    engine = rollout.engine
    if trainer.ref_model is not None:
        trainer.ref_model.forward = _Timed(trainer.ref_model.forward, sink, "reference_forward")
    trainer._generate_and_score_completions = _Timed(trainer._generate_and_score_completions, sink, "prepare")
    trainer.training_step = _Timed(trainer.training_step, sink, "step")
    per_step: list[dict[str, float]] = []

    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sink.clear()
            self.g, self.r = engine.stats.generate_s, engine.stats.retrieval_s
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            row = {
                "total": time.perf_counter() - self.t0,
                "generation": engine.stats.generate_s - self.g,
                "retrieval": engine.stats.retrieval_s - self.r,
                "rewards": sink.get("rewards", 0.0),
                "reference_forward": sink.get("reference_forward", 0.0),
                "train_fwd_bwd": sink.get("step", 0.0) - sink.get("prepare", 0.0),
            }
            row["other"] = row["total"] - sum(v for k, v in row.items() if k != "total")
            per_step.append(row)

    trainer.add_callback(Snap())
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    torch.manual_seed(0)
    trainer.train()
    measured = per_step[1:]  # the first step warms up (allocator, stop-string caches)
    mean = {k: sum(r[k] for r in measured) / len(measured) for k in measured[0]}
    traces = rollout.last["traces"]
    return {
        "retrieval": retrieval, "logprob_head": head, "steps": len(measured), "mean_s": mean,
        "rounds": sum(t.rounds for t in traces) / len(traces),
        "completion_tokens": sum(len(c) for c in rollout.last["completion_ids"]) / len(traces),
        "model_tokens": sum(sum(m) for m in rollout.last["env_mask"]) / len(traces),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 measured steps per setting (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/train[-MODEL].json)")
    ap.add_argument("--no-fused", action="store_true", help="skip the fused-head comparison")
    ap.add_argument("--model", choices=["tiny-vlm", "smollm2"], default="tiny-vlm",
                    help="tiny random Qwen2.5-VL (default) or the packaged SmolLM2-135M (text, stage 1)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT if args.model == "tiny-vlm" else DEFAULT_OUT.with_name(f"train-{args.model}.json")
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    steps = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir, index, dataset = _setup(tmp, args.model)
        runs = [
            _run(model_dir, index, dataset, retrieval=False, head="plain", steps=steps, tmp=tmp, threads=args.threads),
            _run(model_dir, index, dataset, retrieval=True, head="plain", steps=steps, tmp=tmp, threads=args.threads),
        ]
        if not args.no_fused:
            runs.append(_run(model_dir, index, dataset, retrieval=True, head="fused", steps=steps, tmp=tmp,
                             threads=args.threads))
    phases = list(runs[0]["mean_s"])
    head = f"{'setting':<28}" + "".join(f"{p:>19}" for p in phases) + f"{'tokens':>9}"
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(head)
    for r in runs:
        name = f"{'retrieval' if r['retrieval'] else 'no retrieval'} / {r['logprob_head']} head"
        print(f"{name:<28}" + "".join(f"{r['mean_s'][p]:>19.3f}" for p in phases) + f"{r['completion_tokens']:>9.0f}")
    ratio = runs[1]["mean_s"]["total"] / runs[0]["mean_s"]["total"]
    print(f"step with retrieval / without: {ratio:.2f}x (target <= 1.2x)")
    result = {"runs": runs, "ratio_retrieval_over_none": ratio, "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(), "quick": args.quick,
              "model": {"tiny-vlm": "tiny Qwen2.5-VL (medrwr.testing), 152k vocabulary",
                        "smollm2": "SmolLM2-135M-Instruct (packaged GGUF, converted), 49k vocabulary"}[args.model], "when": time.strftime("%Y-%m-%d %H:%M")}
    if len(runs) > 2:
        result["ratio_fused_over_plain"] = runs[2]["mean_s"]["total"] / runs[1]["mean_s"]["total"]
        print(f"fused LM head / plain (with retrieval): {result['ratio_fused_over_plain']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
