"""The policy-backend interface: token ids in, token ids and their log-probabilities out.

The rollout engine only sees :class:`PolicyBackend`, so transformers (``hf.py``), vLLM (``vllm.py``) and the
scripted fake below are interchangeable (as httpx's transports are, with ``MockTransport`` beside them).

Contract of :meth:`PolicyBackend.generate`:

* Each :class:`GenerationState` carries the *exact* ids to continue (prompt + completion so far) and the
  sample's multimodal inputs. The backend never re-tokenises them.
* Generation of a row stops at the first stop string (kept in the output, together with whatever else the
  token that completed it holds: a token ``"</query>\\n"`` is kept whole), at an end-of-sequence token
  (kept), or after ``max_new_tokens`` tokens.
* The :class:`Continuation` returns the new token ids exactly as sampled, the log-probability of each, the
  finish reason, and, at every generated position, the log-probabilities of the ``watch_token_ids`` the engine
  asked for (the option-letter tokens, so confidence is read without an extra forward pass) and optionally
  the top-N alternatives.

Log-probabilities are those of the model's raw next-token distribution (temperature 1, before logits
processors and sampling warpers), as vLLM's default ``raw_logprobs``; with temperature 1.0 and top-p 1.0 (the
training setting) that is also the sampling distribution.

Constrained decoding (``rollout.constrain: protocol``, :mod:`medrwr.rollout.constrain`): backends with
``supports_constraints = True`` take ``constraints=[TurnGrammar | None, ...]``, one per state, and sample only
tokens that keep that row's turn inside its grammar (None leaves the row free). ``constrained_logprobs`` says
which log-probabilities they then report: ``"raw"`` (the model's own, unconstrained: transformers) or
``"masked"`` (after the grammar mask: vLLM). The engine passes ``constraints`` only when constraining, so a
backend without the keyword keeps working unconstrained.

Streaming (serving): backends with ``supports_token_callback = True`` take ``on_token=fn``; ``fn(row, token_id)``
is called after each sampled token of an unfinished row, and returning True stops that row (finish reason
``length``). The engine passes it only when a caller asked for events or cancellation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from medrwr.errors import BackendError

FinishReason = Literal["stop", "eos", "length"]


@dataclass
class MultimodalInputs:
    """A sample's images, in the order their placeholder tokens appear in the ids.

    ``images`` holds the source objects (PIL images); ``data`` holds what the backend feeds its model, one entry
    per image (for transformers: ``{"pixel_values": [...], "image_grid_thw": [...]}``, for vLLM the PIL images).
    Backends re-supply every image on every generate call.
    """

    images: list[Any] = field(default_factory=list)
    data: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def extended(self, other: MultimodalInputs) -> MultimodalInputs:
        """A new object holding this one's images followed by ``other``'s."""
        data = {k: list(v) for k, v in self.data.items()}
        for k, v in other.data.items():
            data.setdefault(k, []).extend(v)
        return MultimodalInputs(images=list(self.images) + list(other.images), data=data)


@dataclass
class PromptInputs:
    """A chat prompt rendered by the backend's chat template: token ids plus the images it references."""

    prompt_ids: list[int]
    mm: MultimodalInputs | None = None
    text: str = ""


@dataclass
class GenerationState:
    """What to continue: the exact ids (prompt + completion so far) and the sample's images."""

    ids: list[int]
    mm: MultimodalInputs | None = None
    request_id: str = ""
    """Stable per sample across turns (vLLM request ids, scripted fakes)."""


@dataclass
class Continuation:
    """New tokens of one row, exactly as generated, with their log-probabilities.

    ``watch_logprobs[i][j]`` is the log-probability of ``watch_token_ids[j]`` at generated position ``i``
    (None when the backend cannot provide it; then ``top_ids``/``top_logprobs`` are used).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    stop_string: str | None = None
    watch_logprobs: Any = None
    """Array-like ``[len(token_ids), len(watch_token_ids)]`` or None."""
    top_ids: Any = None
    """Array-like ``[len(token_ids), N]`` or None."""
    top_logprobs: Any = None

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.token_ids):
            raise BackendError(
                f"a continuation has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probabilities"
            )

    def distribution_at(self, position: int, watch_token_ids: Sequence[int]) -> dict[int, float]:
        """Known log-probabilities at one generated position: watched ids, top-N and the sampled token."""
        dist: dict[int, float] = {}
        if self.top_ids is not None and self.top_logprobs is not None:
            for tid, lp in zip(self.top_ids[position], self.top_logprobs[position]):
                dist[int(tid)] = float(lp)
        if self.watch_logprobs is not None:
            for tid, lp in zip(watch_token_ids, self.watch_logprobs[position]):
                dist[int(tid)] = float(lp)
        dist[int(self.token_ids[position])] = float(self.logprobs[position])
        return dist


@runtime_checkable
class PolicyBackend(Protocol):
    """A policy model behind token ids.

    ``tokenizer`` encodes inserted text and decodes model text for parsing (never to re-encode it);
    ``prepare_prompt`` renders chat messages with the model's chat template (for a VLM the ids equal
    ``processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``, which TRL relies on);
    ``encode_image`` turns one image into its placeholder ids and model inputs, for CDIR's inserted case image
    (text-only backends raise :class:`BackendError`). ``supports_images`` is part of the contract, not a probe:
    True when this backend *with its loaded checkpoint* takes image inputs; the engine rejects image questions
    and CDIR skips its second look when it is False.
    """

    tokenizer: Any
    supports_images: bool

    def prepare_prompt(self, messages: list[dict[str, Any]], images: Sequence[Any] = ()) -> PromptInputs: ...

    def encode_image(self, image: Any) -> tuple[list[int], MultimodalInputs]: ...

    def eos_token_ids(self) -> set[int]: ...

    def generate(
        self,
        states: Sequence[GenerationState],
        stop: Sequence[str],
        max_new_tokens: int | Sequence[int],
        *,
        watch_token_ids: Sequence[int] = (),
        top_logprobs: int = 0,
        constraints: Sequence[Any] | None = None,
    ) -> list[Continuation]: ...


def per_row_budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """Normalise the ``max_new_tokens`` argument to one budget per row."""
    if isinstance(max_new_tokens, int):
        budgets = [max_new_tokens] * n
    else:
        budgets = [int(b) for b in max_new_tokens]
        if len(budgets) != n:
            raise BackendError(f"max_new_tokens has {len(budgets)} entries for {n} states")
    if any(b < 0 for b in budgets):
        raise BackendError(f"max_new_tokens must be >= 0, got {budgets}")
    return budgets


def find_stop(text: str, stop: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string in ``text`` as ``(end offset, string)``, or None."""
    best: tuple[int, str] | None = None
    for s in stop:
        at = text.find(s)
        if at >= 0 and (best is None or at + len(s) < best[0]):
            best = (at + len(s), s)
    return best


ScriptFn = Callable[[GenerationState, int], str]


class ScriptedBackend:
    """A fake policy that writes scripted model text, token by token, honouring stops and budgets.

    ``scripts`` maps a state's ``request_id`` to the full text the model writes over the whole rollout (only
    the model's parts: the environment inserts the rest), as one string or a list of pieces each encoded on
    its own (so a piece boundary is a token boundary). Each row keeps a cursor into its script's token ids;
    a generate call emits tokens from the cursor until the decoded text of this call contains a stop string,
    the script ends (then it emits an end-of-sequence token when ``eos_at_end``), or the budget is spent. Tokens
    are the script's own encoding, so tests know exactly which ids the model "wrote".

    ``letter_probs`` (per request id: letter -> probability) makes watched option-letter tokens carry those
    probabilities at every position, and emitted letter tokens their letter's log-probability; other tokens get
    ``token_logprob``. ``calls`` records every (ids, images count, budget) the backend was asked to continue,
    and the turn grammar it was given (``constraint``; scripted text is not checked against it).
    """

    supports_images = False
    supports_constraints = True
    constrained_logprobs = "raw"

    def __init__(
        self,
        tokenizer: Any,
        scripts: dict[str, str | Sequence[str]],
        *,
        letter_probs: dict[str, dict[str, float]] | None = None,
        token_logprob: float = -0.05,
        eos_at_end: bool = True,
        eos_token_id: int | None = None,
        supports_images: bool = False,
    ):
        self.tokenizer = tokenizer
        self.scripts = {
            k: self._encode(v) if isinstance(v, str) else [t for piece in v for t in self._encode(piece)]
            for k, v in scripts.items()
        }
        self.cursors: dict[str, int] = {k: 0 for k in scripts}
        self.letter_probs = letter_probs or {}
        self.token_logprob = token_logprob
        self.eos_at_end = eos_at_end
        self._eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
        self.supports_images = supports_images
        self.calls: list[list[dict[str, Any]]] = []

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def eos_token_ids(self) -> set[int]:
        return {int(self._eos)} if self._eos is not None else set()

    def prepare_prompt(self, messages: list[dict[str, Any]], images: Sequence[Any] = ()) -> PromptInputs:
        """A plain ``role: text`` rendering (fakes have no chat template); images become ``<image>`` text."""
        parts = []
        for m in messages:
            content = m.get("content", "")
            if isinstance(content, list):
                content = "".join(
                    "<image>" if p.get("type") == "image" else str(p.get("text", "")) for p in content
                )
            parts.append(f"{m.get('role', 'user')}: {content}\n")
        parts.append("assistant: ")
        text = "".join(parts)
        mm = MultimodalInputs(images=list(images), data={"images": list(images)}) if images else None
        return PromptInputs(prompt_ids=self._encode(text), mm=mm, text=text)

    def encode_image(self, image: Any) -> tuple[list[int], MultimodalInputs]:
        if not self.supports_images:
            raise BackendError("this scripted backend was built without image support (supports_images=True)")
        return self._encode("<image>"), MultimodalInputs(images=[image], data={"images": [image]})

    def _letter_tables(self, request_id: str, watch_token_ids: Sequence[int]) -> tuple[list[float], dict[int, float]]:
        probs = self.letter_probs.get(request_id)
        if not probs:
            return [-30.0] * len(watch_token_ids), {}
        by_id: dict[int, float] = {}
        row = []
        for tid in watch_token_ids:
            letter = self.tokenizer.decode([tid]).strip().lstrip(">(").strip().upper()
            p = probs.get(letter, 0.0)
            lp = math.log(p) if p > 0 else -30.0
            row.append(lp)
            by_id[int(tid)] = lp
        return row, by_id

    def generate(
        self,
        states: Sequence[GenerationState],
        stop: Sequence[str],
        max_new_tokens: int | Sequence[int],
        *,
        watch_token_ids: Sequence[int] = (),
        top_logprobs: int = 0,
        constraints: Sequence[Any] | None = None,
    ) -> list[Continuation]:
        budgets = per_row_budgets(max_new_tokens, len(states))
        grammars = list(constraints) if constraints is not None else [None] * len(states)
        self.calls.append(
            [{"ids": list(s.ids), "images": len(s.mm) if s.mm else 0, "budget": b, "request_id": s.request_id,
              "constraint": g}
             for s, b, g in zip(states, budgets, grammars)]
        )
        out = []
        for state, budget in zip(states, budgets):
            if state.request_id not in self.scripts:
                raise BackendError(f"no script for request id {state.request_id!r}")
            script = self.scripts[state.request_id]
            cur = self.cursors[state.request_id]
            watch_row, letter_lp = self._letter_tables(state.request_id, watch_token_ids)
            ids: list[int] = []
            finish: FinishReason = "length"
            stop_hit = None
            while len(ids) < budget:
                if cur >= len(script):
                    if self.eos_at_end and self._eos is not None:
                        ids.append(int(self._eos))
                        finish = "eos"
                    else:
                        finish = "eos"
                    break
                ids.append(script[cur])
                cur += 1
                hit = find_stop(self.tokenizer.decode(ids), stop)
                if hit is not None:
                    finish, stop_hit = "stop", hit[1]
                    break
            self.cursors[state.request_id] = cur
            lps = [letter_lp.get(t, self.token_logprob) for t in ids]
            watch = [list(watch_row) for _ in ids] if watch_token_ids else None
            out.append(Continuation(ids, lps, finish, stop_hit, watch_logprobs=watch))
        return out
