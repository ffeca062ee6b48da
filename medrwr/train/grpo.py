"""GRPO stages 1 and 2 on TRL's ``GRPOTrainer``, with our rollout engine as its ``rollout_func``.

This module only builds objects and hands them to TRL (as ``trl/scripts/grpo.py`` does): the policy and its
processor (:func:`medrwr.rollout.backends.build_backend`), the retriever (:func:`medrwr.retrieval.open.open_retriever`),
the engine, the rewards by registry name, a ``GRPOConfig`` whose every paper setting comes from our config, and
the callbacks that write ``metrics.jsonl``. What TRL 1.16 needs from us (docs/stack.md):

* ``rollout_func`` returns ``prompt_ids``, ``completion_ids``, ``logprobs`` and ``env_mask`` (1 = model token,
  0 = inserted retrieve token; TRL multiplies it into the loss mask) plus ``traces`` for the rewards.
* Generation runs on the trainer's own model under ``trl.models.utils.unwrap_model_for_generation`` (DDP /
  ZeRO-3 unwrapping; KV cache back on under gradient checkpointing), in eval mode (no dropout).
* A completion that ended at ``</answer>`` gets the end-of-turn token appended (mask 1, log-prob None, which
  TRL turns into NaN and leaves out of vLLM's importance ratio), so TRL does not count it as clipped and the
  policy learns to stop after its answer.
* ``GRPOConfig.temperature`` equals ``rollout.temperature`` (TRL divides the logits by it in training).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrwr.config import Config
from medrwr.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["MetricsReward", "TrainRollout", "build_grpo_config", "build_grpo_trainer", "build_rewards"]


class TrainRollout:
    """TRL's ``rollout_func(prompts, trainer)``: our engine on the trainer's model, end token appended.

    ``last`` keeps the most recent batch (ids, masks, traces) for tests and the metrics reward.
    """

    __name__ = "medrwr_rollout"

    def __init__(self, engine: Any, eos_token_id: int):
        self.engine = engine
        self.eos_token_id = int(eos_token_id)
        self.last: dict[str, Any] | None = None
        self.masks: Any = None
        """A ``logprob_head.CompletionMasks`` the plain log-prob head reads, set when that head is used."""

    def _use_trl_vllm(self, trainer: Any) -> bool:
        """With ``train.trl: {use_vllm: true, vllm_mode: colocate}`` generate on TRL's vLLM engine, whose
        weights TRL syncs from the policy before every rollout (untested here: GPU only)."""
        llm = getattr(getattr(trainer, "vllm_generation", None), "llm", None)
        if not getattr(trainer, "use_vllm", False) or llm is None:
            return False
        if not getattr(self.engine.backend, "_medrwr_trl_vllm", False):
            from medrwr.rollout.backends.vllm import VLLMBackend

            hf = self.engine.backend
            backend = VLLMBackend(llm, hf.processor, temperature=trainer.temperature, top_p=trainer.args.top_p,
                                  eos_token_ids=sorted(hf.eos_token_ids()))
            backend._medrwr_trl_vllm = True
            self.engine.backend = backend
        return True

    def __call__(self, prompts: Sequence[Any], trainer: Any = None) -> dict[str, Any]:
        backend = self.engine.backend
        if trainer is None or self._use_trl_vllm(trainer) or not hasattr(backend, "model"):
            out = self.engine.rollout_batch(list(prompts))
        else:
            from trl.models.utils import unwrap_model_for_generation

            with unwrap_model_for_generation(
                trainer.model_wrapped, trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            ) as model:
                backend.model = model
                was_training = model.training
                model.eval()
                try:
                    out = self.engine.rollout_batch(list(prompts))
                finally:
                    model.train(was_training)
        self._append_end(out)
        if self.masks is not None:
            self.masks.record(out["completion_ids"], out["env_mask"])
        self.last = out
        return out

    def _append_end(self, out: dict[str, Any]) -> None:
        for i, trace in enumerate(out["traces"]):
            if trace.stop_reason == "answer":  # ended at </answer>: close the turn as a chat model would
                out["completion_ids"][i].append(self.eos_token_id)
                out["env_mask"][i].append(1)
                out["logprobs"][i].append(None)


class MetricsReward:
    """A weight-0 reward that only logs: accuracy, retrieval rate, mean rounds, valid rate (never changes σ)."""

    __name__ = "metrics"

    def __call__(self, completions=None, traces=None, answer=None, **kwargs: Any) -> list[float]:
        from medrwr.rewards import accuracy_reward

        n = len(traces) if traces is not None else len(completions or [])
        log = kwargs.get("log_metric")
        if callable(log) and n:
            acc = accuracy_reward(completions=completions, traces=traces, answer=answer, **kwargs)
            log("medrwr/accuracy", sum(acc) / n)
            if traces is not None:
                log("medrwr/retrieval_rate", sum(1 for t in traces if t.rounds > 0) / n)
                log("medrwr/mean_rounds", sum(t.rounds for t in traces) / n)
                log("medrwr/valid_rate", sum(1 for t in traces if t.valid) / n)
                log("medrwr/answered_rate", sum(1 for t in traces if t.stop_reason == "answer") / n)
        return [0.0] * n


def build_rewards(cfg: Config, model: Any = None, processing_class: Any = None) -> tuple[list[Any], list[float]]:
    """The reward functions named in ``train.rewards`` and their weights, plus the weight-0 metrics logger.

    A name with a ``rewards.*_weight`` field gets that weight; ``total`` (already weighted) gets 1.
    """
    from medrwr.rewards.registry import get_reward, get_spec

    if not cfg.train.rewards:
        raise ConfigError("train.rewards is empty; name at least one reward (e.g. [total])")
    funcs, weights = [], []
    for name in cfg.train.rewards:
        try:
            spec = get_spec(name)
        except ValueError as exc:
            raise ConfigError(f"train.rewards: {exc}") from None
        funcs.append(get_reward(name, cfg.rewards, model=model, processing_class=processing_class))
        weights.append(float(getattr(cfg.rewards, spec.weight)) if spec.weight else 1.0)
    funcs.append(MetricsReward())
    weights.append(0.0)
    return funcs, weights


def build_grpo_config(cfg: Config, output_dir: str | Path, *, reward_weights: Sequence[float] | None = None) -> Any:
    """``trl.GRPOConfig`` from our config: paper settings from ``train``/``rollout``, the rest from ``train.trl``."""
    import torch
    from trl import GRPOConfig

    t, r = cfg.train, cfg.rollout
    if r.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0 for GRPO (group samples must differ); the paper uses 1.0")
    cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_generations=t.num_generations,
        per_device_train_batch_size=t.per_device_batch_size,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio (warmup_ratio is deprecated)
        beta=t.beta,
        epsilon=t.epsilon,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16 and not cpu,
        use_cpu=cpu,
        temperature=r.temperature,
        top_p=r.top_p,
        max_completion_length=r.max_total_new_tokens + (r.max_rounds + 1) * r.max_inserted_tokens,
        loss_type="bnpo",  # token-level loss averaged over the unmasked tokens of the batch (paper §3)
        scale_rewards="group",  # (r - mean) / (std + 1e-4) within the group
        num_iterations=1,  # on-policy
        mask_truncated_completions=False,
        gradient_checkpointing=not cpu,
        logging_steps=1,
        save_steps=50,
        report_to="none",
        reward_weights=list(reward_weights) if reward_weights is not None else None,
    )
    valid = set(GRPOConfig.__dataclass_fields__)
    for key, value in t.trl.items():
        if key not in valid:
            raise ConfigError(f"train.trl.{key} is not a GRPOConfig field (TRL 1.16); see trl.GRPOConfig")
        if key in ("temperature", "num_generations", "beta", "epsilon", "learning_rate"):
            raise ConfigError(f"train.trl.{key}: set it through train.* / rollout.* (one place per setting)")
        kwargs[key] = value
    return GRPOConfig(**kwargs)


def peft_config(cfg: Config) -> Any:
    """A LoRA config (rank ``train.lora``) on every linear layer of the language model, or None."""
    if not cfg.train.lora:
        return None
    from medrwr._imports import require

    peft = require("peft", "train", "LoRA training")
    return peft.LoraConfig(
        r=cfg.train.lora, lora_alpha=2 * cfg.train.lora, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",  # not the ViT
    )


def build_grpo_trainer(
    cfg: Config,
    dataset: Any,
    output_dir: str | Path,
    *,
    backend: Any = None,
    retriever: Any = None,
    callbacks: Sequence[Any] = (),
    reward_funcs: Sequence[Any] | None = None,
    reward_weights: Sequence[float] | None = None,
) -> tuple[Any, TrainRollout]:
    """``(GRPOTrainer, rollout)`` ready for ``trainer.train()``; pass ``backend``/``retriever`` to reuse them."""
    import torch
    from trl import GRPOTrainer

    from medrwr.rollout.backends import build_backend
    from medrwr.rollout.engine import engine_from_config

    if backend is None:
        backend = build_backend(cfg.model, cfg.rollout)
    if abs(getattr(backend, "temperature", cfg.rollout.temperature) - cfg.rollout.temperature) > 1e-9:
        raise ConfigError("the policy backend samples at a different temperature than rollout.temperature")
    if "images" in dataset.column_names and not backend.supports_images:
        raise ConfigError("the dataset has images but the policy is text-only; use a VLM (model.name) for stage 2")
    model, processor = backend.model, backend.processor
    if reward_funcs is None:
        reward_funcs, reward_weights = build_rewards(cfg, model=model, processing_class=processor)
    if retriever is None and cfg.rollout.max_rounds > 0:
        from medrwr.retrieval.open import open_retriever

        retriever = open_retriever(cfg)
    engine = engine_from_config(cfg, backend=backend, retriever=retriever) if retriever is not None else None
    if engine is None:
        from medrwr.rollout.engine import RolloutEngine

        engine = RolloutEngine(backend, None, cfg.rollout, k=cfg.retrieval.k, constrain="none")
    if engine.constrain:
        raise ConfigError("rollout.constrain must be none for training (the policy learns the protocol itself)")
    tokenizer = backend.tokenizer
    rollout = TrainRollout(engine, tokenizer.convert_tokens_to_ids("<|im_end|>")
                           if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id)
    args = build_grpo_config(cfg, output_dir, reward_weights=reward_weights)
    model.train()
    trainer = GRPOTrainer(
        model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset,
        processing_class=processor, rollout_func=rollout, callbacks=list(callbacks), peft_config=peft_config(cfg),
    )
    head = cfg.train.logprob_head
    if head == "plain" or (head == "auto" and not torch.cuda.is_available()):
        from medrwr.train.logprob_head import CompletionMasks, use_plain_logprob_head

        rollout.masks = CompletionMasks()
        use_plain_logprob_head(trainer, rollout.masks)
    return trainer, rollout
