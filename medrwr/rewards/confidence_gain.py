"""Confidence-gain reward σc (docs/method.md §2), computed from the policy itself.

::

    σc = log p(gold | trajectory with retrieval) − log p(gold | trajectory without retrieval)

Both probabilities are read at the same model token: the one holding the first non-whitespace character
after the final ``<answer>`` (the engine's confidence position). At that position the probability of an
option letter is the summed probability of its single-token spellings ``B``, ``b``, `` B``, `` b``, ``>B``,
``>b``, ``> B``, ``\\nB``, ... (Qwen writes ``<answer>B`` as ``<``, ``answer``, ``>B``), renormalised over the
sample's option letters. σc = 0 when no query was issued, when there is no answer block, or when the gold
answer is not an option letter. Each log-probability is floored at ``MIN_LOGPROB`` = log(1e-9), so
σc ∈ [−20.72, 20.72].

- *With retrieval*: the trace's ``option_probs`` when the engine recorded them (the sampling distribution at
  that position, same letter spellings); otherwise a forward pass over ``prompt_ids + completion_ids`` up to
  that token.
- *Without retrieval* (default): one extra forward pass, batched, over ``prompt_ids`` + the model-only
  completion tokens up to that token: the tokens with ``completion_mask == 0`` (retrieve blocks, tags
  included) are dropped from ``completion_ids`` -- token-exact, nothing is re-tokenised -- so the model sees its
  own reasoning and queries but none of the retrieved text.
- *compat* (the reference code): the "without" side is the first generation pass's answer distribution, the
  trace's ``first_pass_option_probs`` (the engine records it when the rollout's first turn answered). The
  reference read it from a first pass that stops at ``</query>`` -- whenever the model searched, that pass has
  no answer token and the reference's default log-probability 0 stands in, so compat σc = log p(gold | with
  retrieval); the engine leaves the field None in exactly that case.

The answer token is the trace's ``answer_position`` (where the engine read its confidence); only traces
without one (plain strings, traces from elsewhere) locate it by decoding the tail of the model tokens.

Three bugs of the reference's ``RetrieveLogitORM`` are not reproduced, in either mode: it read the raw token
after ``<answer>`` (probability ≈ 1 when that token is a space or ``>``), it compared the gold letter
lower-cased against case-sensitive token strings (so the gold token was never found and the default 0 was
used), and it never renormalised over the options.

Vision-language policies get their image inputs (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``)
from the processor, applied to the sample's images (the ``images``/``image`` column, else the trace's
``images`` paths). Plain completion strings (no traces) are tokenised segment by segment as an approximation;
that path is text-only. Sequences longer than ``max_length`` tokens (default: the model's
``max_position_embeddings``) get σc = 0 with a warning rather than an out-of-memory forward pass.

Columns read: ``answer``, ``options``/``choices`` (letters; else the ``A. …`` lines of the prompt, else the
trace's ``option_probs`` keys, else A–D), ``images``/``image``, ``prompts``.

Long module: the letter tables, the answer-token lookup and the batched (multimodal) forward pass exist only
for this reward and are checked together against a manual forward pass (tests/test_rewards_confidence.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medrwr.protocol import (
    ANSWER,
    ANSWER_CHOICE_START,
    LETTER_TOKEN_PREFIXES,
    OPTION_LETTERS,
    RETRIEVE,
    close_tag,
    letter_token_ids,
    open_tag,
    split_segments,
    token_index_at_char,
)
from medrwr.rewards._common import (
    SampleView,
    column,
    option_letters_from_prompt,
    option_map,
    sample_views,
)
from medrwr.rewards.accuracy import OPTION_COLUMNS, gold_answers

logger = logging.getLogger(__name__)

MIN_LOGPROB = math.log(1e-9)
RANGE = (MIN_LOGPROB, -MIN_LOGPROB)
LETTER_PREFIXES = LETTER_TOKEN_PREFIXES
"""Prefixes of the single-token letter spellings summed per option: the rollout engine's table (protocol)."""
_ANSWER_OPEN = open_tag(ANSWER)


@dataclass
class _Item:
    index: int
    gold: str
    letters: str
    prompt_ids: list[int]
    with_ids: list[int] | None  # None when the trace's option_probs give the "with" side
    without_ids: list[int] | None  # None in compat mode
    images: list[Any]
    with_logp: float | None = None
    without_logp: float | None = None


def _decode(tok: Any, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def answer_token_index(tok: Any, model_ids: Sequence[int], window: int = 64) -> int | None:
    """Index in `model_ids` of the token the engine reads confidence at: the first choice-naming character
    (:data:`medrwr.protocol.ANSWER_CHOICE_START`) after the last ``<answer>``.

    Decodes a tail window (doubled until it holds the tag), so the cost does not grow with the completion.
    """
    n = len(model_ids)
    if not n:
        return None
    w = min(window, n)
    while True:
        start = n - w
        tail = list(model_ids[start:])
        text = _decode(tok, tail)
        at = text.rfind(_ANSWER_OPEN)
        if at >= 0 or start == 0:
            break
        w = min(2 * w, n)
    if at < 0:
        return None
    end = text.find(close_tag(ANSWER), at)
    m = ANSWER_CHOICE_START.search(text, at + len(_ANSWER_OPEN), end if end >= 0 else len(text))
    if m is None:
        return None
    return start + token_index_at_char(lambda ids: _decode(tok, ids), tail, m.start())


def _recorded_answer_index(trace: Any, cmask: Sequence[int]) -> int | None:
    """The trace's ``answer_position`` as an index among the model tokens; None when absent or not a model token."""
    pos = getattr(trace, "answer_position", None)
    if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < len(cmask) or not cmask[pos]:
        return None
    return sum(1 for m in cmask[:pos] if m)


def letter_token_table(tok: Any, letters: str = OPTION_LETTERS) -> dict[str, list[int]]:
    """Single-token spellings of each option letter (upper/lower case, after each of :data:`LETTER_PREFIXES`)."""
    table: dict[str, list[int]] = {letter: [] for letter in letters}
    for tid, letter in letter_token_ids(lambda t: tok.encode(t, add_special_tokens=False), letters).items():
        table[letter].append(tid)
    return table


def option_logprobs(logprobs: Any, table: dict[str, list[int]], letters: str) -> dict[str, float]:
    """Log-probabilities of `letters` at one position, renormalised over them.

    `logprobs` is a log-softmax (or raw logit) row indexed like `table`'s ids: the vocabulary normaliser
    cancels in the renormalisation.
    """
    import torch

    raw = {}
    for L in letters:
        ids = table.get(L) or []
        raw[L] = float(torch.logsumexp(logprobs[ids], dim=0)) if ids else -math.inf
    finite = [v for v in raw.values() if v > -math.inf]
    if not finite:
        return {L: -math.inf for L in letters}
    z = max(finite) + math.log(sum(math.exp(v - max(finite)) for v in finite))
    return {L: v - z for L, v in raw.items()}


def _floor(lp: float) -> float:
    if lp is None or math.isnan(lp):
        return MIN_LOGPROB
    return max(lp, MIN_LOGPROB)


def _logp_from_probs(probs: Any, gold: str, letters: str) -> float | None:
    if not isinstance(probs, dict) or not probs:
        return None
    vals = {L: float(probs.get(L, 0.0) or 0.0) for L in letters}
    vals = {L: v for L, v in vals.items() if not math.isnan(v) and v >= 0}
    total = sum(vals.values())
    if total <= 0 or not math.isfinite(total):
        return None
    p = vals.get(gold, 0.0) / total
    return math.log(p) if p > 0 else -math.inf


def _option_letters(i: int, options: list, prompts: list, trace: Any, gold: str) -> str:
    letters = "".join(option_map(options[i]).keys()) if options[i] is not None else ""
    if not letters and prompts[i] is not None:
        letters = option_letters_from_prompt(prompts[i])
    if not letters:
        probs = getattr(trace, "option_probs", None)
        if isinstance(probs, dict):
            letters = "".join(k for k in OPTION_LETTERS if k in probs)
    if not letters:
        letters = "ABCD"
    letters = "".join(L for L in letters if L in OPTION_LETTERS)
    if gold not in letters:
        letters += gold
    return letters


class ConfidenceGainReward:
    """σc through the policy (see the module docstring). Build it with :func:`get_confidence_gain_reward`."""

    __name__ = "confidence_gain_reward"

    def __init__(
        self,
        model: Any,
        processing_class: Any,
        compat: bool = False,
        batch_size: int = 8,
        use_trace_option_probs: bool = True,
        max_length: int | None = None,
    ):
        if model is None:
            raise ValueError(
                "the confidence-gain reward needs the policy model (get_confidence_gain_reward(model, processor))"
            )
        if processing_class is None:
            raise ValueError("the confidence-gain reward needs the policy's tokenizer or processor")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processing_class = processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", None) or processing_class
        self.image_processor = getattr(processing_class, "image_processor", None)
        self.compat = bool(compat)
        self.batch_size = int(batch_size)
        self.use_trace_option_probs = bool(use_trace_option_probs)
        self._table: dict[str, list[int]] | None = None
        tok = self.tokenizer
        self.image_token_id = getattr(processing_class, "image_token_id", None)
        if self.image_token_id is None:
            tid = (
                tok.convert_tokens_to_ids("<|image_pad|>") if hasattr(tok, "convert_tokens_to_ids") else None
            )
            self.image_token_id = (
                tid if isinstance(tid, int) and tid != getattr(tok, "unk_token_id", None) else None
            )
        self._warned: set[str] = set()
        cfg = getattr(model, "config", None)
        limit = (
            max_length
            or getattr(getattr(cfg, "text_config", None), "max_position_embeddings", None)
            or getattr(cfg, "max_position_embeddings", None)
        )
        self.max_length = int(limit) if isinstance(limit, int) and limit > 0 else 32768

    # ------------------------------------------------------------------------------------------ helpers

    @property
    def table(self) -> dict[str, list[int]]:
        if self._table is None:
            self._table = letter_token_table(self.tokenizer)
        return self._table

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg)

    def _pseudo_trace(self, view: SampleView, prompt: Any) -> tuple[list[int], list[int], list[int]] | None:
        """(prompt_ids, completion_ids, mask) for a plain string completion: segment-wise tokenisation."""
        tok = self.tokenizer
        if prompt is None:
            return None
        if isinstance(prompt, str):
            prompt_ids = tok.encode(prompt, add_special_tokens=False)
        else:
            msgs = list(prompt)
            for m in msgs:
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, list) and any(
                    isinstance(p, dict) and p.get("type") in ("image", "image_url") for p in content
                ):
                    self._warn_once(
                        "str-image", "confidence_gain_reward: image prompts need traces (token ids); σc = 0"
                    )
                    return None
            prompt_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
                prompt_ids = prompt_ids["input_ids"]
        ids: list[int] = []
        mask: list[int] = []
        text = view.text
        for seg in split_segments(text):
            piece = tok.encode(text[seg.start : seg.end], add_special_tokens=False)
            ids.extend(piece)
            mask.extend([0 if seg.kind == RETRIEVE else 1] * len(piece))
        return list(prompt_ids), ids, mask

    def _images_for(self, i: int, cols: list, view: SampleView) -> list[Any]:
        src = cols[i]
        if src is None and view.trace is not None:
            src = getattr(view.trace, "images", None)
        if src is None:
            return []
        return [x for x in (src if isinstance(src, (list, tuple)) else [src]) if x is not None]

    # ------------------------------------------------------------------------------------------ forward

    def _pixel_inputs(self, images: list[Any], n_placeholders: int) -> dict[str, Any]:
        from medrwr.errors import ImageLoadError
        from medrwr.retrieval.image_io import load_image

        if self.image_processor is None:
            raise ValueError(
                f"a prompt holds {n_placeholders} image placeholder tokens but the confidence-gain reward was "
                "given a tokenizer, not the policy's processor: pass the processor"
            )
        try:
            pil = [load_image(x) for x in images]
        except ImageLoadError as exc:
            raise ValueError(
                f"confidence_gain_reward cannot load the sample's images ({exc}); pass them in the 'images' "
                "dataset column"
            ) from None
        out = self.image_processor(images=pil, return_tensors="pt")
        grid = out["image_grid_thw"]
        merge = int(getattr(self.image_processor, "merge_size", 2))
        need = int(sum(int(g.prod()) // (merge * merge) for g in grid))
        if need != n_placeholders:
            raise ValueError(
                f"the prompt holds {n_placeholders} image placeholder tokens but the processor makes {need} for "
                "the sample's images: give the reward the same processor (and max_pixels) as the rollout"
            )
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}

    def _forward(self, seqs: list[tuple[list[int], list[Any]]], gather_ids: list[int]) -> list[Any]:
        """Logits at `gather_ids` at the last position of each sequence (left-padded batches)."""
        import torch

        gather = torch.as_tensor(gather_ids, dtype=torch.long)

        model = self.model
        try:
            param = next(model.parameters())
            device, dtype = param.device, param.dtype
        except (StopIteration, AttributeError, TypeError):
            device, dtype = torch.device("cpu"), torch.float32
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        order = sorted(range(len(seqs)), key=lambda j: len(seqs[j][0]))
        results: list[Any] = [None] * len(seqs)
        pixel_cache: dict[tuple[int, int], dict[str, Any]] = {}
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(order), self.batch_size):
                    chunk = order[s : s + self.batch_size]
                    width = max(len(seqs[j][0]) for j in chunk)
                    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    pv, grids = [], []
                    for b, j in enumerate(chunk):
                        seq, images = seqs[j]
                        ids[b, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
                        mask[b, width - len(seq) :] = 1
                        n_img = (
                            sum(1 for t in seq if t == self.image_token_id)
                            if self.image_token_id is not None
                            else 0
                        )
                        if n_img:
                            if not images:
                                raise ValueError(
                                    f"a prompt holds {n_img} image placeholder tokens but the sample has no images: "
                                    "pass them in the 'images' dataset column (or keep them on the trace)"
                                )
                            key = (id(images), n_img)  # the with/without pair shares its images
                            px = pixel_cache.get(key)
                            if px is None:
                                px = pixel_cache[key] = self._pixel_inputs(images, n_img)
                            pv.append(px["pixel_values"])
                            grids.append(px["image_grid_thw"])
                    batch: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
                    if pv:
                        batch["pixel_values"] = torch.cat(pv, dim=0).to(device=device, dtype=dtype)
                        batch["image_grid_thw"] = torch.cat(grids, dim=0).to(device)
                        types = torch.zeros_like(ids)
                        types[ids == self.image_token_id] = 1
                        batch["mm_token_type_ids"] = (types * mask).to(device)
                    else:
                        pos = (mask.cumsum(-1) - 1).clamp(min=0)
                        batch["position_ids"] = pos.to(device)
                    try:
                        out = model(**batch, use_cache=False, logits_to_keep=1)
                    except TypeError:  # models without logits_to_keep
                        out = model(**batch, use_cache=False)
                    rows = out.logits[:, -1, :][:, gather.to(out.logits.device)].float().cpu()
                    for b, j in enumerate(chunk):
                        results[j] = rows[b]
        finally:
            if hasattr(model, "train"):
                model.train(was_training)
        return results

    # ------------------------------------------------------------------------------------------ call

    def score(self, views: list[SampleView], answer: Any = None, **kwargs: Any) -> list[float]:
        n = len(views)
        golds = gold_answers(n, answer, **kwargs)
        options = column(kwargs, OPTION_COLUMNS, n)
        prompts = column(kwargs, ("prompts", "prompt"), n)
        image_cols = column(
            {"images": kwargs.get("images"), "image": kwargs.get("image")}, ("images", "image"), n
        )
        tok = self.tokenizer
        items: list[_Item] = []
        for i, v in enumerate(views):
            gold = golds[i].letter
            if not v.queries or gold is None or v.answer is None:
                continue
            trace = v.trace
            if trace is not None and getattr(trace, "completion_ids", None):
                prompt_ids = list(getattr(trace, "prompt_ids", []) or [])
                comp = list(trace.completion_ids)
                cmask = list(getattr(trace, "completion_mask", None) or [1] * len(comp))
                if len(cmask) != len(comp):
                    self._warn_once(
                        "mask",
                        "confidence_gain_reward: a trace's completion_mask and completion_ids differ in length; σc = 0",
                    )
                    continue
            else:
                built = self._pseudo_trace(v, prompts[i])
                if built is None:
                    self._warn_once(
                        "noids", "confidence_gain_reward: no token ids (no traces and no prompts); σc = 0"
                    )
                    continue
                prompt_ids, comp, cmask = built
            if len(prompt_ids) + len(comp) > self.max_length:
                self._warn_once(
                    "long",
                    f"confidence_gain_reward: a sequence is longer than max_length={self.max_length} tokens; σc = 0 for it",
                )
                continue
            model_pos = [k for k, m in enumerate(cmask) if m]
            model_ids = [comp[k] for k in model_pos]
            p = _recorded_answer_index(trace, cmask)
            if p is None:
                p = answer_token_index(tok, model_ids)
            if p is None:
                continue
            letters = _option_letters(i, options, prompts, trace, gold)
            item = _Item(i, gold, letters, prompt_ids, None, None, self._images_for(i, image_cols, v))
            probs = getattr(trace, "option_probs", None) if self.use_trace_option_probs else None
            lw = _logp_from_probs(probs, gold, letters) if probs else None
            if lw is not None:
                item.with_logp = lw
            else:
                item.with_ids = prompt_ids + comp[: model_pos[p]]
            if self.compat:
                lwo = _logp_from_probs(getattr(trace, "first_pass_option_probs", None), gold, letters)
                item.without_logp = 0.0 if lwo is None else lwo
            else:
                item.without_ids = prompt_ids + model_ids[:p]
            if (item.with_ids is not None and not item.with_ids) or (
                item.without_ids is not None and not item.without_ids
            ):
                continue  # nothing precedes the answer token: no distribution to read
            items.append(item)
        seqs: list[tuple[list[int], list[Any]]] = []
        slots: list[tuple[_Item, str]] = []
        for it in items:
            if it.with_ids is not None:
                seqs.append((it.with_ids, it.images))
                slots.append((it, "with"))
            if it.without_ids is not None:
                seqs.append((it.without_ids, it.images))
                slots.append((it, "without"))
        if seqs:
            table = self.table
            gather_ids = sorted({t for ids in table.values() for t in ids})
            column_of = {t: c for c, t in enumerate(gather_ids)}
            compact = {L: [column_of[t] for t in ids] for L, ids in table.items()}
            rows = self._forward(seqs, gather_ids)
            for (it, side), row in zip(slots, rows):
                lp = option_logprobs(row, compact, it.letters)[it.gold]
                if side == "with":
                    it.with_logp = lp
                else:
                    it.without_logp = lp
        out = [0.0] * n
        for it in items:
            val = _floor(it.with_logp) - _floor(it.without_logp)
            out[it.index] = float(val) if math.isfinite(val) else 0.0
        return out

    def __call__(self, completions=None, traces=None, answer=None, **kwargs: Any) -> list[float]:
        return self.score(sample_views(completions, traces), answer, **kwargs)

    def __repr__(self) -> str:
        return f"ConfidenceGainReward(compat={self.compat}, batch_size={self.batch_size})"


def get_confidence_gain_reward(
    model: Any,
    processing_class: Any,
    compat: bool = False,
    batch_size: int = 8,
    use_trace_option_probs: bool = True,
    max_length: int | None = None,
) -> ConfidenceGainReward:
    """σc bound to the policy `model` and its tokenizer or processor (see the module docstring).

    >>> get_confidence_gain_reward(None, None)
    Traceback (most recent call last):
    ...
    ValueError: the confidence-gain reward needs the policy model (get_confidence_gain_reward(model, processor))
    """
    return ConfidenceGainReward(
        model,
        processing_class,
        compat=compat,
        batch_size=batch_size,
        use_trace_option_probs=use_trace_option_probs,
        max_length=max_length,
    )


__all__ = [
    "LETTER_PREFIXES",
    "MIN_LOGPROB",
    "RANGE",
    "ConfidenceGainReward",
    "answer_token_index",
    "get_confidence_gain_reward",
    "letter_token_table",
    "option_logprobs",
]
