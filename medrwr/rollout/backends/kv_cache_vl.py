"""KV-cache reuse for Qwen2.5-VL: image-aware keys, M-RoPE positions, only the new images encoded.

:mod:`.kv_cache` keeps each row's keys/values under the ids they cover. For a VLM four things change:

* **Keys name the image, not just its placeholders.** Two images of the same size give the same ids
  (``<|vision_start|><|image_pad|>×n<|vision_end|>``), so every ``<|image_pad|>`` of image ``k`` is replaced in
  the store's key by a negative id derived from a hash of that image's ``pixel_values`` and grid. Prefix
  lookup then stops at the first image that differs, and a cache boundary never falls inside an image
  (:meth:`VLReuse.cut` moves it back to the image's first placeholder), so every image is either wholly cached
  or wholly fed.
* **Positions are those of one uninterrupted forward.** Qwen2.5-VL numbers text after an image from
  ``max(image positions) + 1``, so ``attention_mask.cumsum`` (what ``generate`` falls back to, plus a
  ``rope_deltas`` left over from the previous call) is wrong once a cache is passed. Here ``get_rope_index``
  runs over each row's full ids (the middle-padded mask selects exactly cached + new ids, in order) and the
  ``[4, batch, width]`` position ids (the text row ``cumsum - 1`` first, as ``_prepare_position_ids_for_generation``
  builds them for an uncached call) go to ``generate``, which slices the fed columns
  (``prepare_inputs_for_generation``) and extends them by ``+1`` per step, exactly as uncached.
* **Only the fed images are encoded.** ``pixel_values``/``image_grid_thw`` keep just the images whose
  placeholders are in the fed columns (a first turn, or the case image a CDIR turn inserts); cached images live
  in the kept keys/values. ``mm_token_type_ids`` is rebuilt for the new layout and passed on every forward.
* **Gap columns.** A middle-padded row's masked ``pad2`` columns are fed and hold the row's own earlier ids.
  Where one holds an image placeholder the model would count one more image to fill, so it is fed the pad id
  there, and logits processors are shown the real ids (:class:`ShownIds`), as in an uncached call.

Checked against transformers 5.10.4 (``models/qwen2_5_vl/modeling_qwen2_5_vl.py``: ``get_rope_index``,
``compute_3d_position_ids``, ``_prepare_position_ids_for_generation``; ``generation/utils.py``).
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["VL_MODEL_TYPES", "ShownIds", "VLReuse"]

VL_MODEL_TYPES = frozenset({"qwen2_5_vl"})
"""VLM families whose M-RoPE positions :class:`VLReuse` rebuilds (``model.model.get_rope_index``)."""
_HASHES_KEPT = 4096


def _torch():
    from medrwr._imports import require

    return require("torch", "models", "KV-cache reuse")


class VLReuse:
    """The Qwen2.5-VL parts of :class:`.kv_cache.TurnKVCache` (see module docstring)."""

    def __init__(self, model: Any):
        config = model.config
        self.model = model
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = getattr(config, "video_token_id", None)
        self._hashes: OrderedDict[int, tuple[Any, int]] = OrderedDict()  # id(tensor) -> (weakref to it, its id)

    # ------------------------------------------------------------------ keys

    def _image_key(self, pixels: Any, grid: Any) -> int:
        """A negative id naming one image (never a real token id)."""
        hit = self._hashes.get(id(pixels))
        if hit is not None and hit[0]() is pixels:
            return hit[1]
        digest = hashlib.blake2b(digest_size=8)
        digest.update(pixels.detach().float().cpu().contiguous().numpy().tobytes())
        digest.update(str([int(x) for x in grid.flatten().tolist()]).encode())
        key = -1 - int.from_bytes(digest.digest(), "big") // 2
        self._hashes[id(pixels)] = (weakref.ref(pixels), key)
        while len(self._hashes) > _HASHES_KEPT:
            self._hashes.popitem(last=False)
        return key

    def keys(self, rows: Sequence[Sequence[int]], mms: Sequence[Any]) -> list[tuple[int, ...]] | None:
        """Store keys for ``rows`` (image placeholders named by image), or None when a row's images do not line up."""
        out = []
        for b, (row, mm) in enumerate(zip(rows, mms)):
            row = [int(t) for t in row]
            if self.video_token_id is not None and int(self.video_token_id) in row:
                logger.info("KV cache: row %d holds video placeholders; this call uses the uncached path", b)
                return None
            data = mm.data if mm is not None else {}
            pixels, grids = data.get("pixel_values", []), data.get("image_grid_thw", [])
            runs = self.image_runs(row)
            if len(runs) != len(pixels) or len(pixels) != len(grids):
                logger.warning("KV cache: row %d has %d image placeholder runs for %d images; uncached path",
                               b, len(runs), len(pixels))
                return None
            for (start, end), pv, grid in zip(runs, pixels, grids):
                row[start:end] = [self._image_key(pv, grid)] * (end - start)
            out.append(tuple(row))
        return out

    def image_runs(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """``(start, end)`` of each run of image placeholders (one run per image)."""
        runs, start = [], None
        for i, t in enumerate(ids):
            if t == self.image_token_id and start is None:
                start = i
            elif t != self.image_token_id and start is not None:
                runs.append((start, i))
                start = None
        if start is not None:
            runs.append((start, len(ids)))
        return runs

    @staticmethod
    def cut(key: Sequence[int], n: int) -> int:
        """``n`` moved back so that the first ``n`` ids of ``key`` do not end inside an image."""
        while 0 < n < len(key) and key[n] < 0 and key[n - 1] == key[n]:
            n -= 1
        return n

    # ------------------------------------------------------------------ positions and images

    def positions(self, ids: Any, mask: Any, grids: Any) -> tuple[Any, Any]:
        """``[4, batch, width]`` position ids of one uninterrupted forward, and the ``mm_token_type_ids``."""
        torch = _torch()
        types = (ids == self.image_token_id).long() * mask
        vision, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=grids, attention_mask=mask
        )
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return torch.cat([text[None], vision.to(text.dtype)], dim=0), types

    def finish(self, batch: dict[str, Any], rows: Sequence[Sequence[int]], mms: Sequence[Any],
               hits: Sequence[int], pad_token_id: int) -> Any:
        """Set positions and ``mm_token_type_ids`` for the middle-padded ``batch``; keep only the fed images.

        Returns the ids logits processors should see (:class:`ShownIds`), or None when they are the fed ids."""
        torch = _torch()
        shown = None
        mask = batch["attention_mask"]
        full = batch["input_ids"].clone()  # the fed ids are end-aligned; cached columns get the row's first ids
        for b, row in enumerate(rows):
            full[b, mask[b].bool()] = torch.as_tensor([int(t) for t in row], dtype=full.dtype)
        batch["position_ids"], batch["mm_token_type_ids"] = self.positions(full, mask, batch.get("image_grid_thw"))
        fed_pixels, fed_grids = [], []
        for row, mm, n in zip(rows, mms, hits):
            if mm is None:
                continue
            for (start, _), pv, grid in zip(self.image_runs(row), mm.data.get("pixel_values", []),
                                            mm.data.get("image_grid_thw", [])):
                if start >= n:
                    fed_pixels.append(pv)
                    fed_grids.append(grid)
        hidden = (mask == 0) & (batch["input_ids"] == self.image_token_id)
        if hidden.any():  # a masked gap column holding an earlier image's placeholder: the model must not see it
            shown = batch["input_ids"]
            batch["input_ids"] = shown.masked_fill(hidden, pad_token_id)
        batch.pop("pixel_values", None)
        batch.pop("image_grid_thw", None)
        if fed_pixels:
            batch["pixel_values"] = torch.cat(fed_pixels, dim=0)
            batch["image_grid_thw"] = torch.cat(fed_grids, dim=0)
        return shown

    def prefill(self, ids: Sequence[int], mm: Any, cache: Any) -> None:
        """One-row forward over ``ids`` (a shared prefix holding only whole images of ``mm``) into ``cache``."""
        torch = _torch()
        runs = self.image_runs(ids)
        data = mm.data if mm is not None else {}
        n = len(runs)
        x = torch.as_tensor([list(ids)], device=self.model.device)
        mask = torch.ones_like(x)
        grids = torch.cat(list(data["image_grid_thw"][:n]), 0).to(x.device) if n else None
        position_ids, types = self.positions(x, mask, grids)
        kwargs: dict[str, Any] = {}
        if n:
            kwargs["pixel_values"] = torch.cat(list(data["pixel_values"][:n]), 0).to(x.device, self.model.dtype)
            kwargs["image_grid_thw"] = grids
        self.model(input_ids=x, attention_mask=mask, position_ids=position_ids, mm_token_type_ids=types,
                   past_key_values=cache, use_cache=True, **kwargs)


class ShownIds:
    """A logits processor called with the ids as an uncached call shows them (gap placeholders restored).

    The masked gap columns of a middle-padded row hold the row's own earlier ids, so processors that read a
    row's history (e.g. a scripted forcer) see it as uncached. Where such a column holds an image placeholder
    the model is fed the pad id instead (it would count one more image to fill); this wrapper shows the
    processor the real id."""

    def __init__(self, processor: Any, shown: Any):
        self.processor = processor
        self.shown = shown

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = _torch()
        self.shown = self.shown.to(input_ids.device)
        return self.processor(torch.cat([self.shown, input_ids[:, self.shown.shape[1] :]], dim=1), scores)
