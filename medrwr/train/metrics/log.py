"""``DIR/metrics.jsonl``: one JSON object per logged step, every number TRL logs plus our own names.

Written by a ``TrainerCallback`` on the main process. Each line holds ``step``, ``time`` (seconds since the
run started), ``tokens_per_s`` (input + completion tokens of the step / wall seconds since the previous log)
and everything TRL logged (``loss``, ``kl``, ``reward``, ``rewards/<name>/mean``, ``completions/*``) with the
short aliases of :data:`METRIC_ALIASES` added (``accuracy``, ``retrieval_rate``, ``mean_rounds``, ...).
On resume, lines after the checkpoint's step are dropped first (the file is rewritten atomically), so a
killed run continues without duplicate steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["METRIC_ALIASES", "MetricsLogger", "read_metrics"]

METRIC_ALIASES = {
    "medrwr/accuracy": "accuracy",
    "medrwr/retrieval_rate": "retrieval_rate",
    "medrwr/mean_rounds": "mean_rounds",
    "medrwr/valid_rate": "valid_rate",
    "medrwr/answered_rate": "answered_rate",
}


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a run directory or the file itself); a torn last line is skipped."""
    p = Path(path)
    p = p / "metrics.jsonl" if p.is_dir() else p
    rows = []
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one record per ``on_log`` to ``path``; :meth:`callback` wraps it as a ``TrainerCallback``."""

    def __init__(self, path: str | os.PathLike, clock=time.perf_counter):
        self.path = Path(path)
        self.clock = clock
        self._t0 = clock()
        self._last_t = self._t0
        self._last_tokens: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._last_t = self.clock()
        self._last_tokens = float(state.num_input_tokens_seen or 0)
        if state.is_world_process_zero and self.path.is_file():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= state.global_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
            os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = self.clock()
        record: dict[str, Any] = {"step": state.global_step, "time": round(now - self._t0, 3)}
        record.update({k: _clean(v) for k, v in logs.items() if isinstance(v, (int, float, str)) or v is None})
        for src, alias in METRIC_ALIASES.items():
            if src in record:
                record[alias] = record[src]
        tokens = logs.get("num_tokens")
        if isinstance(tokens, (int, float)) and self._last_tokens is not None and now > self._last_t:
            record["tokens_per_s"] = round((tokens - self._last_tokens) / (now - self._last_t), 2)
            self._last_tokens = float(tokens)
        self._last_t = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def callback(self) -> Any:
        """This logger as a ``transformers.TrainerCallback`` (transformers imported only here)."""
        from transformers import TrainerCallback

        writer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                writer.on_train_begin(args, state, control, **kwargs)

            def on_log(self, args, state, control, logs=None, **kwargs):
                writer.on_log(args, state, control, logs=logs, **kwargs)

        return _Callback()
