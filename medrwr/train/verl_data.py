"""Our MCQ training files as verl parquet: one row per question, picked up by our agent loop (docs/scaling.md).

The rows are built from the TRL dataset of :func:`medrwr.train.data.build_dataset` (same prompts, same images
shrunk once to ``max_pixels``), so both trainers see the same questions and pixels. verl's ``RLHFDataset``
turns each ``<image>`` in a message into ``{"type": "image", "image": PIL}``; we put the placeholders where TRL
puts its image parts (before the question text of the user message), so the rendered prompt ids are the same.

Columns (verl's names): ``data_source``, ``agent_name`` (our loop, :data:`AGENT_NAME`), ``prompt`` (chat
messages), ``images`` (``[{"bytes": PNG}]``, only when the file has images), ``ability``, ``reward_model``
(``{"style": "rule", "ground_truth": letter}``) and ``extra_info`` (``index``, ``split``, ``answer``,
``options``, ``explanation``), which verl hands to the reward function.

verl itself is not needed here (pyarrow and Pillow only).
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from medrwr.errors import TrainingDataError

logger = logging.getLogger(__name__)

__all__ = ["AGENT_NAME", "IMAGE_PLACEHOLDER", "convert_to_verl", "verl_rows"]

AGENT_NAME = "medrwr_agent"
"""The ``agent_name`` our agent loop is registered under (``medrwr.train.verl``)."""
IMAGE_PLACEHOLDER = "<image>"
_VERL_PLACEHOLDERS = ("<image>", "<video>", "<audio>")


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: verl decodes exactly the pixels TRL trains on
    return buf.getvalue()


def verl_rows(dataset: Any, *, data_source: str = "medrwr/mcq", split: str = "train",
              agent_name: str = AGENT_NAME) -> list[dict[str, Any]]:
    """verl rows (module docstring) from a dataset of :func:`medrwr.train.data.build_dataset`."""
    has_images = "images" in dataset.column_names
    rows = []
    for i, ex in enumerate(dataset):
        messages = [dict(m) for m in ex["prompt"]]
        for m in messages:
            for tag in _VERL_PLACEHOLDERS:
                if tag in m["content"]:
                    raise TrainingDataError(
                        f"row {i + 1}: the {m['role']} text contains {tag!r}, which verl reads as a media "
                        "placeholder; remove or rewrite it in the question"
                    )
        images = list(ex["images"]) if has_images else []
        if images:
            user = next(m for m in messages if m["role"] == "user")
            user["content"] = IMAGE_PLACEHOLDER * len(images) + user["content"]
        row: dict[str, Any] = {
            "data_source": data_source,
            "agent_name": agent_name,
            "prompt": messages,
            "ability": "medical_mcq",
            "reward_model": {"style": "rule", "ground_truth": ex["answer"]},
            "extra_info": {
                "index": i, "split": split, "answer": ex["answer"], "options": list(ex["options"]),
                "explanation": ex["explanation"],
            },
        }
        if has_images:
            row["images"] = [{"bytes": _png(img)} for img in images]
        rows.append(row)
    return rows


def convert_to_verl(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "auto", limit: int | None = None,
                    data_source: str | None = None, split: str = "train", max_pixels: int | None = 262_144,
                    agent_name: str = AGENT_NAME) -> int:
    """Read a MedQA / MedMCQA / MCQ file (:mod:`medrwr.train.data`) and write verl parquet to ``out``.

    Returns the number of rows. The file is written through a temporary name and renamed, so a reader never
    sees half of it. ``data_source`` defaults to ``medrwr/<format>``.
    """
    from medrwr._imports import require
    from medrwr.train.data import build_dataset, detect_format, read_rows, samples_from_rows

    pq = require("pyarrow.parquet", "train", "writing verl parquet")
    pa = require("pyarrow", "train", "writing verl parquet")
    src_path, out_path = Path(src), Path(out)
    if out_path.suffix.lower() != ".parquet":
        raise TrainingDataError(f"{out_path}: verl reads parquet; name the output file *.parquet")
    rows = read_rows(src_path)
    if limit is not None:
        rows = rows[:limit]
    kind = detect_format(rows, str(src_path)) if fmt == "auto" else fmt
    samples = samples_from_rows(rows, kind, str(src_path), src_path.parent, src_path.suffix.lower() == ".parquet")
    dataset = build_dataset(samples, max_pixels=max_pixels)
    table = pa.Table.from_pylist(verl_rows(dataset, data_source=data_source or f"medrwr/{kind}", split=split,
                                           agent_name=agent_name))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %d verl rows to %s", table.num_rows, out_path)
    return table.num_rows
