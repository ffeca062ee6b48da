"""Stage ``stratify``: how hard is each written question for the current policy?

Each question is answered ``data.samples`` times in the ``direct`` evaluation mode (no retrieval: the
``direct`` system prompt and ``rollout.max_rounds = 0``, as :mod:`medrwr.eval.modes` defines it) through the
rollout engine. The question is kept when its accuracy over the samples lies strictly inside ``data.band``
(default (0, 1): the model neither always nor never gets it right, as in the paper). One question is one
engine call, seeded from ``data.seed`` and the question id, so a resumed run draws the same samples as an
uninterrupted one (``rollout.seed`` is left unset here: the backend would re-seed per call).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrwr.config import DataConfig
from medrwr.data.journal import Journal, write_jsonl_atomic

logger = logging.getLogger(__name__)

__all__ = ["StratifyResult", "direct_engine", "run_stratify"]


@dataclass
class StratifyResult:
    """Questions in, kept, and the distribution of correct answers (``{k correct: questions}``)."""

    total: int
    kept: int
    samples: int
    band: list[float]
    distribution: dict[int, int] = field(default_factory=dict)
    path: Path | None = None

    def table(self) -> str:
        """The distribution as text rows: correct answers, questions, a bar."""
        top = max(self.distribution.values(), default=0) or 1
        return "\n".join(f"{k:>3}/{self.samples} correct  {v:>6}  {'#' * round(30 * v / top)}"
                         for k, v in sorted(self.distribution.items()))


def direct_engine(cfg: Any, backend: Any | None = None) -> Any:
    """A no-retrieval :class:`~medrwr.rollout.engine.RolloutEngine` for the configured policy (``backend`` wins),
    sampling at ``data.stratify_temperature``."""
    import dataclasses

    from medrwr.rollout.constrain import resolve_constrain
    from medrwr.rollout.engine import RolloutEngine

    rollout = dataclasses.replace(cfg.rollout, max_rounds=0, seed=None, temperature=cfg.data.stratify_temperature)
    if backend is None:
        from medrwr.rollout.backends import build_backend

        backend = build_backend(cfg.model, rollout)
    return RolloutEngine(backend, None, rollout, k=cfg.retrieval.k, constrain=resolve_constrain(cfg.model, rollout))


def _system(images: list[str], question: str, options: dict[str, str]) -> str | None:
    from medrwr.eval.modes import system_for
    from medrwr.eval.record import EvalRecord

    rec = EvalRecord(id="-", benchmark="synth", split="train", question=question, answer="A", answer_type="mcq",
                     images=list(images), options=options)
    return system_for("direct", rec)


def _seed(base: int, qid: str) -> int:
    return (base * 1_000_003 + int(hashlib.sha256(qid.encode()).hexdigest()[:8], 16)) % 2**31


def _answer(engine: Any, item: dict[str, Any], n: int, seed: int) -> list[str | None]:
    from medrwr.rollout.request import RolloutRequest

    mcq, images = item["mcq"], item["pair"]["images"]
    system = _system(images, mcq["question"], mcq["options"])
    reqs = [RolloutRequest(question=mcq["question"], options=mcq["options"], images=list(images),
                           request_id=f"{item['id']}#{j}", system=system) for j in range(n)]
    try:
        import torch

        torch.manual_seed(_seed(seed, str(item["id"])))
    except ImportError:  # a backend without torch seeds itself
        pass
    return [t.choice for t in engine.run(reqs)]


def run_stratify(items: list[dict[str, Any]], out: Path, cfg: DataConfig, engine: Any,
                 show_progress: bool = True) -> StratifyResult:
    """Answer every ``ok`` item of ``write.jsonl`` ``cfg.samples`` times; write ``stratify.jsonl`` (every item with
    its accuracy and ``kept``), skipping items already journalled."""
    from tqdm.auto import tqdm

    n, (lo, hi) = cfg.samples, cfg.band
    with Journal(out / "stratify" / "journal.jsonl") as journal:
        todo = [it for it in items if it["id"] not in journal.done]
        for item in tqdm(todo, desc="stratify", unit="q", initial=len(items) - len(todo), total=len(items),
                         disable=not show_progress):
            choices = _answer(engine, item, n, cfg.seed)
            correct = sum(c == item["mcq"]["answer"] for c in choices)
            acc = correct / n
            journal.append({"id": item["id"], "choices": choices, "correct": correct, "samples": n,
                            "accuracy": round(acc, 6), "kept": bool(lo < acc < hi)})
        done = journal.done
    rows = [dict(done[it["id"]], kept=bool(lo < done[it["id"]]["accuracy"] < hi)) for it in items if it["id"] in done]
    stale = [r["id"] for r in rows if r["samples"] != n]
    if stale:
        logger.warning("stratify: %d questions were answered with another data.samples; delete %s to redo them",
                       len(stale), out / "stratify")
    path = out / "stratify.jsonl"
    write_jsonl_atomic(path, rows)
    dist = Counter(r["correct"] for r in rows)
    return StratifyResult(len(items), sum(r["kept"] for r in rows), n, [lo, hi],
                          {k: dist.get(k, 0) for k in range(n + 1)}, path)
