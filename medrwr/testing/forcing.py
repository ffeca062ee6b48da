"""Scripted decoding: a ``LogitsProcessor`` that makes a random model write our tags (see :mod:`medrwr.testing`
for how it keeps its place across ``generate`` calls)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = ["FREE", "ForcedTranscript", "force_text_processor"]


@dataclasses.dataclass(frozen=True)
class FREE:
    """A hole of `n_tokens` tokens the model samples itself, optionally only among `allowed_token_ids`."""

    n_tokens: int = 1
    allowed_token_ids: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise ValueError(f"FREE needs n_tokens >= 1, got {self.n_tokens}")
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            raise ValueError("FREE(allowed_token_ids=[]) allows nothing; pass None to allow every token")


Part = str | FREE
Turn = str | Sequence[Part]
Script = Sequence[Turn]


@dataclasses.dataclass
class _Transcript:
    turns: list[list[int | FREE]]  # one slot per generated token
    turn: int = -1  # index of the current turn; -1 before the first call
    pos: int = 0
    history: tuple[int, ...] = ()


class ForcedTranscript:
    """A ``LogitsProcessor`` that makes any causal LM write a scripted transcript, turn by turn.

    `script` is a list of turns; a turn is a string or a list of strings and :class:`FREE` holes. Strings are
    tokenised with `tokenizer` (each string part on its own, a turn without holes as one string). Instead of
    one script for every row, ``rows=[script, ...]`` gives fresh rows their scripts in order, and
    ``choose=fn`` asks ``fn(prompt_text)`` for the script of each fresh row (``prompt_text`` is the row's
    decoded prompt, special tokens included). After a turn's last token the processor forces `end_token`
    (default: the tokenizer's eos). See the module docstring for how calls and rows are tracked.

    Forced positions get score 0 and every other token the dtype's minimum, so the *processed* scores are
    one-hot: take the model's own log-probs from ``output_logits=True`` (raw logits), not ``output_scores``.
    A hole without `allowed_token_ids` leaves the scores untouched (the model may then write eos).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        script: Script | None = None,
        *,
        rows: Sequence[Script] | None = None,
        choose: Callable[[str], Script] | None = None,
        end_token: str | None = None,
    ) -> None:
        if sum(x is not None for x in (script, rows, choose)) != 1:
            raise ValueError(
                "ForcedTranscript takes either one script (all rows), rows=[script, ...] or choose=fn(prompt)"
            )
        self._tok = tokenizer
        end = end_token or tokenizer.eos_token
        self.end_token_id = tokenizer.convert_tokens_to_ids(end)
        if self.end_token_id is None or self.end_token_id == tokenizer.unk_token_id:
            raise ValueError(f"end token {end!r} is not in the vocabulary")
        self.pad_token_id = tokenizer.pad_token_id
        self._shared = self._compile(script) if script is not None else None
        self._fresh = [self._compile(s) for s in rows] if rows is not None else []
        self._choose = choose
        self.transcripts: list[_Transcript] = []
        self._rows: list[_Transcript] = []
        self._prev: Any = None

    def reset(self) -> None:
        """Forget every transcript in progress (scripts given with ``rows=`` that were used stay used)."""
        self.transcripts.clear()
        self._rows = []
        self._prev = None

    def _compile(self, script: Script) -> list[list[int | FREE]]:
        if isinstance(script, str):
            raise TypeError("a script is a list of turns; wrap a single turn in a list: [turn]")
        turns = []
        for turn in script:
            parts = [turn] if isinstance(turn, str) else list(turn)
            slots: list[int | FREE] = []
            for part in parts:
                if isinstance(part, FREE):
                    slots.extend([part] * part.n_tokens)
                elif isinstance(part, str):
                    slots.extend(self._tok.encode(part, add_special_tokens=False))
                else:
                    raise TypeError(f"a turn holds str and FREE parts, got {type(part).__name__}")
            turns.append(slots)
        return turns

    # -- call tracking

    def _content(self, row) -> tuple[int, ...]:
        ids = row.tolist()
        pad = self.pad_token_id
        if pad is not None:
            start, stop = 0, len(ids)
            while start < stop and ids[start] == pad:
                start += 1
            while stop > start and ids[stop - 1] == pad:
                stop -= 1
            ids = ids[start:stop]
        return tuple(ids)

    def _is_new_call(self, input_ids) -> bool:
        prev = self._prev
        if prev is None or prev.shape[0] != input_ids.shape[0] or prev.shape[1] + 1 != input_ids.shape[1]:
            return True
        import torch

        return not torch.equal(input_ids[:, :-1], prev)

    def _begin_call(self, input_ids) -> None:
        contents = [self._content(r) for r in input_ids]
        claimed: set[int] = set()
        rows: list[_Transcript] = []
        for r, content in enumerate(contents):
            best, best_len = None, -1
            for i, t in enumerate(self.transcripts):
                h = t.history
                if i not in claimed and len(h) > best_len and content[: len(h)] == h:
                    best, best_len = i, len(h)
            if best is None:
                if self._shared is not None:
                    self.transcripts.append(_Transcript(turns=self._shared))
                elif self._choose is not None:
                    prompt = self._tok.decode(list(content), skip_special_tokens=False)
                    self.transcripts.append(_Transcript(turns=self._compile(self._choose(prompt))))
                elif self._fresh:
                    self.transcripts.append(_Transcript(turns=self._fresh.pop(0)))
                else:
                    raise ValueError(
                        f"ForcedTranscript: row {r} of this generate call continues no known transcript and "
                        "all scripts given with rows= are in use; pass one script per row"
                    )
                best = len(self.transcripts) - 1
            claimed.add(best)
            t = self.transcripts[best]
            t.turn += 1
            t.pos = 0
            rows.append(t)
        self._rows = rows

    # -- the processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import torch

        if self._is_new_call(input_ids):
            self._begin_call(input_ids)
        self._prev = input_ids.clone()
        scores = scores.clone()
        neg = torch.finfo(scores.dtype).min
        for r, t in enumerate(self._rows):
            t.history = self._content(input_ids[r])
            slots = t.turns[t.turn] if t.turn < len(t.turns) else []
            if t.pos >= len(slots):
                scores[r].fill_(neg)
                scores[r, self.end_token_id] = 0.0
                continue
            slot = slots[t.pos]
            t.pos += 1
            if isinstance(slot, int):
                scores[r].fill_(neg)
                scores[r, slot] = 0.0
            elif slot.allowed_token_ids is not None:
                allowed = torch.as_tensor(
                    list(slot.allowed_token_ids), dtype=torch.long, device=scores.device
                )
                kept = scores[r, allowed]
                if not torch.isfinite(kept).any():  # an earlier warper removed every allowed token
                    kept = torch.zeros_like(kept)
                scores[r].fill_(neg)
                scores[r, allowed] = kept
        return scores

    def text(self, turn: int) -> str:
        """The scripted text of `turn` of the shared script (holes shown as ``{FREE}``), for assertions."""
        if self._shared is None:
            raise ValueError("text() needs the shared-script form")
        out, run = [], []
        for slot in self._shared[turn]:
            if isinstance(slot, int):
                run.append(slot)
            else:
                out.append(self._tok.decode(run))
                out.append("{FREE}")
                run = []
        out.append(self._tok.decode(run))
        return "".join(out)


def force_text_processor(tokenizer: PreTrainedTokenizerBase, script: Script, **kwargs: Any):
    """``LogitsProcessorList([ForcedTranscript(tokenizer, script, **kwargs)])``, ready for ``generate``."""
    from transformers import LogitsProcessorList

    return LogitsProcessorList([ForcedTranscript(tokenizer, script, **kwargs)])
