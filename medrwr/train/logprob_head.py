"""A plain log-softmax LM head for TRL's training forward, scoring only the completion positions.

TRL 1.16 patches the policy with a fused, chunked LM head (``trl.trainer.utils.add_fused_lm_head``) that never
materialises ``[batch, seq, vocab]`` logits. On devices without Triton (CPU) it scores *every* position, the
whole prompt included, in tiles: with Qwen's 152k vocabulary that made one tiny-model GRPO step ~14 s, 90% of it
in the head (measured, docs/training.md). This head projects only the positions whose label is scored and runs
one ``log_softmax`` over them: identical log-probs (to float rounding), far faster on small models and CPU.
On GPUs with large batches keep TRL's head (``train.logprob_head: fused``; ``auto`` picks it when CUDA is there).

It also skips the inserted retrieval tokens: TRL's labels mark only prompt and padding, so a head would score the
retrieved documents too (often most of a completion), although their loss mask is 0. :class:`CompletionMasks`
holds the rollout's ``env_mask`` by the completion's exact ids (recorded by the rollout, never inferred from
token patterns); positions it marks 0 get log-prob 0 and cost nothing. A completion it does not know is scored
whole, as before.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

__all__ = ["CompletionMasks", "use_plain_logprob_head"]


class CompletionMasks:
    """The rollout's per-token masks (1 model token, 0 inserted) keyed by the completion's exact ids.

    >>> m = CompletionMasks()
    >>> m.record([[5, 6, 7]], [[1, 0, 1]])
    >>> m.get([5, 6, 7]), m.get([5, 6])
    ([1, 0, 1], None)
    """

    def __init__(self, capacity: int = 8192):
        self.capacity = capacity
        self._by_ids: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()

    def record(self, completion_ids: Sequence[Sequence[int]], env_mask: Sequence[Sequence[int]]) -> None:
        for ids, mask in zip(completion_ids, env_mask):
            key = tuple(int(i) for i in ids)
            self._by_ids[key] = [int(v) for v in mask]
            self._by_ids.move_to_end(key)
        while len(self._by_ids) > self.capacity:
            self._by_ids.popitem(last=False)

    def get(self, completion_ids: Sequence[int]) -> list[int] | None:
        return self._by_ids.get(tuple(int(i) for i in completion_ids))


def _model_token_positions(labels: Any, masks: CompletionMasks | None) -> Any:
    """``labels != -100``, less the positions of inserted tokens in completions ``masks`` knows."""
    import torch

    scored = labels != -100
    if masks is None:
        return scored
    for b in range(labels.shape[0]):
        ids = labels[b][scored[b]].tolist()
        env = masks.get(ids)
        if env is not None and len(env) == len(ids) and not all(env):
            pos = scored[b].nonzero().squeeze(-1)
            inserted = torch.tensor(env, dtype=torch.bool, device=pos.device).logical_not()
            scored[b, pos[inserted]] = False
    return scored


def _patch(model: Any, temperature: float, masks: CompletionMasks | None = None) -> None:
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
        mask = _model_token_positions(labels, masks)
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


def use_plain_logprob_head(trainer: Any, masks: CompletionMasks | None = None) -> None:
    """Replace TRL's fused LM head on the trainer's policy (and reference model, if any) with the plain one;
    with ``masks`` (filled by the rollout) inserted tokens are not scored."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _patch(base, trainer.temperature, masks)
    if getattr(trainer, "ref_model", None) is not None:
        _patch(trainer.ref_model, trainer.temperature, masks)
