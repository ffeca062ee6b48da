"""The two records evaluation passes between its parts: one benchmark item (:class:`EvalRecord`, what a loader
yields) and one scored response (:class:`Verdict`, what ``scoring.judge`` returns).

Loaders (``eval/datasets``), scoring (``eval/scoring``), the runner and the report all speak these types and
nothing else, so a new benchmark is one loader module and a new preset one scoring function.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["ANSWER_TYPES", "EvalRecord", "Verdict"]

AnswerType = Literal["mcq", "closed", "open"]
ANSWER_TYPES: tuple[str, ...] = ("mcq", "closed", "open")


@dataclass
class EvalRecord:
    """One benchmark item.

    ``options`` is an ordered ``{letter: text}`` for multiple choice, else ``None``; ``answer`` is then the gold
    letter (normalised: ``"A:Liver"`` → ``"A"``), else the gold text. ``answer_type``: ``mcq`` (has options),
    ``closed`` (yes/no or a closed set without options), ``open`` (free text). ``images`` are file paths (or
    in-memory images for parquet/base64 sources). ``meta`` uses the keys ``modality``, ``question_type``,
    ``subject`` where the benchmark has them, plus anything else the source carries.

    >>> r = EvalRecord(id="1", benchmark="slake", split="test", question="Is this a CT?", answer="yes",
    ...                answer_type="closed", is_yes_no=True)
    >>> r.options is None and r.lang == "en"
    True
    """

    id: str
    benchmark: str
    split: str
    question: str
    answer: str
    answer_type: AnswerType
    images: list[Any] = field(default_factory=list)
    options: dict[str, str] | None = None
    is_yes_no: bool = False
    lang: str = "en"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {self.answer_type!r}")
        if self.answer_type == "mcq" and not self.options:
            raise ValueError(f"item {self.id!r}: a multiple-choice record needs options")

    @property
    def bucket(self) -> str:
        """Where the standard protocol counts this item: ``mcq``, ``yes_no``, ``closed`` or ``open``."""
        if self.answer_type == "mcq":
            return "mcq"
        return "yes_no" if self.is_yes_no else self.answer_type

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (images become their path or a description)."""
        d = asdict(self)
        d["images"] = [_image_ref(img) for img in self.images]
        return d


def _image_ref(img: Any) -> str:
    if isinstance(img, str):
        return img
    if isinstance(img, (bytes, bytearray)):
        return f"<{len(img)} image bytes>"
    return repr(img)


@dataclass
class Verdict:
    """How one response scored. ``bucket`` is where the item is counted (``mcq``, ``yes_no``, ``closed``,
    ``open``, or ``unparsed`` when no answer could be extracted: counted wrong and reported). ``em``, ``recall``
    and ``f1`` are set for open answers."""

    correct: bool
    parsed: str | None
    bucket: str
    preset: str = "standard"
    em: float | None = None
    recall: float | None = None
    f1: float | None = None
    note: str | None = None
    judge: str | None = None
    """The LLM judge's model id when it decided ``correct`` (open answers), else None."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
