"""Grammar-constrained decoding of the protocol (``rollout.constrain: protocol``), built on llguidance.

Untuned models (the packaged SmolLM2, base Qwen2.5-VL checkpoints) rarely write well-formed ``<query>`` /
``<answer>`` blocks, so an evaluation of them mostly measures format failures. With ``constrain: protocol``
every generated token must keep the turn inside the protocol grammar (docs/method.md §1); *what* the model
writes inside the blocks, and whether it searches or answers, stays its own choice.

One grammar per row and per turn (a turn ends at ``</query>``, ``</answer>`` or the end token; the retrieve
blocks the environment inserts are outside it), built here from the :mod:`medrwr.protocol` constants::

    turn    := ws? think ws? ( query | answer )       query only while the search budget lasts
    think   := "<think>" TEXT "</think>"
    query   := "<query>" TEXT "</query>"
    answer  := "<answer>" choice "</answer>"
    choice  := "B" | "B. <option B's text>" | ...      one alternative per option of the question
    TEXT    := no "<" or ">", at least one non-whitespace character, at most N tokens
    ws      := one or two spaces/newlines

The answer is the bare letter or the letter followed by the option's exact text: both are what
:func:`medrwr.protocol.extract_choice` and the accuracy reward read. Questions without options get a free-text
answer (``TEXT``). When the row's search budget (``rollout.max_rounds``) is spent the grammar allows only an
answer. Think and query lengths are bounded in tokens (``rollout.constrain_max_think_tokens`` /
``constrain_max_query_tokens``, shrunk to fit the turn's token budget), so the model always has room to close
its blocks: a constrained turn is never cut by ``max_new_tokens_per_turn``.

Backends apply the grammar: the transformers backend through :class:`GrammarLogitsProcessor` (one llguidance
matcher per row, started fresh every turn), vLLM through ``StructuredOutputsParams(grammar=...)`` with its
``guidance`` structured-output backend (the same library, the same grammar text).

Log-probabilities: the transformers backend records the model's own (unconstrained) log-probabilities, as
it does without a constraint (its recorder runs before every logits processor); vLLM reports them after its
grammar mask. The trace records both facts (``constrained``, ``metadata["constrained_logprobs"]``).
Training leaves ``constrain`` off, so the log-probabilities it reads are unaffected.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medrwr import protocol
from medrwr.errors import ConstraintError

logger = logging.getLogger(__name__)

__all__ = [
    "CONSTRAIN_MODES",
    "GrammarLogitsProcessor",
    "TurnGrammar",
    "ll_tokenizer",
    "protocol_grammar",
    "resolve_constrain",
    "turn_grammar",
]

CONSTRAIN_MODES: tuple[str, ...] = ("auto", "none", "protocol")
"""``rollout.constrain`` values; ``auto`` = ``protocol`` for the packaged demo policy, ``none`` otherwise."""

# Tag text the grammar forces around the model's text, counted as if each byte were one token (the worst
# case), plus the optional whitespace: what must always fit in a turn besides the bounded texts.
_TAG_OVERHEAD = (
    len(protocol.open_tag(protocol.THINK) + protocol.close_tag(protocol.THINK))
    + max(len(protocol.open_tag(k) + protocol.close_tag(k)) for k in (protocol.QUERY, protocol.ANSWER))
    + 4
)

# Block text: no '<' or '>' (docs/method.md §1), starting with a character Python's str.strip() keeps (\s is
# Unicode White_Space; Python also strips \x1c-\x1f), so a block is never blank. The first character is the one
# that must not be blank, not "some" character: llguidance ends a lexeme at its max_tokens whatever its regex
# says, and a regex that needs a non-blank character *somewhere* then lets "<think>\n</think>" through.
_TEXT_RE = r"/[^<>\s\x1c-\x1f][^<>]*/"
_MIN_THINK = 8


@dataclass(frozen=True)
class TurnGrammar:
    """The grammar of one row's next turn: llguidance Lark text plus what it allows (for traces and tests)."""

    lark: str
    allow_query: bool
    letters: str
    max_think_tokens: int
    max_query_tokens: int
    name: str = "protocol"


def resolve_constrain(model: Any, rollout: Any) -> str:
    """``rollout.constrain`` with ``auto`` resolved (``model``/``rollout``: the config sections): ``protocol`` for
    the packaged demo policy (``model.name`` None: SmolLM2-135M-Instruct, untuned, answers in prose without it),
    ``none`` for every other model. The one place that default is decided.

    >>> from medrwr.config import ModelConfig, RolloutConfig
    >>> resolve_constrain(ModelConfig(), RolloutConfig()), resolve_constrain(ModelConfig(name="x"), RolloutConfig())
    ('protocol', 'none')
    """
    if rollout.constrain != "auto":
        return rollout.constrain
    return "protocol" if model.name is None else "none"


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _choices(letters: str, options: Mapping[str, str] | None) -> list[str]:
    out: list[str] = []
    for letter in letters:
        out.append(letter)
        text = " ".join(str((options or {}).get(letter, "")).split())
        if text and "<" not in text and ">" not in text:
            out.append(f"{letter}. {text}")
    return out


def protocol_grammar(
    letters: str = "",
    options: Mapping[str, str] | None = None,
    *,
    allow_query: bool = True,
    max_think_tokens: int = 256,
    max_query_tokens: int = 48,
) -> str:
    """The Lark grammar (llguidance dialect) of one turn; see the module docstring.

    >>> g = protocol_grammar("AB", {"A": "Pneumonia", "B": "Pneumothorax"}, allow_query=False)
    >>> '"B. Pneumothorax"' in g and "query" not in g
    True
    """
    t, q, a = protocol.THINK, protocol.QUERY, protocol.ANSWER
    tail = "query | answer" if allow_query else "answer"
    choices = _choices(letters, options)
    choice = " | ".join(_lit(c) for c in choices) if choices else "answer_text"
    longest = max((len(c.encode()) for c in choices), default=max_query_tokens)
    lines = [
        f"start: WS? think WS? ({tail})",
        f"think: {_lit(protocol.open_tag(t))} think_text {_lit(protocol.close_tag(t))}",
        f"think_text[max_tokens={max(1, max_think_tokens)}]: {_TEXT_RE}",
        f"answer: {_lit(protocol.open_tag(a))} choice {_lit(protocol.close_tag(a))}",
        f"choice: {choice}",
    ]
    if not choices:
        lines.append(f"answer_text[max_tokens={max(1, min(longest, max_query_tokens))}]: {_TEXT_RE}")
    if allow_query:
        lines += [
            f"query: {_lit(protocol.open_tag(q))} query_text {_lit(protocol.close_tag(q))}",
            f"query_text[max_tokens={max(1, max_query_tokens)}]: {_TEXT_RE}",
        ]
    lines.append("WS: /[ \\n]{1,2}/")
    return "\n".join(lines) + "\n"


def turn_grammar(
    letters: str,
    options: Mapping[str, str] | None,
    *,
    allow_query: bool,
    budget: int,
    max_think_tokens: int,
    max_query_tokens: int,
) -> TurnGrammar:
    """The grammar of a row's next turn, its text bounds shrunk so the whole turn fits ``budget`` tokens.

    Every token holds at least one byte, so tags (counted byte by byte), whitespace, the longest answer and the
    bounded think and query texts together never exceed the budget; when even the tags don't fit, the texts
    get one token each and the budget may still cut the turn (recorded as ``max_tokens``, as unconstrained).
    """
    avail = budget - _TAG_OVERHEAD
    query = max(1, min(max_query_tokens, avail // 3)) if allow_query else 0

    def tail_for(opts: Mapping[str, str] | None) -> int:
        longest = max((len(c.encode()) for c in _choices(letters, opts)), default=max_query_tokens)
        return max(query, longest if letters else min(longest, max_query_tokens))

    tail = tail_for(options)
    if options and avail - tail < _MIN_THINK:  # a tight budget: answer with the bare letter
        options = None
        tail = tail_for(None)
    think = max(1, min(max_think_tokens, avail - tail))
    lark = protocol_grammar(
        letters, options, allow_query=allow_query, max_think_tokens=think, max_query_tokens=max(query, 1)
    )
    return TurnGrammar(lark, allow_query, letters, think, query)


# ---------------------------------------------------------------------- llguidance glue


def _llguidance():
    from medrwr._imports import require

    return require("llguidance", "constrain", "grammar-constrained decoding (rollout.constrain: protocol)")


_TOKENIZERS: dict[tuple[int, int], Any] = {}


def ll_tokenizer(tokenizer: Any, n_vocab: int) -> Any:
    """llguidance's view of a (fast) Hugging Face tokenizer with the model's logit width; cached (~1-2 s)."""
    key = (id(tokenizer), int(n_vocab))
    hit = _TOKENIZERS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    llg = _llguidance()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConstraintError(
            f"constrained decoding needs a fast (Rust) tokenizer, not {type(tokenizer).__name__}; "
            "set rollout.constrain: none"
        )
    spec = json.loads(backend.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    _fix_byte_level_decoder(spec)
    ll = llg.LLTokenizer(json.dumps(spec), n_vocab=int(n_vocab), eos_token=tokenizer.eos_token_id)
    _check_same_bytes(tokenizer, ll)
    _TOKENIZERS[key] = (tokenizer, ll)
    return ll


def _fix_byte_level_decoder(spec: dict[str, Any]) -> None:
    """Make a byte-level BPE's decoder plain ``ByteLevel`` so llguidance reads ``Ġ`` as a space.

    transformers' GGUF conversion (the packaged SmolLM2) writes a ``Sequence`` decoder (ByteFallback, Fuse,
    Replace ``▁``, ByteLevel) that decodes GPT-2 vocabularies correctly but that llguidance does not recognise
    as byte-level, so it would take ``ĠGiant`` literally and mask the wrong tokens.
    """
    dec = spec.get("decoder") or {}
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if dec.get("type") == "Sequence" and any(p.get("type") == "ByteLevel" for p in pres if p):
        level = [d for d in dec.get("decoders", []) if d.get("type") == "ByteLevel"]
        if level:
            spec["decoder"] = level[0]


def _check_same_bytes(tokenizer: Any, ll: Any, sample: int = 400) -> None:
    """Refuse a llguidance view that decodes tokens differently from the tokenizer (a silently wrong mask)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = len(tokenizer)
    step = max(1, n // sample)
    ids = [i for i in range(0, n, step) if i not in special]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if ll.decode_str(ids) != text:
        raise ConstraintError(
            "llguidance reads this tokenizer's tokens differently from the tokenizer itself; constrained "
            "decoding would mask the wrong tokens. Set rollout.constrain: none for this model."
        )


def new_matcher(ll_tok: Any, grammar: TurnGrammar) -> Any:
    """A fresh llguidance matcher for one row's turn; :class:`ConstraintError` when the grammar is rejected."""
    llg = _llguidance()
    matcher = llg.LLMatcher(ll_tok, llg.LLMatcher.grammar_from_lark(grammar.lark), log_level=1)
    if matcher.is_error():
        raise ConstraintError(f"the protocol grammar was rejected by llguidance: {matcher.get_error()}")
    return matcher


class GrammarLogitsProcessor:
    """A transformers logits processor applying one grammar per row (None = that row is unconstrained).

    Each row has its own matcher (rows of a batch sit at different grammar states). At every step it feeds the
    row's previous token to its matcher, then masks every token the grammar forbids to ``-inf``. Rows that
    ``finished(b)`` reports done (stop string, end token or budget; the batch then pads them) are left alone.
    """

    def __init__(
        self,
        tokenizer: Any,
        n_vocab: int,
        grammars: Sequence[TurnGrammar | None],
        prompt_len: int,
        finished: Any = None,
        consumed: Sequence[Sequence[int]] | None = None,
    ):
        """``consumed``: each row's tokens already written in this turn by an earlier call (a paused row)."""
        import numpy as np

        self._np = np
        self.ll = ll_tokenizer(tokenizer, n_vocab)
        self.grammars = list(grammars)
        self.matchers = [new_matcher(self.ll, g) if g is not None else None for g in self.grammars]
        for b, tokens in enumerate(consumed or ()):
            m = self.matchers[b]
            if m is not None and tokens and not m.consume_tokens([int(t) for t in tokens]):
                raise ConstraintError(f"row {b}: its earlier tokens break the grammar ({m.get_error()[:300]})")
        self.prompt_len = prompt_len
        self.finished = finished or (lambda b: False)
        self.n_words = (n_vocab + 31) // 32
        self.mask_s = 0.0

    def _allowed(self, matcher: Any) -> Any:
        np = self._np
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little").astype(bool)

    def __call__(self, input_ids, scores):
        import time

        import torch

        t0 = time.perf_counter()
        started = input_ids.shape[1] > self.prompt_len
        for b, matcher in enumerate(self.matchers):
            if matcher is None:
                continue
            if started:
                if self.finished(b):  # stopped (stop string, end token, budget): the batch pads it now
                    continue
                if not matcher.is_stopped() and not matcher.consume_token(int(input_ids[b, -1])):
                    raise ConstraintError(
                        f"row {b}: the sampled token {int(input_ids[b, -1])} broke the grammar "
                        f"({matcher.get_error()[:300]})"
                    )
            allowed = self._allowed(matcher)[: scores.shape[1]]
            if not allowed.any():  # pragma: no cover - llguidance always allows at least EOS
                continue
            forbid = torch.from_numpy(~allowed).to(scores.device)
            if forbid.shape[0] < scores.shape[1]:
                forbid = torch.cat([forbid, forbid.new_ones(scores.shape[1] - forbid.shape[0])])
            scores[b].masked_fill_(forbid, float("-inf"))
        self.mask_s += time.perf_counter() - t0
        return scores
