"""One training run, GRPO (stages 1-2) or SFT (stage 0), from a :class:`~medrwr.config.Config` to ``--out DIR``.

``DIR`` receives ``config.json`` (the resolved config), ``metrics.jsonl`` (:mod:`medrwr.train.metrics`),
TRL's ``checkpoint-<step>/`` folders and, at the end, ``checkpoint-final/``: a plain Hugging Face folder (LoRA
merged in, processor saved beside it) that ``--set model.name=DIR/checkpoint-final`` loads -- that is how
stage 2 starts from stage 1. A run started again on the same ``DIR`` resumes from its last checkpoint (TRL's
``resume_from_checkpoint``: optimiser, scheduler, RNG states and the sampler position come back, so the data
order is the one the uninterrupted run would have seen).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from medrwr.config import Config
from medrwr.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["RunResult", "load_train_dataset", "run_training", "save_final"]


@dataclass
class RunResult:
    """Where a finished run put its outputs."""

    out_dir: Path
    checkpoint: Path
    metrics: Path
    global_step: int
    resumed_from: str | None = None


def load_train_dataset(cfg: Config) -> Any:
    """The dataset named by ``train.dataset`` (text prompt variant for stage 1, image variant for stage 2)."""
    from medrwr.train.data import load_mcq_dataset

    if not cfg.train.dataset:
        raise ConfigError("train.dataset is not set; point it at a MedQA, MedMCQA or MCQ file "
                          "(e.g. --set train.dataset=data/medqa_train.jsonl)")
    return load_mcq_dataset(cfg.train.dataset, limit=cfg.train.limit, max_pixels=cfg.rollout.max_image_pixels)


def save_final(trainer: Any, processor: Any, out_dir: Path) -> Path:
    """``out_dir/checkpoint-final``: the trained model (LoRA merged) and its processor, written atomically."""
    final = out_dir / "checkpoint-final"
    tmp = out_dir / "checkpoint-final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    main = trainer.accelerator.is_main_process
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):  # peft: a plain HF folder, loadable without peft
        merged = model.merge_and_unload()
        if main:
            merged.save_pretrained(tmp, safe_serialization=True)
    else:
        trainer.save_model(str(tmp))  # every process calls it: ZeRO-3 gathers the shards
    if main:
        processor.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return final


def _last_checkpoint(out_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None


def run_training(
    cfg: Config,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    dataset: Any = None,
    backend: Any = None,
    retriever: Any = None,
    callbacks: Sequence[Any] = (),
) -> RunResult:
    """Train as ``cfg`` says (``train.stage`` 0 = SFT cold start, 1-2 = GRPO) into ``out_dir``.

    ``dataset``, ``backend`` and ``retriever`` replace what the config would load (tests pass a backend whose
    generation is scripted).
    """
    from medrwr.train.metrics import MetricsLogger

    out = Path(out_dir or cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        dataset = load_train_dataset(cfg)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str), encoding="utf-8")
    metrics = MetricsLogger(out / "metrics.jsonl")
    cbs = [metrics.callback(), *callbacks]
    if cfg.train.stage == 0:
        from medrwr.train.sft import build_sft_trainer

        trainer, processor = build_sft_trainer(cfg, dataset, out, backend=backend, retriever=retriever, callbacks=cbs)
    else:
        from medrwr.train.grpo import build_grpo_trainer

        trainer, rollout = build_grpo_trainer(cfg, dataset, out, backend=backend, retriever=retriever, callbacks=cbs)
        processor = rollout.engine.backend.processor
    last = _last_checkpoint(out) if resume else None
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    final = save_final(trainer, processor, out)
    return RunResult(out, final, out / "metrics.jsonl", trainer.state.global_step, last)
