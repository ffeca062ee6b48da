"""KV-cache reuse across turns for the transformers backend (``rollout.kv_cache``).

Without it every turn re-reads the whole transcript: prompt + everything written and inserted so far. With it:

* **Keep.** After each ``generate`` call every row's keys/values are sliced out of the batch cache (padding
  dropped) and kept in a small LRU store, keyed by the exact ids they cover: the ids fed plus the new tokens
  except the last one (the last sampled token was never fed). The store is capped by total tokens.
* **Reuse.** The next call looks up, per row, the entry sharing the longest prefix with the row's ids: the next
  turn (previous ids + output + the inserted retrieve block) extends its own entry, and a new request shares the
  system prompt with every earlier one. Keys/values of a shared prefix are exact for any continuation (causal
  attention, positions from 0). At most ``len(ids) - 1`` cached tokens are used, so at least one token is fed and
  its logits come fresh.
* **Shared prefix.** Rows of one call that share a prefix of at least ``SHARED_PREFIX_MIN`` tokens not yet in the
  store (the system prompt of a cold batch) get it prefilled once, as one row, before the batch reuses it.
* **Rows of unequal length** (text models): when a padded batch would compute more than rows alone would (on a
  CPU: padding against a fixed cost per forward; on a GPU: mostly padding), each row's uncached ids are
  prefilled on their own first (compute-bound prefill then costs the sum of the rows, not rows x longest), and
  the batch decodes together from the kept keys.
* **Middle-padded batch.** Row ``b``'s mask becomes ``[0 pad1][1 cached_b][0 pad2][1 new_b]`` with
  ``pad1 + len(cached_b) = C`` for all rows. ``generate`` gets that mask, a ``DynamicCache`` of length ``C`` and
  the usual left-padded ids (the row's ids end-aligned, so logits processors see what they see uncached), and
  feeds only the columns after ``C`` (``GenerationMixin._prefill`` slices ``input_ids[:, -(width - C):]``);
  the pad2 columns are fed too but masked, so nothing ever attends to them. Position ids come from ``attention_mask.cumsum(-1) - 1``
  (``_prepare_position_ids_for_generation``), so row ``b``'s new tokens get positions ``len(cached_b), ...`` --
  exactly those of an uncached call, and the cached keys were rotated at those same positions (their call
  used the same cumsum rule). Masked columns get zero keys/values; the mask removes them exactly.
* **No copy per step.** The batch cache's layers (:class:`GrowingLayer`) write each step's keys/values into a
  buffer with headroom; ``DynamicLayer`` concatenates the whole cache every step (16% of a 16-row decode).
* **Weights changed?** Entries are dropped when any parameter was modified in place since they were made
  (``tensor._version``: optimizer steps, ``load_state_dict``), so training never reads stale keys.

For text decoder models whose positions follow that cumsum rule and whose cache is all full-attention
``DynamicLayer`` s (:func:`supports_reuse`: llama, qwen2, qwen3, mistral families), and for Qwen2.5-VL, whose
M-RoPE positions, image-aware keys and fed images :mod:`.kv_cache_vl` handles (rows with video fall back).
Checked against transformers 5.10 (``generation/utils.py``, ``cache_utils.py``).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from medrwr.errors import BackendError
from medrwr.rollout.backends.kv_cache_vl import VL_MODEL_TYPES, ShownIds, VLReuse

logger = logging.getLogger(__name__)

__all__ = ["KVCacheMode", "Prepared", "TurnKVCache", "resolve_kv_cache", "supports_reuse"]

KVCacheMode = Literal["auto", "on", "off"]
SHARED_PREFIX_MIN = 16
"""Shortest common prefix of a call's rows worth one extra single-row forward."""
ROW_PREFILL_MIN = 8
ROW_PREFILL_WASTE = 0.75
"""On a GPU rows are prefilled alone when their uncached tokens are < 75% of a padded batch's (one has >= 8)."""
ROW_PREFILL_OVERHEAD_CPU = 24
"""A CPU forward's fixed cost, in prefill tokens: reading the weights once is worth ~FLOPS / bandwidth tokens of
compute (SmolLM2-135M, float32, 1 thread: 8 tokens alone run at 26% of a long prefill's tokens/s, 64 at 78%,
256 at 95%). On a CPU rows are prefilled alone when that costs less than one padded batch."""
PADDED_PREFILL_FAST_CPU = 2048
PADDED_PREFILL_SLOWDOWN_CPU = 36000
"""A padded CPU prefill of T > 2048 tokens (rows x width) costs ``1 + (T - 2048) / 36000`` times a long single-row
prefill per token: its activations leave the caches (SmolLM2-135M, float32, 1 thread, rows of 230 tokens: 2.73
ms/token at 4 rows, 2.94 at 16, 3.21 at 32; one row 2.80). 32 rows of 190-245 tokens: alone 20.0 s, padded 24.2 s."""
REUSE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
"""Decoder families checked to take positions from the attention mask's cumsum in ``generate``."""


def _torch():
    from medrwr._imports import require

    return require("torch", "models", "KV-cache reuse")


def supports_reuse(model: Any) -> tuple[bool, str]:
    """Whether cached turns are exact for this model, and why not when they are not."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if config is None or (hasattr(config, "vision_config") and kind not in VL_MODEL_TYPES):
        return False, (f"vision-language model type {kind!r} keeps the uncached path (M-RoPE positions are rebuilt "
                       f"only for {sorted(VL_MODEL_TYPES)})")
    if kind in VL_MODEL_TYPES and not hasattr(getattr(model, "model", None), "get_rope_index"):
        return False, f"model type {kind!r} without model.get_rope_index (needed for its M-RoPE positions)"
    if kind not in REUSE_MODEL_TYPES | VL_MODEL_TYPES:
        return False, f"model type {kind!r} is not one of {sorted(REUSE_MODEL_TYPES | VL_MODEL_TYPES)}"
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


@functools.cache
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values are views of a buffer with headroom: a step writes its own columns
        instead of concatenating the whole cache (amortised O(1) per token; the buffer doubles when full)."""

        HEADROOM = 128

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self.get_seq_length(), key_states.shape[-2]
            buf = getattr(self, "_buffers", None)
            if (buf is None or n + m > buf[0].shape[-2] or buf[0].shape[0] != key_states.shape[0]
                    or (n and self.keys.data_ptr() != buf[0].data_ptr())):  # full, or reshaped by another method
                b, h, _, d = key_states.shape
                cap = max(n + m + self.HEADROOM, 2 * n)
                buf = (key_states.new_empty((b, h, cap, d)), value_states.new_empty((b, h, cap, value_states.shape[-1])))
                if n:
                    buf[0][..., :n, :] = self.keys
                    buf[1][..., :n, :] = self.values
                self._buffers = buf
            buf[0][..., n : n + m, :] = key_states
            buf[1][..., n : n + m, :] = value_states
            self.keys, self.values = buf[0][..., : n + m, :], buf[1][..., : n + m, :]
            return self.keys, self.values

        def reserve(self, like_keys: Any, like_values: Any, rows: int, length: int) -> None:
            """Zeroed keys/values of ``rows`` x ``length`` tokens, written in place by the caller, with headroom
            after them (so a batch assembled from kept entries is written once, straight into the buffer)."""
            self.lazy_initialization(like_keys, like_values)
            cap = length + self.HEADROOM
            self._buffers = (like_keys.new_zeros((rows, like_keys.shape[1], cap, like_keys.shape[3])),
                             like_values.new_zeros((rows, like_values.shape[1], cap, like_values.shape[3])))
            self.keys, self.values = self._buffers[0][..., :length, :], self._buffers[1][..., :length, :]

    return GrowingLayer


def growing_cache(config: Any) -> Any:
    """An empty ``DynamicCache`` of :class:`GrowingLayer` s."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    layer = _growing_layer_class()
    cache.layers = [layer() for _ in cache.layers]
    return cache


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
    keys: list[tuple[int, ...]] = field(default_factory=list)
    """Each row's store key (its ids; for a VLM with image placeholders named by image)."""
    shown: Any = None
    """The ids logits processors see where they differ from the fed ``input_ids`` (VLM gap placeholders)."""

    def wrap(self, processors: Sequence[Any]) -> list[Any]:
        """``processors`` as they run on this call: shown the row ids an uncached call would show."""
        return list(processors) if self.shown is None else [ShownIds(p, self.shown) for p in processors]


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
        self.shared_prefills = 0
        """Common prefixes prefilled once for a batch (all calls so far)."""
        self.row_prefills = 0
        """Rows prefilled on their own before a batch of unequal lengths (all calls so far)."""
        self.vl = VLReuse(model) if getattr(model.config, "model_type", None) in VL_MODEL_TYPES else None
        """M-RoPE positions, image keys and fed images for a VLM (:mod:`.kv_cache_vl`)."""
        self._weights = self._weights_version()

    def _weights_version(self) -> tuple[int, int]:
        return id(self.model), sum(p._version for p in self.model.parameters())

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0

    def _lookup(self, ids: tuple[int, ...]) -> tuple[tuple[int, ...] | None, int]:
        """The entry sharing the longest prefix with ``ids`` and how many of its tokens to use (<= len(ids) - 1)."""
        best: tuple[tuple[int, ...] | None, int] = (None, 0)
        for key in self.entries:
            n = min(_common_prefix(key, ids), len(ids) - 1)
            if self.vl is not None:
                n = self.vl.cut(ids, n)
            if n > best[1]:
                best = (key, n)
        return best

    def _prefill_shared_prefix(self, keys: Sequence[tuple[int, ...]], hits: Sequence[int], row: Sequence[int],
                               mm: Any) -> bool:
        """Prefill the rows' common prefix once (one row) when it is long and the store lacks it; True if it did.

        ``row``/``mm``: the first row's ids and images (the prefix's real ids; images in it are whole)."""
        torch = _torch()
        from transformers import DynamicCache

        shared = keys[0][: min(_common_prefix(keys[0], k) for k in keys[1:])] if len(keys) > 1 else ()
        shared = shared[: min(len(k) for k in keys) - 1]
        if self.vl is not None:
            shared = shared[: self.vl.cut(keys[0], len(shared))]
        if len(shared) - min(hits) < SHARED_PREFIX_MIN:
            return False
        if self.vl is not None:
            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.vl.prefill(row[: len(shared)], mm, cache)
            self._put(shared, [(layer.keys, layer.values) for layer in cache.layers])
        else:
            self._put(shared, self._text_prefill(shared))
        self.shared_prefills += 1
        return True

    def _text_prefill(self, ids: Sequence[int], past: list[tuple[Any, Any]] | None = None) -> list[tuple[Any, Any]]:
        """Keys/values of ``ids`` (one row, after the cached ``past``), without computing their logits."""
        torch = _torch()
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=past, config=self.model.config) if past else \
            DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(input_ids=torch.as_tensor([list(ids)], device=self.model.device), past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _drop(self, key: tuple[int, ...]) -> None:
        """Remove the entry for ``key`` (if kept), keeping the token count."""
        if self.entries.pop(key, None) is not None:
            self.tokens -= len(key)

    def _put(self, key: tuple[int, ...], layers: list[tuple[Any, Any]]) -> None:
        """Store (or replace) the entry for ``key`` as the most recent, keeping the token count."""
        self._drop(key)
        self.entries[key] = layers
        self.tokens += len(key)

    def _prefill_rows_alone(self, keys: Sequence[tuple[int, ...]], found: Sequence[tuple[Any, int]]) -> bool:
        """Prefill each row's uncached ids (all but the last) on its own, extending its entry, when that costs less
        than one padded batch (:func:`rows_alone_cheaper`); True if it did.

        Prefill is compute-bound on a CPU: a padded batch costs ``rows x longest`` tokens (more per token once it
        is large), rows alone cost the sum of their lengths plus :data:`ROW_PREFILL_OVERHEAD_CPU` each (prompts
        with retrieved documents, 300-500 tokens of unequal length: 14% less prefill time than the padded batch).
        The batch then decodes together from the kept keys (each row feeds one token)."""
        todo = [len(k) - n - 1 for k, (_, n) in zip(keys, found)]
        if not rows_alone_cheaper(todo, self.model.device.type):
            return False
        consumed = set()
        for key, (entry, n), m in zip(keys, found, todo):
            if m < ROW_PREFILL_MIN:
                continue
            past = [(k[:, :, :n], v[:, :, :n]) for k, v in self.entries[entry]] if n else None
            self._put(key[:-1], self._text_prefill(key[n:-1], past))
            self.row_prefills += 1
            if entry is not None and n == len(entry):
                consumed.add(entry)
        for entry in consumed - set(keys):  # extended by every row that used it: the longer entries replace it
            self._drop(entry)
        return True

    def prepare(self, rows: Sequence[Sequence[int]], batch: dict[str, Any],
                mms: Sequence[Any] | None = None) -> Prepared | None:
        """Rewrite ``batch``'s ``input_ids``/``attention_mask`` into the middle-padded layout; return the cache.

        ``mms``: each row's images (``GenerationState.mm``; a VLM needs them). None (the uncached path) for a
        model in training mode (gradient checkpointing drops ``past_key_values`` there), images on a model
        without :mod:`.kv_cache_vl` support, and rows whose images cannot be keyed (video, out of step)."""
        torch = _torch()

        if self._weights_version() != self._weights:
            self.clear()
            self._weights = self._weights_version()
        if self.model.training or ("pixel_values" in batch and self.vl is None):
            return None
        mms = list(mms) if mms is not None else [None] * len(rows)
        keys = [tuple(int(t) for t in r) for r in rows] if self.vl is None else self.vl.keys(rows, mms)
        if keys is None:
            return None
        found = [self._lookup(k) for k in keys]
        hits = [n for _, n in found]
        if self._prefill_shared_prefix(keys, hits, rows[0], mms[0]):
            found = [self._lookup(k) for k in keys]
            hits = [n for _, n in found]
        reused = sum(hits)
        if self.vl is None and self._prefill_rows_alone(keys, found):
            found = [self._lookup(k) for k in keys]
            hits = [n for _, n in found]
        config = self.model.config
        if not any(hits):
            if self.vl is not None:
                self.vl.finish(batch, rows, mms, hits, self.pad_token_id)
            return Prepared(growing_cache(config), batch["attention_mask"].clone(), hits, [], keys)
        c = max(hits)
        width = c + max(len(k) - n for k, n in zip(keys, hits))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        cache = growing_cache(config)
        for layer, (k0, v0) in zip(cache.layers, next(self.entries[key] for key, n in found if n)):
            layer.reserve(k0, v0, len(rows), c)
        for b, (key, (entry, n)) in enumerate(zip(keys, found)):
            ids[b, width - len(key) :] = torch.as_tensor([int(t) for t in rows[b]])
            mask[b, c - n : c] = 1
            mask[b, width - (len(key) - n) :] = 1
            if n:
                self.entries.move_to_end(entry)
                for layer, (ke, ve) in zip(cache.layers, self.entries[entry]):
                    layer.keys[b, :, c - n : c] = ke[0, :, :n]
                    layer.values[b, :, c - n : c] = ve[0, :, :n]
        batch["input_ids"], batch["attention_mask"] = ids, mask
        shown = None if self.vl is None else self.vl.finish(batch, rows, mms, hits, self.pad_token_id)
        self.reused_tokens += reused
        used = [e for e, n in found if e is not None and n == len(e)]
        return Prepared(cache, mask.clone(), hits, used, keys, shown)

    def keep(self, prep: Prepared, rows: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
             last: Sequence[int] = ()) -> None:
        """Store each row's keys/values for its ids + all but the last new token (the last was never fed).

        ``last``: rows stored after the others, so they are the last the size cap evicts (rows paused mid-turn,
        which the next call continues at once)."""
        torch = _torch()
        layers = prep.cache.layers
        width = prep.mask.shape[1]
        if not layers or layers[0].keys is None:
            return
        length = layers[0].get_seq_length()
        for e in prep.used:
            self._drop(e)
        late = set(last)
        order = [b for b in range(len(rows)) if b not in late] + [b for b in range(len(rows)) if b in late]
        for b in order:
            row, out = rows[b], outputs[b]
            fed = max(len(out) - 1, 0)
            key = (prep.keys[b] if prep.keys else tuple(int(t) for t in row)) + tuple(int(t) for t in out[:fed])
            if len(key) > self.max_tokens or width + fed > length:
                continue
            cols = torch.cat([prep.mask[b].nonzero().flatten(), torch.arange(width, width + fed)])
            if cols.numel() != len(key):  # pragma: no cover - the layout above guarantees it
                logger.warning("KV cache: row %d covers %d columns for %d ids; not kept", b, cols.numel(), len(key))
                continue
            cols = cols.to(layers[0].keys.device)
            kept = [(layer.keys[b : b + 1].index_select(2, cols), layer.values[b : b + 1].index_select(2, cols))
                    for layer in layers]
            self._put(key, kept)
        while self.tokens > self.max_tokens and self.entries:
            self._drop(next(iter(self.entries)))  # the least recently used


def rows_alone_cheaper(todo: Sequence[int], device_type: str) -> bool:
    """Whether prefilling rows with ``todo`` uncached tokens each one by one beats one padded batch (see
    :data:`ROW_PREFILL_OVERHEAD_CPU`, :data:`PADDED_PREFILL_FAST_CPU`; a GPU: :data:`ROW_PREFILL_WASTE`)."""
    if len(todo) < 2 or max(todo) < ROW_PREFILL_MIN:
        return False
    padded = len(todo) * max(todo)
    if device_type == "cpu":
        alone = sum(m + ROW_PREFILL_OVERHEAD_CPU if m >= ROW_PREFILL_MIN else m for m in todo)
        return alone < padded * (1 + max(0, padded - PADDED_PREFILL_FAST_CPU) / PADDED_PREFILL_SLOWDOWN_CPU)
    return sum(todo) < ROW_PREFILL_WASTE * padded


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two id tuples (binary search over C-speed slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo] always; a[:hi + 1] != b[:hi + 1] once hi has moved
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
