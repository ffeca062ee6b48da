"""Where a policy's time goes: seconds in prefill forwards (many tokens per row) vs decode steps (one token).

Used by ``eval.py`` and ``serve.py`` to explain their batched / one-at-a-time ratios. Prefill on a CPU is
compute-bound: a batch computes the same tokens as one row at a time, so only the decode seconds can shrink with
batching. ``bound`` is the ratio the batched arm would reach if its decoding cost nothing:
``(prefill + decode of one at a time) / (prefill of batched)``.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class ForwardClock:
    """Forward hooks on ``model`` summing wall seconds and fed tokens of prefill and decode calls."""

    def __init__(self, model: Any):
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}
        self.reset()
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def reset(self) -> None:
        self.prefill_s = self.decode_s = 0.0
        self.prefill_tokens = self.decode_steps = self.decode_rows = 0

    def _pre(self, module: Any, args: Any, kwargs: dict) -> None:
        self._started[threading.get_ident()] = time.perf_counter()

    def _post(self, module: Any, args: Any, kwargs: dict, output: Any) -> None:
        dt = time.perf_counter() - self._started.pop(threading.get_ident(), time.perf_counter())
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None and args:
            ids = args[0]
        rows, width = (int(ids.shape[0]), int(ids.shape[1])) if ids is not None and ids.dim() >= 2 else (1, 1)
        with self._lock:
            if width == 1:
                self.decode_s += dt
                self.decode_steps += 1
                self.decode_rows += rows
            else:
                self.prefill_s += dt
                self.prefill_tokens += rows * width

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {"prefill_s": round(self.prefill_s, 2), "prefill_tokens": self.prefill_tokens,
                    "decode_s": round(self.decode_s, 2), "decode_steps": self.decode_steps,
                    "decode_rows_per_step": round(self.decode_rows / max(1, self.decode_steps), 2)}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def split_ratios(batched: dict[str, float], single: dict[str, float]) -> dict[str, float]:
    """Decode-phase speedup and the bound a free decode would give (see the module docstring)."""
    dec = single["decode_s"] / batched["decode_s"] if batched["decode_s"] else float("nan")
    total_single = single["prefill_s"] + single["decode_s"]
    bound = total_single / batched["prefill_s"] if batched["prefill_s"] else float("nan")
    share = batched["prefill_s"] / max(1e-9, batched["prefill_s"] + batched["decode_s"])
    return {"decode_speedup": round(dec, 2), "bound_if_decode_free": round(bound, 2),
            "batched_prefill_share": round(share, 3)}
