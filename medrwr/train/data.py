"""Training datasets: MedQA-USMLE, MedMCQA and generic MCQ files turned into TRL-ready rows.

Every loader returns a ``datasets.Dataset`` with one row per question:

- ``prompt``: chat messages ``[system, user]`` -- the protocol's system prompt (text variant without images,
  image variant with them) and the question with lettered options (:func:`medrwr.protocol.format_question`);
  the user content is a string, so TRL inserts the image parts itself from the ``images`` column;
- ``answer``: the gold letter; ``options``: the option texts in letter order; ``explanation`` (may be "");
- ``images`` (only when some row has images): PIL images, each shrunk to ``max_pixels`` once here so that the
  rollout and TRL's training forward see the same pixels.

Schemas (checked row by row; a wrong shape is a :class:`~medrwr.errors.TrainingDataError` naming file, row, column):

- **MedQA-USMLE** JSONL: ``question``, ``options`` (mapping letter -> text), ``answer_idx`` (letter).
- **MedMCQA** JSON/JSONL/parquet: ``question``, ``opa``..``opd``, ``cop``, optional ``exp``. ``cop`` is
  0-based (0-3) in the Hugging Face release (``openlifescienceai/medmcqa``, parquet) and 1-based (1-4) in the
  original JSON release. Per file: a 0 anywhere means 0-based, a 4 anywhere 1-based; otherwise parquet is read
  as 0-based and JSON as 1-based (``cop_base=`` forces one). A letter ``cop`` is taken as is.
- **MCQ** JSONL/JSON/parquet (ours, also the synthesis output): ``question``, ``options`` (list or mapping),
  ``answer`` (letter, or the text of one option), optional ``images`` (path, or list of paths, relative to the
  file) or ``image``, optional ``explanation``.

The format is detected from the columns (``medqa`` has ``answer_idx``, ``medmcqa`` has ``cop``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrwr import protocol
from medrwr.errors import TrainingDataError

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "MCQSample", "build_dataset", "detect_format", "load_mcq_dataset", "read_rows"]

FORMATS = ("medqa", "medmcqa", "mcq")

@dataclass
class MCQSample:
    """One question in our shape, whatever file it came from."""

    question: str
    options: list[str]
    answer: str
    explanation: str = ""
    images: list[Any] = field(default_factory=list)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``, ``.json`` (a list, or ``{"data": [...]}``) or ``.parquet`` file."""
    p = Path(path)
    if not p.is_file():
        raise TrainingDataError(f"dataset file {p} does not exist (train.dataset)")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    text = p.read_text(encoding="utf-8")
    if suffix == ".jsonl" or (suffix == ".json" and not text.lstrip().startswith(("[", "{\"data\""))):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TrainingDataError(f"{p}:{i}: not valid JSON ({exc.msg}); one JSON object per line") from None
        return rows
    if suffix == ".json":
        data = json.loads(text)
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise TrainingDataError(f"{p}: expected a JSON list of objects or {{\"data\": [...]}}")
        return rows
    raise TrainingDataError(f"{p}: unsupported dataset file type {suffix!r}; use .jsonl, .json or .parquet")


def detect_format(rows: Sequence[dict[str, Any]], source: str = "<rows>") -> str:
    """``medqa``, ``medmcqa`` or ``mcq``, from the first row's columns."""
    if not rows:
        raise TrainingDataError(f"{source}: the dataset is empty")
    first = rows[0]
    if not isinstance(first, dict):
        raise TrainingDataError(f"{source}: row 1 is {type(first).__name__}, expected a JSON object")
    if "answer_idx" in first:
        return "medqa"
    if "cop" in first:
        return "medmcqa"
    if "question" in first and ("options" in first or "choices" in first):
        return "mcq"
    raise TrainingDataError(
        f"{source}: cannot tell the format from columns {sorted(first)}; expected MedQA (question, options, "
        "answer_idx), MedMCQA (question, opa..opd, cop) or MCQ (question, options, answer)"
    )


def _need(row: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    value = row.get(key)
    if value is None or not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TrainingDataError(f"{where}: column '{key}' must be a non-empty {names}, got {value!r}")
    return value


def _letter(answer: Any, options: list[str], where: str, column: str) -> str:
    letters = protocol.OPTION_LETTERS[: len(options)]
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    norm = protocol.normalize_text(text)
    for letter, opt in zip(letters, options):
        if norm and protocol.normalize_text(opt) == norm:
            return letter
    raise TrainingDataError(f"{where}: column '{column}' = {answer!r} is not one of the letters {letters} "
                            "nor the text of an option")


def _options(value: Any, where: str) -> list[str]:
    if isinstance(value, dict):
        keys = sorted(value)
        if keys != list(protocol.OPTION_LETTERS[: len(keys)]):
            raise TrainingDataError(f"{where}: options keys must be A, B, C... in order, got {keys}")
        opts = [value[k] for k in keys]
    elif isinstance(value, (list, tuple)):
        opts = list(value)
    else:
        raise TrainingDataError(f"{where}: column 'options' must be a list or a letter -> text mapping, got {value!r}")
    if not 2 <= len(opts) <= len(protocol.OPTION_LETTERS) or not all(isinstance(o, str) and o.strip() for o in opts):
        raise TrainingDataError(f"{where}: 'options' must hold 2-10 non-empty strings, got {opts!r}")
    return [o.strip() for o in opts]


def _medqa(row: dict[str, Any], where: str) -> MCQSample:
    opts = _options(_need(row, "options", where, dict), where)
    return MCQSample(_need(row, "question", where), opts, _letter(row.get("answer_idx"), opts, where, "answer_idx"))


def _cop_base(rows: Sequence[dict[str, Any]], parquet: bool) -> int:
    values = {r.get("cop") for r in rows if isinstance(r.get("cop"), int) and not isinstance(r.get("cop"), bool)}
    if 0 in values:
        return 0
    if 4 in values:
        return 1
    return 0 if parquet else 1


def _medmcqa(row: dict[str, Any], where: str, base: int) -> MCQSample:
    opts = [_need(row, k, where) for k in ("opa", "opb", "opc", "opd")]
    cop = row.get("cop")
    if isinstance(cop, str) and cop.strip().upper() in "ABCD" and len(cop.strip()) == 1:
        letter = cop.strip().upper()
    elif isinstance(cop, int) and not isinstance(cop, bool) and base <= cop <= base + 3:
        letter = "ABCD"[cop - base]
    else:
        raise TrainingDataError(f"{where}: column 'cop' must be {base}..{base + 3} (or a letter A-D), got {cop!r}")
    return MCQSample(_need(row, "question", where), [o.strip() for o in opts], letter, str(row.get("exp") or ""))


def _image_paths(value: Any, base_dir: Path, where: str) -> list[Any]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            p = Path(item)
            p = p if p.is_absolute() else base_dir / p
            if not p.is_file():
                raise TrainingDataError(f"{where}: image file {p} does not exist")
            out.append(str(p))
        elif isinstance(item, dict) and (item.get("bytes") or item.get("path")):  # parquet image struct
            out.append(item)
        elif hasattr(item, "size") and hasattr(item, "convert"):  # a PIL image
            out.append(item)
        else:
            raise TrainingDataError(f"{where}: 'images' entries must be file paths, got {item!r}")
    return out


def _mcq(row: dict[str, Any], where: str, base_dir: Path) -> MCQSample:
    opts = _options(row.get("options", row.get("choices")), where)
    answer = row.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise TrainingDataError(f"{where}: column 'answer' is missing or empty (a letter or an option's text)")
    images = _image_paths(row.get("images", row.get("image")), base_dir, where)
    return MCQSample(_need(row, "question", where), opts, _letter(answer, opts, where, "answer"),
                     str(row.get("explanation") or ""), images)


def samples_from_rows(rows: Sequence[dict[str, Any]], fmt: str = "auto", source: str = "<rows>",
                      base_dir: Path | None = None, parquet: bool = False, cop_base: int | None = None
                      ) -> list[MCQSample]:
    """Rows of any supported schema as :class:`MCQSample` objects (checked row by row)."""
    fmt = detect_format(rows, source) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise TrainingDataError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)} or auto")
    base = cop_base if cop_base is not None else (_cop_base(rows, parquet) if fmt == "medmcqa" else 0)
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{source} row {i}"
        if not isinstance(row, dict):
            raise TrainingDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if fmt == "medqa":
            out.append(_medqa(row, where))
        elif fmt == "medmcqa":
            out.append(_medmcqa(row, where, base))
        else:
            out.append(_mcq(row, where, base_dir or Path(".")))
    return out


def _open_image(item: Any, max_pixels: int | None) -> Any:
    from medrwr.rollout.request import load_image

    if isinstance(item, dict):
        import io

        from PIL import Image

        item = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else item["path"]
    return load_image(item, max_pixels).convert("RGB")


def build_dataset(samples: Iterable[MCQSample], *, max_pixels: int | None = 262_144,
                  with_image: bool | None = None) -> Any:
    """A ``datasets.Dataset`` (columns in the module docstring) from samples.

    ``with_image`` picks the system prompt variant; None = the image variant exactly when the sample has images.
    """
    from medrwr._imports import require

    datasets = require("datasets", "train", "training datasets")
    rows: dict[str, list[Any]] = {"prompt": [], "answer": [], "options": [], "explanation": [], "images": []}
    for s in samples:
        image_prompt = bool(s.images) if with_image is None else with_image
        rows["prompt"].append([
            {"role": "system", "content": protocol.system_prompt(with_image=image_prompt)},
            {"role": "user", "content": protocol.format_question(s.question, s.options)},
        ])
        rows["answer"].append(s.answer)
        rows["options"].append(list(s.options))
        rows["explanation"].append(s.explanation)
        rows["images"].append([_open_image(i, max_pixels) for i in s.images])
    if not rows["answer"]:
        raise TrainingDataError("the dataset has no rows")
    if not any(rows["images"]):
        del rows["images"]
        return datasets.Dataset.from_dict(rows)
    if not all(rows["images"]):
        raise TrainingDataError("some rows have images and some have none; split text and image questions "
                                "into stage-1 and stage-2 files")
    features = datasets.Features({
        "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "answer": datasets.Value("string"), "options": [datasets.Value("string")],
        "explanation": datasets.Value("string"), "images": [datasets.Image()],
    })
    return datasets.Dataset.from_dict(rows, features=features)


def load_mcq_dataset(path: str | Path, *, fmt: str = "auto", limit: int | None = None,
                     max_pixels: int | None = 262_144, with_image: bool | None = None,
                     cop_base: int | None = None) -> Any:
    """Read a MedQA / MedMCQA / MCQ file (format detected from its columns) into the training ``Dataset``."""
    p = Path(path)
    rows = read_rows(p)
    if limit is not None:
        rows = rows[:limit]
    samples = samples_from_rows(rows, fmt, str(p), p.parent, p.suffix.lower() == ".parquet", cop_base)
    logger.info("read %d questions from %s", len(samples), p)
    return build_dataset(samples, max_pixels=max_pixels, with_image=with_image)
