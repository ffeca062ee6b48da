"""PMC-VQA from its CSVs: v2 ``test_2.csv`` (``index, Figure_path, Caption, Question, Choice A..D, Answer,
split``; 33,430 rows; MedEvalKit's file and the default) or v1 ``test_clean.csv`` / ``test.csv``
(``Figure_path, Question, Answer`` (or ``Anwser``), ``Choice A..D``, ``Answer_label``), with figures under
``figures/`` (or ``images/``, ``images_2/``).

``split`` names the file (``test_2``, ``test_clean``, ``test``, …) or ``path`` is the CSV itself; numbers from
different files are not comparable, so ``meta["file"]`` records it. Choices lose their ``A:`` prefixes and stray
``\\xa0``/quote characters; the gold becomes a letter (a bare letter, ``B:text``, or the text of one choice), and
a gold that matches none fails naming the row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medrwr.eval.datasets._common import Layout, as_str, gold_letter, iter_csv, options_from_list
from medrwr.eval.record import EvalRecord

__all__ = ["DEFAULT_SPLIT", "LAYOUT", "records"]

LAYOUT = Layout(
    "pmc_vqa",
    "<root>/test_2.csv (or test_clean.csv, test.csv; pick with split) + <root>/figures/ (or images/)",
    "https://huggingface.co/datasets/RadGenome/PMC-VQA (unzip images_2.zip into figures/)",
)
DEFAULT_SPLIT = "test_2"
_IMAGE_DIRS = ("figures", "images", "images_2")


def records(path: Path, split: str) -> Iterator[EvalRecord]:
    p = LAYOUT.require_dir(path)
    if p.is_file():
        csv_path, root = p, p.parent
    else:
        root = p
        csv_path = root / (split if split.endswith(".csv") else f"{split}.csv")
        if not csv_path.is_file():
            have = ", ".join(sorted(x.name for x in root.glob("*.csv"))) or "no CSV files"
            raise LAYOUT.error(f"{csv_path.name} is missing in {root} (found: {have})")
    dirs = [root / d for d in _IMAGE_DIRS if (root / d).is_dir()]
    if not dirs:
        raise LAYOUT.error(f"{root} has no figures/ or images/ folder")
    with open(csv_path, encoding="utf-8-sig") as f:
        header = [h.strip() for h in f.readline().split(",")]
    need = {"Figure_path", "Question", "Choice A", "Choice B"}
    if not need <= set(header):
        raise LAYOUT.error(f"{csv_path} header lacks {', '.join(sorted(need - set(header)))}")
    return _records(csv_path, dirs, csv_path.stem)


def _records(csv_path: Path, dirs: list[Path], split: str) -> Iterator[EvalRecord]:
    for n, raw in enumerate(iter_csv(csv_path), 2):
        row = {str(k).strip(): v for k, v in raw.items() if k is not None}
        rid = as_str(row.get("index")) or str(n - 1)
        choices = [row[f"Choice {c}"] for c in "ABCD" if as_str(row.get(f"Choice {c}"))]
        options = options_from_list(choices)
        gold_raw = row.get("Answer_label") or row.get("Answer") or row.get("Anwser")
        letter = gold_letter(gold_raw, options)
        if letter is None:
            raise LAYOUT.error(f"{csv_path}:{n}: answer {gold_raw!r} matches none of the choices {choices}")
        fig = as_str(row.get("Figure_path"))
        img = next((d / fig for d in dirs if (d / fig).is_file()), None)
        if img is None:
            raise LAYOUT.error(f"figure {fig!r} of row {n} is in none of {', '.join(d.name for d in dirs)}/")
        yield EvalRecord(
            id=rid,
            benchmark="pmc_vqa",
            split=split,
            question=as_str(row.get("Question")),
            images=[str(img.resolve())],
            options=options,
            answer=letter,
            answer_type="mcq",
            meta={
                "file": csv_path.name,
                "figure_path": fig,
                "medevalkit_choices": choices,
                "medevalkit_answer": as_str(row.get("Answer") or row.get("Anwser") or letter),
            },
        )
