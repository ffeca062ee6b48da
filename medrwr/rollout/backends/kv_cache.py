"""KV-cache reuse across turns for the transformers backend (``rollout.kv_cache``).

Without it every turn re-reads the whole transcript: prompt + everything written and inserted so far. With it:

* **Keep.** After each ``generate`` call every row's keys/values are sliced out of the batch cache (padding
  dropped) and kept in a small LRU store, keyed by the exact ids they cover: the ids fed plus the new tokens
  except the last one (the last sampled token was never fed). The store is capped by total tokens.
* **Reuse.** The next call looks up, per row, an entry whose key is a prefix of the row's ids (next turn =
  previous ids + output + the inserted retrieve block), or whose key the ids are a prefix of. At most
  ``len(ids) - 1`` cached tokens are used, so at least one token is fed and its logits come fresh.
* **Middle-padded batch.** Row ``b``'s mask becomes ``[0 pad1][1 cached_b][0 pad2][1 new_b]`` with
  ``pad1 + len(cached_b) = C`` for all rows. ``generate`` gets that mask, a ``DynamicCache`` of length ``C`` and
  the usual left-padded ids (the row's ids end-aligned, so logits processors see what they see uncached), and
  feeds only the columns after ``C`` (``GenerationMixin._prefill`` slices ``input_ids[:, -(width - C):]``);
  the pad2 columns are fed too but masked, so nothing ever attends to them. Position ids come from ``attention_mask.cumsum(-1) - 1``
  (``_prepare_position_ids_for_generation``), so row ``b``'s new tokens get positions ``len(cached_b), ...`` --
  exactly those of an uncached call, and the cached keys were rotated at those same positions (their call
  used the same cumsum rule). Masked columns get zero keys/values; the mask removes them exactly.
* **Weights changed?** Entries are dropped when any parameter was modified in place since they were made
  (``tensor._version``: optimizer steps, ``load_state_dict``), so training never reads stale keys.

Only for text-only decoder models whose positions follow that cumsum rule and whose cache is all full-attention
``DynamicLayer`` s (:func:`supports_reuse`: llama, qwen2, qwen3, mistral families). Qwen2.5-VL's M-RoPE positions
(``get_rope_index``, ``rope_deltas``) are not continued here, so VLMs keep the uncached path (``auto`` = off).
Checked against transformers 5.10 (``generation/utils.py``, ``cache_utils.py``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from medrwr.errors import BackendError

logger = logging.getLogger(__name__)

__all__ = ["KVCacheMode", "Prepared", "TurnKVCache", "resolve_kv_cache", "supports_reuse"]

KVCacheMode = Literal["auto", "on", "off"]
REUSE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
"""Decoder families checked to take positions from the attention mask's cumsum in ``generate``."""


def _torch():
    from medrwr._imports import require

    return require("torch", "models", "KV-cache reuse")


def supports_reuse(model: Any) -> tuple[bool, str]:
    """Whether cached turns are exact for this model, and why not when they are not."""
    config = getattr(model, "config", None)
    if config is None or hasattr(config, "vision_config"):
        return False, "vision-language models (M-RoPE positions) keep the uncached path"
    if getattr(config, "model_type", None) not in REUSE_MODEL_TYPES:
        return False, f"model type {getattr(config, 'model_type', None)!r} is not one of {sorted(REUSE_MODEL_TYPES)}"
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=config).layers):
        return False, "the model has sliding-window or other non-full attention layers"
    try:
        sum(p._version for p in model.parameters())
    except RuntimeError:  # inference tensors have no version counter: weight changes could not be noticed
        return False, "the weights were created in inference mode (no version counters)"
    return True, ""


def resolve_kv_cache(model: Any, mode: str, pad_token_id: int, max_tokens: int = 16384) -> TurnKVCache | None:
    """The store for ``mode`` (``auto`` = on where :func:`supports_reuse`), or None for the uncached path."""
    if mode not in ("auto", "on", "off"):
        raise BackendError(f"kv_cache must be auto, on or off, got {mode!r}")
    if mode == "off":
        return None
    ok, why = supports_reuse(model)
    if not ok:
        if mode == "on":
            raise BackendError(f"rollout.kv_cache is 'on' but {why}; set rollout.kv_cache: auto or off")
        logger.info("KV-cache reuse off: %s", why)
        return None
    return TurnKVCache(model, pad_token_id, max_tokens)


@dataclass
class Prepared:
    """One call's batch layout: what :meth:`TurnKVCache.keep` needs to slice each row back out."""

    cache: Any
    mask: Any
    """``[batch, width]`` attention mask of the fed ids (CPU)."""
    hits: list[int] = field(default_factory=list)
    """Cached tokens used per row."""
    used: list[tuple[int, ...]] = field(default_factory=list)
    """Entries extended this call (dropped once the longer ones are kept)."""


class TurnKVCache:
    """Per-row keys/values kept between ``generate`` calls (see module docstring)."""

    def __init__(self, model: Any, pad_token_id: int, max_tokens: int = 16384):
        if max_tokens < 1:
            raise BackendError(f"the KV-cache store needs max_tokens >= 1, got {max_tokens}")
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[int, ...], list[tuple[Any, Any]]] = OrderedDict()
        self.tokens = 0
        self.reused_tokens = 0
        """Tokens not re-read thanks to the store (all calls so far)."""
        self._weights = self._weights_version()

    def _weights_version(self) -> tuple[int, int]:
        return id(self.model), sum(p._version for p in self.model.parameters())

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0

    def _lookup(self, ids: tuple[int, ...]) -> tuple[tuple[int, ...] | None, int]:
        best: tuple[tuple[int, ...] | None, int] = (None, 0)
        for key in self.entries:
            if len(key) <= len(ids) and ids[: len(key)] == key:
                n = min(len(key), len(ids) - 1)
            elif len(key) > len(ids) and key[: len(ids)] == ids:
                n = len(ids) - 1
            else:
                continue
            if n > best[1]:
                best = (key, n)
        return best

    def prepare(self, rows: Sequence[Sequence[int]], batch: dict[str, Any]) -> Prepared | None:
        """Rewrite ``batch``'s ``input_ids``/``attention_mask`` into the middle-padded layout; return the cache.

        None (the uncached path) for image batches and for a model in training mode (gradient checkpointing
        drops ``past_key_values`` there)."""
        torch = _torch()
        from transformers import DynamicCache

        if self._weights_version() != self._weights:
            self.clear()
            self._weights = self._weights_version()
        if self.model.training or "pixel_values" in batch:
            return None
        keys = [tuple(int(t) for t in r) for r in rows]
        found = [self._lookup(k) for k in keys]
        hits = [n for _, n in found]
        config = self.model.config
        if not any(hits):
            return Prepared(DynamicCache(config=config), batch["attention_mask"].clone(), hits, [])
        c = max(hits)
        width = c + max(len(k) - n for k, n in zip(keys, hits))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        template = next(self.entries[key] for key, n in found if n)
        layers = []
        for k0, v0 in template:
            shape = (len(rows), k0.shape[1], c, k0.shape[3])
            layers.append((k0.new_zeros(shape), v0.new_zeros(shape)))
        for b, (key, (entry, n)) in enumerate(zip(keys, found)):
            ids[b, width - len(key) :] = torch.as_tensor(key)
            mask[b, c - n : c] = 1
            mask[b, width - (len(key) - n) :] = 1
            if n:
                self.entries.move_to_end(entry)
                for (kb, vb), (ke, ve) in zip(layers, self.entries[entry]):
                    kb[b, :, c - n : c] = ke[0, :, :n]
                    vb[b, :, c - n : c] = ve[0, :, :n]
        batch["input_ids"], batch["attention_mask"] = ids, mask
        self.reused_tokens += sum(hits)
        used = [e for e, n in found if e is not None and n == len(e)]
        return Prepared(DynamicCache(ddp_cache_data=layers, config=config), mask.clone(), hits, used)

    def keep(self, prep: Prepared, rows: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> None:
        """Store each row's keys/values for its ids + all but the last new token (the last was never fed)."""
        torch = _torch()
        layers = prep.cache.layers
        width = prep.mask.shape[1]
        if not layers or layers[0].keys is None:
            return
        length = layers[0].get_seq_length()
        for e in prep.used:
            if e in self.entries:
                del self.entries[e]
                self.tokens -= len(e)
        for b, (row, out) in enumerate(zip(rows, outputs)):
            fed = max(len(out) - 1, 0)
            key = tuple(int(t) for t in row) + tuple(int(t) for t in out[:fed])
            if len(key) > self.max_tokens or width + fed > length:
                continue
            cols = torch.cat([prep.mask[b].nonzero().flatten(), torch.arange(width, width + fed)])
            if cols.numel() != len(key):  # pragma: no cover - the layout above guarantees it
                logger.warning("KV cache: row %d covers %d columns for %d ids; not kept", b, cols.numel(), len(key))
                continue
            cols = cols.to(layers[0].keys.device)
            kept = [(layer.keys[b : b + 1].index_select(2, cols), layer.values[b : b + 1].index_select(2, cols))
                    for layer in layers]
            if key in self.entries:
                self.tokens -= len(key)
            self.entries[key] = kept
            self.entries.move_to_end(key)
            self.tokens += len(key)
        while self.tokens > self.max_tokens and self.entries:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)
