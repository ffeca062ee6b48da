"""Confidence-Driven Image Re-retrieval (METHOD.md §5), a test-time second look.

After a row answers with confidence η below ``cdir.threshold``, the question's (first) image is searched in an
image index of (image, report) cases and the top case(s) consulted:

1. the final turn (the model's last think + the low-confidence answer) is dropped, as the reference code
   does, so the transcript stays grammar-valid: ``... retrieve | think query retrieve(case) | think answer``;
2. a fixed think block and a fixed query block are appended, then a retrieve block holding the case image as a
   **real image input** (its placeholder tokens, e.g. ``<|vision_start|><|image_pad|>…<|vision_end|>`` for
   Qwen2.5-VL, with its pixel values added to the row's images) followed by its report;
3. the model answers again (the usual loop, so it may still search if rounds remain).

Everything inserted here is written by the environment, the fixed think and query blocks included, so it is
mask 0 (not the model's text: it never enters a loss). Both answers and confidences stay in ``trace.cdir``,
together with the dropped tokens, so nothing is lost. CDIR needs a backend that can encode images (a VLM).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from medrwr import protocol
from medrwr.retrieval.base import ImageHit

if TYPE_CHECKING:  # pragma: no cover
    from medrwr.rollout.engine import RolloutEngine, _Row

logger = logging.getLogger(__name__)

__all__ = ["CDIR_QUERY", "CDIR_THINK", "run_cdir"]

CDIR_THINK = (
    "<think>\nMy confidence in this answer is low. I will consult a case with similar medical imaging findings "
    "and use it, together with the information retrieved before, to answer.\n</think>\n"
)
CDIR_QUERY = "<query>\nconsultation from a case with similar medical imaging findings\n</query>\n"


def _answer_snapshot(row: _Row, engine: RolloutEngine, dropped_from: int | None = None) -> dict[str, Any]:
    tr = row.trace
    snap: dict[str, Any] = {
        "answer": tr.answer,
        "choice": tr.choice if tr.choice is not None else protocol.extract_choice(tr.answer, row.letters or protocol.OPTION_LETTERS),
        "confidence": tr.confidence,
        "option_probs": tr.option_probs,
        "stop_reason": tr.stop_reason,
    }
    if dropped_from is not None:
        ids = tr.completion_ids[dropped_from:]
        snap["dropped_ids"] = list(ids)
        snap["dropped_logprobs"] = list(tr.logprobs[dropped_from:])
        snap["dropped_text"] = engine._decode(ids)
    return snap


def _load_case_image(hit: ImageHit, max_pixels: int) -> Any:
    from medrwr.rollout.engine import load_image

    meta = hit.metadata or {}
    for key in ("image", "image_bytes", "bytes"):
        if meta.get(key) is not None:
            return load_image(meta[key], max_pixels)
    return load_image(hit.image_path, max_pixels)


def _truncate(row: _Row, cut: int) -> int:
    """Drop completion tokens from ``cut`` on; returns how many model tokens were dropped."""
    tr = row.trace
    dropped_model = sum(tr.completion_mask[cut:])
    del tr.completion_ids[cut:], tr.completion_mask[cut:], tr.logprobs[cut:]
    tr.spans = [s for s in tr.spans if s.end <= cut]
    row.new_tokens -= dropped_model
    # The drop is deliberate: the next turn must extend exactly what is left.
    row.expected_prefix = row.prompt_ids + tr.completion_ids
    return dropped_model


def _consultation_ids(engine: RolloutEngine, cases: Sequence[tuple[ImageHit, Any]]) -> tuple[list[int], Any, str]:
    """Token ids, image inputs and display text of the retrieve block holding the case images and reports."""
    ids = engine._encode("<retrieve>\n")
    mm = None
    text = "<retrieve>\n"
    for i, (hit, image) in enumerate(cases):
        img_ids, img_mm = engine.backend.encode_image(image)
        ids += img_ids
        mm = img_mm if mm is None else mm.extended(img_mm)
        report = " ".join(protocol.sanitize_document(hit.report).split()) or "No report."
        report_ids = engine._encode(report)
        room = max(engine.config.max_inserted_tokens - 16, 8)
        if len(report_ids) > room:
            report = engine._decode(report_ids[:room]).rstrip("\ufffd").strip() + " …"
        tail = f"\nReport: {report}\n" + ("</retrieve>\n" if i == len(cases) - 1 else "")
        ids += engine._encode(tail)
        text += f"[image: {hit.image_path or hit.image_id}]" + tail
    return ids, mm, text


def run_cdir(engine: RolloutEngine, rows: Sequence[_Row]) -> None:
    """Re-answer the low-confidence rows with a similar case; record the outcome on every row's trace."""
    cfg = engine.cdir
    low: list[_Row] = []
    for row in rows:
        tr = row.trace
        info: dict[str, Any] = {"triggered": False, "threshold": cfg.threshold, "confidence": tr.confidence}
        if tr.stop_reason != "answer" or tr.confidence is None:
            info["reason"] = "no answer to re-check"
        elif not row.source_images:
            info["reason"] = "the question has no image"
        elif tr.confidence >= cfg.threshold:
            info["reason"] = "confidence at or above the threshold"
        elif not getattr(engine.backend, "supports_images", False):
            info["reason"] = "the policy cannot take images"
        else:
            low.append(row)
            info["reason"] = "confidence below the threshold"
        tr.cdir = info
    if not low:
        return
    t0 = engine.clock()
    try:
        results = engine.image_retriever.search_images([r.source_images[0] for r in low], k=cfg.k)
        if len(results) != len(low):
            raise RuntimeError(f"the image retriever returned {len(results)} result lists for {len(low)} images")
    except Exception as exc:  # noqa: BLE001 - a failing image index leaves the first answer in place
        logger.warning("CDIR image search failed: %s", exc)
        for r in low:
            r.trace.cdir["error"] = f"{type(exc).__name__}: {exc}"
        return
    engine.stats.retrieval_s += engine.clock() - t0
    triggered: list[_Row] = []
    for row, hits in zip(low, results):
        tr = row.trace
        hits = list(hits)[: cfg.k]
        if not hits:
            tr.cdir["error"] = "the image index returned no similar case"
            continue
        try:
            cases = [(h, _load_case_image(h, engine.config.max_image_pixels)) for h in hits]
        except Exception as exc:  # noqa: BLE001
            tr.cdir["error"] = f"cannot load the similar case's image: {type(exc).__name__}: {exc}"
            continue
        cut = row.answer_turn["start"] if row.answer_turn else len(tr.completion_ids)
        first = _answer_snapshot(row, engine, dropped_from=cut)
        _truncate(row, cut)
        tr.answer = tr.confidence = tr.option_probs = tr.choice = tr.error = None
        tr.stop_reason = None
        start = len(tr.completion_ids)
        engine.insert_text(row, protocol.THINK, CDIR_THINK)
        engine.insert_text(row, protocol.QUERY, CDIR_QUERY)
        ids, mm, text = _consultation_ids(engine, cases)
        engine.insert_text(row, protocol.RETRIEVE, text, ids)
        tr.cdir["inserted_text"] = CDIR_THINK + CDIR_QUERY + text
        row.mm = mm if row.mm is None else row.mm.extended(mm)
        tr.images.extend(h.image_path or h.image_id for h, _ in cases)
        tr.cdir.update(
            triggered=True,
            first=first,
            cases=[h.to_dict() for h, _ in cases],
            inserted={"start": start, "end": len(tr.completion_ids)},
        )
        row.last_turn_start = len(tr.completion_ids)
        row.answer_turn = None
        row.done = False
        row.cdir_done = True
        triggered.append(row)
    if triggered:
        engine._loop(triggered)
        for row in triggered:
            row.trace.choice = protocol.extract_choice(row.trace.answer, row.letters or protocol.OPTION_LETTERS)
            row.trace.cdir["second"] = _answer_snapshot(row, engine)
