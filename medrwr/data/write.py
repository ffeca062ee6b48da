"""Stage ``write``: one MCQ per selected caption from an OpenAI-compatible LLM, validated, concurrent, resumable.

Each caption gets up to ``data.attempts`` tries: a reply that fails :func:`~medrwr.data.mcq.validate_mcq` is
quoted back with the reason (a new prompt, so a new cache key). The outcome of every caption is journalled
(``write/journal.jsonl``): ``ok`` with the question, or ``invalid`` with the last reason. A caption whose
requests failed at the transport level (timeouts, 429, 5xx after the client's retries) is counted as
``failed`` and *not* journalled, so the next run tries it again. ``write.jsonl`` lists the journalled outcomes
in selection order, rewritten atomically at the end of every run.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrwr.config import DataConfig
from medrwr.data.journal import Journal, write_jsonl_atomic
from medrwr.data.llm import ChatClient
from medrwr.data.mcq import SCHEMA, messages_for, validate_mcq

logger = logging.getLogger(__name__)

__all__ = ["WriteResult", "run_write", "write_one"]


@dataclass
class WriteResult:
    """Counts of the stage (journal included): captions in, ``ok``, ``invalid`` (by reason), ``failed`` (retry
    next run), the LLM usage of this run, and the output path."""

    total: int
    ok: int
    invalid: int
    failed: int
    reasons: dict[str, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    cost: float = 0.0
    path: Path | None = None


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(",")[0][:60]


def write_one(client: ChatClient, row: dict[str, Any], attempts: int) -> dict[str, Any]:
    """The journal record for one selected pair (status ``ok``/``invalid``), or status ``failed``."""
    rejected: list[tuple[str, str]] = []
    pt = ct = 0
    reason = ""
    for _ in range(attempts):
        res = client.chat(messages_for(row["caption"], rejected), SCHEMA, "mcq")
        if res.content is None:
            return {"id": row["id"], "status": "failed", "reason": res.error}
        pt, ct = pt + res.prompt_tokens, ct + res.completion_tokens
        mcq, reason = validate_mcq(res.content)
        if mcq is not None:
            return {"id": row["id"], "status": "ok", "mcq": mcq.to_dict(), "attempts": len(rejected) + 1,
                    "prompt_tokens": pt, "completion_tokens": ct, "pair": row}
        rejected.append((res.content, reason))
    return {"id": row["id"], "status": "invalid", "reason": reason, "attempts": attempts,
            "prompt_tokens": pt, "completion_tokens": ct, "pair": row}


def run_write(selected: list[dict[str, Any]], out: Path, cfg: DataConfig, client: ChatClient,
              show_progress: bool = True) -> WriteResult:
    """Run the stage over ``selected`` (rows of ``select.jsonl``), skipping captions already journalled."""
    from tqdm.auto import tqdm

    failed = 0
    with Journal(out / "write" / "journal.jsonl") as journal:
        todo = [r for r in selected if r["id"] not in journal.done]
        bar = tqdm(total=len(selected), initial=len(selected) - len(todo), desc="write", unit="q",
                   disable=not show_progress)
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            futures = [pool.submit(write_one, client, row, cfg.attempts) for row in todo]
            for fut in as_completed(futures):
                rec = fut.result()
                if rec["status"] == "failed":
                    failed += 1
                    logger.warning("write: %s failed (%s); a rerun retries it", rec["id"], rec["reason"])
                else:
                    journal.append(rec)
                bar.update(1)
                u = client.usage
                bar.set_postfix(tok_in=u.prompt_tokens, tok_out=u.completion_tokens, failed=failed,
                                cost=f"${_cost(u.prompt_tokens, u.completion_tokens, cfg):.4f}", refresh=False)
        bar.close()
        done = journal.done
    order = [done[r["id"]] for r in selected if r["id"] in done]
    path = out / "write.jsonl"
    write_jsonl_atomic(path, order)
    status = Counter(r["status"] for r in order)
    reasons = Counter(_reason_kind(r["reason"]) for r in order if r["status"] == "invalid")
    u = client.usage
    return WriteResult(len(selected), status["ok"], status["invalid"], failed, dict(sorted(reasons.items())),
                       u.to_dict(), _cost(u.prompt_tokens, u.completion_tokens, cfg), path)


def _cost(tok_in: int, tok_out: int, cfg: DataConfig) -> float:
    return tok_in / 1e6 * cfg.price_in_per_mtok + tok_out / 1e6 * cfg.price_out_per_mtok
