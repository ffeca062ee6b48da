"""What a rollout looks like to API clients: the ``medrwr`` extension object, the event payloads of the stream
and ``usage`` (docs/serving.md). Built from the :class:`~medrwr.rollout.trace.RolloutTrace`, never by
re-parsing the completion text."""

from __future__ import annotations

import re
from typing import Any

from medrwr.retrieval.base import Hit
from medrwr.rollout.trace import CDIRRecord, RetrievalRecord, RolloutTrace
from medrwr.serve.api.images import thumbnail_data_url
from medrwr.serve.api.schemas import to_jsonable

_THINK_TAGS = re.compile(r"</?think>")


def hit_view(h: Hit) -> dict[str, Any]:
    return {"doc_id": h.doc_id, "title": h.title, "source": h.source, "score": h.score, "text": h.text}


def retrieval_view(r: RetrievalRecord) -> dict[str, Any]:
    return to_jsonable({"round": r.round, "queries": list(r.queries), "error": r.error,
                        "hits": [[hit_view(h) for h in hs] for hs in r.hits]})


def cdir_view(c: CDIRRecord | None, *, thumbnails: bool = True) -> dict[str, Any] | None:
    """The CDIR step: both answers, the threshold and the consulted case (with a thumbnail data URL)."""
    if c is None:
        return None
    case = None
    if c.cases:
        h = c.cases[0]
        image = None
        if thumbnails:
            meta = h.metadata or {}
            src = next((meta[k] for k in ("image", "image_bytes", "bytes") if meta.get(k) is not None), h.image_path)
            image = thumbnail_data_url(src) if src else None
        case = {"image_id": h.image_id, "report": h.report, "score": h.score, "image": image}
    first, second = c.first, c.second
    return to_jsonable({
        "triggered": c.triggered, "reason": c.reason, "error": c.error, "threshold": c.threshold,
        "first_answer": first.answer if first else None, "first_choice": first.choice if first else None,
        "first_confidence": first.confidence if first else c.confidence,
        "second_answer": second.answer if second else None, "second_choice": second.choice if second else None,
        "second_confidence": second.confidence if second else None, "case": case,
    })


def trace_view(t: RolloutTrace, *, thumbnails: bool = True) -> dict[str, Any]:
    """The ``medrwr`` extension field of a choice."""
    think = "\n".join(_THINK_TAGS.sub("", s.text).strip() for s in t.spans if s.kind == "think" and s.by_model)
    return to_jsonable({
        "think": think.strip(), "queries": list(t.queries), "rounds": t.rounds,
        "retrievals": [retrieval_view(r) for r in t.retrievals],
        "answer": t.answer, "choice": t.choice, "confidence": t.confidence, "option_probs": t.option_probs,
        "stop_reason": t.stop_reason, "valid": t.valid, "error": t.error,
        "cdir": cdir_view(t.cdir, thumbnails=thumbnails),
        "completion_text": t.completion_text,
        "tokens": {"prompt": len(t.prompt_ids), "model": t.num_model_tokens, "inserted": t.num_inserted_tokens},
        "warnings": list(t.metadata.get("warnings") or []),
    })


def finish_reason(t: RolloutTrace) -> str:
    return "stop" if t.stop_reason == "answer" and t.answer is not None else "length"


def usage(traces: list[RolloutTrace]) -> dict[str, int]:
    """OpenAI usage (completion = model-written tokens) plus ``inserted_tokens`` (retrieved text)."""
    prompt = len(traces[0].prompt_ids) if traces else 0
    completion = sum(t.num_model_tokens for t in traces)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "inserted_tokens": sum(t.num_inserted_tokens for t in traces)}


def completion_body(rid: str, created: int, model: str, traces: list[RolloutTrace]) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` response."""
    choices = []
    for i, t in enumerate(traces):
        view = trace_view(t)
        choices.append({"index": i, "message": {"role": "assistant", "content": t.answer or ""},
                        "finish_reason": finish_reason(t), "logprobs": None, "medrwr": view})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(traces), "medrwr": choices[0]["medrwr"] if choices else None}


__all__ = ["cdir_view", "completion_body", "finish_reason", "hit_view", "retrieval_view", "trace_view", "usage"]
