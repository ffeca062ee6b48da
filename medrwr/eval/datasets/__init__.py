"""Benchmark loaders: local files in each published format → :class:`~medrwr.eval.record.EvalRecord`.

One module per benchmark (``vqa_rad``, ``slake``, ``path_vqa``, ``pmc_vqa``, ``omnimedvqa``, ``mmmu``,
``medxpertqa``, ``ecbench``, and ``jsonl`` for a generic MCQ/VQA file); :func:`load` picks one by name.
"""

from medrwr.eval.datasets.registry import NAMES, describe, iter_records, layout_of, load

__all__ = ["NAMES", "describe", "iter_records", "layout_of", "load"]
