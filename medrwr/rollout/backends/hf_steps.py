"""The transformers backend's per-step helpers: the log-probability recorder and the stopping criterion.

Both see one ``generate`` call (a *segment*): a row paused when most of its batch had finished continues in a
later, smaller call (``HFBackend.generate``), so the criterion is given the tokens the row wrote before
(``prefix``) to find a stop string that spans the pause, and may pause the call itself (``pause_at``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medrwr.rollout.backends.base import FinishReason, find_stop

_STOP_WINDOW = 24  # tokens decoded per step to look for a stop string (a stop string spans far fewer)


def _torch():
    from medrwr._imports import require

    return require("torch", "models", "the transformers policy backend")


class Recorder:
    """Logits processor recording per-step log-probabilities from the raw logits (see module docstring)."""

    def __init__(self, watch_ids: Sequence[int], top_n: int, prompt_len: int):
        torch = _torch()
        self.watch = torch.as_tensor(list(watch_ids), dtype=torch.long) if watch_ids else None
        self.top_n = top_n
        self.prompt_len = prompt_len
        self.token_lp: list[Any] = []
        self.watch_lp: list[Any] = []
        self.top_ids: list[Any] = []
        self.top_lp: list[Any] = []
        self._prev_scores = None
        self._prev_lse = None

    def _take_sampled(self, tokens) -> None:
        lp = self._prev_scores.gather(1, tokens[:, None].to(self._prev_scores.device)).squeeze(1) - self._prev_lse
        self.token_lp.append(lp)

    def __call__(self, input_ids, scores):
        torch = _torch()
        if input_ids.shape[1] > self.prompt_len:
            self._take_sampled(input_ids[:, -1])
        raw = scores.float()
        lse = torch.logsumexp(raw, dim=-1)
        if self.watch is not None:
            w = self.watch.to(raw.device)
            self.watch_lp.append(raw[:, w] - lse[:, None])
        if self.top_n:
            v, i = raw.topk(self.top_n, dim=-1)
            self.top_ids.append(i)
            self.top_lp.append(v - lse[:, None])
        self._prev_scores, self._prev_lse = raw, lse
        return scores

    def finish(self, last_tokens) -> None:
        """Read the last step's sampled tokens (no processor call follows the final step)."""
        if self._prev_scores is not None and last_tokens is not None:
            self._take_sampled(last_tokens)
            self._prev_scores = self._prev_lse = None

    @staticmethod
    def _stack(items: list[Any]):
        return _torch().stack(items, dim=1).float().cpu() if items else None


class Stops:
    """Stopping criterion: per-row stop strings, end-of-sequence and budgets; remembers why each row stopped."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int, budgets: list[int], eos: set[int],
                 on_token: Any = None, prefix: Sequence[Sequence[int]] | None = None, pause_at: int = 0,
                 pause_min_left: int = 0):
        """``prefix``: each row's tokens of earlier segments; ``pause_at``: end the call (every row still running is
        *paused*) once at most this many rows run, each with more than ``pause_min_left`` tokens of budget left."""
        self.on_token = on_token  # on_token(row, token_id) -> True stops the row (serving: client gone)
        self.prefix = [list(p)[-_STOP_WINDOW:] for p in prefix] if prefix is not None else [[] for _ in budgets]
        self.pause_at = pause_at
        self.pause_min_left = pause_min_left
        self.paused = False
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_len = prompt_len
        self.budgets = budgets
        self.eos = eos
        self.length: list[int | None] = [None] * len(budgets)
        self.reason: list[FinishReason] = ["length"] * len(budgets)
        self.stop_string: list[str | None] = [None] * len(budgets)

    def __call__(self, input_ids, scores, **kwargs):
        torch = _torch()
        n = input_ids.shape[1] - self.prompt_len
        done = []
        for b in range(input_ids.shape[0]):
            if self.length[b] is None and n > 0:
                last = int(input_ids[b, -1])
                if self.on_token is not None and self.on_token(b, last):
                    self.length[b], self.reason[b] = n, "length"
                elif last in self.eos:
                    self.length[b], self.reason[b] = n, "eos"
                else:
                    if self.stop:
                        window = input_ids[b, max(self.prompt_len, input_ids.shape[1] - _STOP_WINDOW) :].tolist()
                        if len(window) < _STOP_WINDOW and self.prefix[b]:
                            window = self.prefix[b][len(window) - _STOP_WINDOW :] + window
                        text = self.tokenizer.decode(window, skip_special_tokens=False)
                        hit = find_stop(text, self.stop)
                        if hit is not None:
                            self.length[b], self.reason[b], self.stop_string[b] = n, "stop", hit[1]
                    if self.length[b] is None and n >= self.budgets[b]:
                        self.length[b], self.reason[b] = n, "length"
            done.append(self.length[b] is not None)
        running = [b for b, d in enumerate(done) if not d]
        if (n > 0 and running and len(running) <= self.pause_at
                and all(self.budgets[b] - n > self.pause_min_left for b in running)):
            self.paused = True  # the rows still running continue in a smaller call
            done = [True] * len(done)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
