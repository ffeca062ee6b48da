"""Confidence-Driven Image Re-retrieval (docs/method.md §5), a test-time second look.

After a row answers with confidence η below ``cdir.threshold``, the question's (first) image is searched in an
image index of (image, report) cases and the top case(s) consulted:

1. the final turn (the model's last think + the low-confidence answer) is dropped, as the reference code
   does, so the transcript stays grammar-valid: ``... retrieve | think query retrieve(case) | think answer``;
2. a fixed think block and a fixed query block are appended, then a retrieve block holding the case image as a
   **real image input** (its placeholder tokens, e.g. ``<|vision_start|><|image_pad|>…<|vision_end|>`` for
   Qwen2.5-VL, with its pixel values added to the row's images) followed by its report;
3. the model answers again (the usual loop, so it may still search if rounds remain).

Everything inserted here is written by the environment, the fixed think and query blocks included, so it is
mask 0 (not the model's text: it never enters a loss). Both answers and confidences stay in ``trace.cdir`` (a
:class:`~medrwr.rollout.trace.CDIRRecord`), together with the dropped tokens, so nothing is lost. CDIR needs a backend that can encode images (a VLM).

CDIR acts on rows only through public operations: :meth:`Transcript.truncate` / :meth:`Transcript.insert` /
:meth:`Transcript.add_images`, :meth:`Row.reopen`, and :meth:`RolloutEngine.continue_rows` for the re-answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from medrwr import protocol
from medrwr.config import CDIRConfig, RolloutConfig
from medrwr.retrieval.base import ImageHit, ImageRetriever
from medrwr.rollout.backends.base import MultimodalInputs, PolicyBackend
from medrwr.rollout.request import load_image
from medrwr.rollout.trace import CDIRAnswer, CDIRRecord
from medrwr.rollout.transcript import Row, TokenCodec

logger = logging.getLogger(__name__)

__all__ = ["CDIR_QUERY", "CDIR_THINK", "run_cdir"]

CDIR_THINK = (
    "<think>\nMy confidence in this answer is low. I will consult a case with similar medical imaging findings "
    "and use it, together with the information retrieved before, to answer.\n</think>\n"
)
CDIR_QUERY = "<query>\nconsultation from a case with similar medical imaging findings\n</query>\n"
_BELOW = "confidence below the threshold"


class RolloutEngine(Protocol):
    """What CDIR uses of :class:`medrwr.rollout.engine.RolloutEngine` (named here so CDIR does not import it)."""

    backend: PolicyBackend
    codec: TokenCodec
    config: RolloutConfig
    cdir: CDIRConfig
    image_retriever: ImageRetriever | None
    stats: Any
    clock: Any

    def continue_rows(self, rows: Sequence[Row]) -> None: ...


def _answer_of(row: Row) -> CDIRAnswer:
    tr = row.trace
    choice = tr.choice if tr.choice is not None else protocol.extract_choice(tr.answer, row.letters or protocol.OPTION_LETTERS)
    return CDIRAnswer(
        answer=tr.answer, choice=choice, confidence=tr.confidence,
        option_probs=dict(tr.option_probs) if tr.option_probs else None,
        answer_position=tr.answer_position, stop_reason=tr.stop_reason,
    )


def _load_case_image(hit: ImageHit, max_pixels: int) -> Any:
    meta = hit.metadata or {}
    for key in ("image", "image_bytes", "bytes"):
        if meta.get(key) is not None:
            return load_image(meta[key], max_pixels)
    return load_image(hit.image_path, max_pixels)


def _consultation_ids(
    engine: RolloutEngine, cases: Sequence[tuple[ImageHit, Any]]
) -> tuple[list[int], MultimodalInputs | None, str]:
    """Token ids, image inputs and display text of the retrieve block holding the case images and reports."""
    codec = engine.codec
    ids = codec.encode("<retrieve>\n")
    mm = None
    text = "<retrieve>\n"
    for i, (hit, image) in enumerate(cases):
        img_ids, img_mm = engine.backend.encode_image(image)
        ids += img_ids
        mm = img_mm if mm is None else mm.extended(img_mm)
        report = protocol.clean_document(hit.report) or "No report."
        report_ids = codec.encode(report)
        room = max(engine.config.max_inserted_tokens - 16, 8)
        if len(report_ids) > room:
            report = codec.decode(report_ids[:room]).rstrip("\ufffd").strip() + " …"
        tail = f"\nReport: {report}\n" + ("</retrieve>\n" if i == len(cases) - 1 else "")
        ids += codec.encode(tail)
        text += f"[image: {hit.image_path or hit.image_id}]" + tail
    return ids, mm, text


def _decide(engine: RolloutEngine, row: Row) -> CDIRRecord:
    """Whether a row needs a second look; ``triggered`` stays False until the case is actually inserted."""
    cfg, tr = engine.cdir, row.trace
    record = CDIRRecord(threshold=cfg.threshold, confidence=tr.confidence)
    if tr.stop_reason != "answer" or tr.confidence is None:
        record.reason = "no answer to re-check"
    elif not row.source_images:
        record.reason = "the question has no image"
    elif tr.confidence >= cfg.threshold:
        record.reason = "confidence at or above the threshold"
    elif not engine.backend.supports_images:
        record.reason = "the policy cannot take images"
    else:
        record.reason = _BELOW
    return record


def _consult(engine: RolloutEngine, row: Row, cases: list[tuple[ImageHit, Any]]) -> None:
    """Replace the row's answering turn by the fixed think/query blocks and the case; reopen the row."""
    tr, t, record = row.trace, row.transcript, row.trace.cdir
    assert record is not None
    cut = row.answer_start if row.answer_start is not None else len(t)
    first = _answer_of(row)
    first.dropped_ids, first.dropped_logprobs = t.truncate(cut)
    first.dropped_text = t.codec.decode(first.dropped_ids)
    row.reopen()
    start = len(t)
    t.insert(protocol.THINK, CDIR_THINK)
    t.insert(protocol.QUERY, CDIR_QUERY)
    ids, mm, text = _consultation_ids(engine, cases)
    t.insert(protocol.RETRIEVE, text, ids)
    if mm is not None:
        t.add_images(mm)
    tr.images.extend(h.image_path or h.image_id for h, _ in cases)
    record.triggered = True
    record.first = first
    record.cases = [h for h, _ in cases]
    record.inserted_start, record.inserted_end = start, len(t)
    record.inserted_text = CDIR_THINK + CDIR_QUERY + text


def run_cdir(engine: RolloutEngine, rows: Sequence[Row]) -> None:
    """Re-answer the low-confidence rows with a similar case; record the outcome on every row's trace."""
    cfg = engine.cdir
    low: list[Row] = []
    for row in rows:
        row.trace.cdir = _decide(engine, row)
        if row.trace.cdir.reason == _BELOW:
            low.append(row)
    if not low or engine.image_retriever is None:
        return
    t0 = engine.clock()
    try:
        results = engine.image_retriever.search_images([r.source_images[0] for r in low], k=cfg.k)
        if len(results) != len(low):
            raise RuntimeError(f"the image retriever returned {len(results)} result lists for {len(low)} images")
    except Exception as exc:  # noqa: BLE001 - a failing image index leaves the first answer in place
        logger.warning("CDIR image search failed: %s", exc)
        for r in low:
            r.trace.cdir.error = f"{type(exc).__name__}: {exc}"  # type: ignore[union-attr]
        return
    engine.stats.retrieval_s += engine.clock() - t0
    triggered: list[Row] = []
    for row, hits in zip(low, results):
        record = row.trace.cdir
        assert record is not None
        hits = list(hits)[: cfg.k]
        if not hits:
            record.error = "the image index returned no similar case"
            continue
        try:
            cases = [(h, _load_case_image(h, engine.config.max_image_pixels)) for h in hits]
        except Exception as exc:  # noqa: BLE001
            record.error = f"cannot load the similar case's image: {type(exc).__name__}: {exc}"
            continue
        _consult(engine, row, cases)
        triggered.append(row)
    if triggered:
        engine.continue_rows(triggered)
        for row in triggered:
            row.trace.choice = protocol.extract_choice(row.trace.answer, row.letters or protocol.OPTION_LETTERS)
            row.trace.cdir.second = _answer_of(row)  # type: ignore[union-attr]
