"""A plain log-softmax LM head for TRL's training forward, scoring only the completion positions.

TRL 1.16 patches the policy with a fused, chunked LM head (``trl.trainer.utils.add_fused_lm_head``) that never
materialises ``[batch, seq, vocab]`` logits. On devices without Triton (CPU) it scores *every* position, the
whole prompt included, in tiles: with Qwen's 152k vocabulary that made one tiny-model GRPO step ~14 s, 90% of it
in the head (measured, docs/training.md). This head projects only the positions whose label is scored and runs
one ``log_softmax`` over them: identical log-probs (to float rounding), far faster on small models and CPU.
On GPUs with large batches keep TRL's head (``train.logprob_head: fused``; ``auto`` picks it when CUDA is there).
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["use_plain_logprob_head"]


def _patch(model: Any, temperature: float) -> None:
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    fused_forward = model.forward  # TRL's wrapper: delegates to the original forward unless fused_lm_head=True

    @functools.wraps(fused_forward)  # generate() checks its kwargs against this signature
    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return fused_forward(*args, labels=labels, **kwargs)
        kwargs.pop("shift_labels", None)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100
        head = model.get_output_embeddings()
        logits = head(hidden[mask]).float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        token_lp = logp.gather(-1, labels[mask][:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        log_probs = hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, token_lp)
        ent = hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, entropy)
        loss = -token_lp.sum() / mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=ent)

    model.forward = forward


def use_plain_logprob_head(trainer: Any) -> None:
    """Replace TRL's fused LM head on the trainer's policy (and reference model, if any) with the plain one."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _patch(base, trainer.temperature)
    if getattr(trainer, "ref_model", None) is not None:
        _patch(trainer.ref_model, trainer.temperature)
