"""``medrwr eval run``: a benchmark through the rollout engine in each mode, batched, resumable, scored.

:func:`run_eval` loads the items (``medrwr.eval.datasets.load``), then for each mode (:mod:`medrwr.eval.modes`)
sends the unfinished items through ``engine.run`` with up to ``eval.batch_size`` rows at once, scores every trace
(``medrwr.eval.scoring.judge``) and appends finished items to ``RUN_DIR/results.jsonl``
(:class:`~medrwr.eval.results.ResultStore`: one write + fsync per append). Modes without CDIR use continuous
batching (a finished item's row is refilled at the next turn boundary, its result stored then); ``rwr_cdir``
and text-level (``openai:``) policies go ``eval.batch_size`` items at a time. A rerun with the same ``RUN_DIR``
skips every ``(id, mode)`` already stored, so a run killed at any point resumes without redoing or duplicating
an item. ``RUN_DIR/run.json`` records what the run is (model, decoding, seeds, index manifest hash, data file
hashes, preset); resuming with a different identity raises :class:`~medrwr.errors.EvalRunError` unless
``force`` (then the old files are kept beside as ``*.bak-<time>`` and the run starts over).

``--mode all`` shares work: ``direct`` and ``rag`` use one no-retrieval engine, and ``rwr`` is read from the
``rwr_cdir`` traces (``cdir.first`` is the rwr answer; :func:`medrwr.eval.modes.rwr_view`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medrwr._io import write_json_atomic
from medrwr.config import Config
from medrwr.errors import EvalRunError
from medrwr.eval.identity import prepare_run_dir, run_identity
from medrwr.eval.modes import expand_modes, question_text, rwr_view, system_for, trace_for_storage
from medrwr.eval.record import EvalRecord
from medrwr.eval.results import RUN_JSON, ResultStore
from medrwr.eval.text_policy import ChatPolicyEngine, api_key_from_env, is_openai_model

logger = logging.getLogger(__name__)

__all__ = ["EvalEngines", "Progress", "run_eval"]

_META_KEYS = ("modality", "question_type", "subject", "content_type", "medical_task", "body_part")


@dataclass
class Progress:
    """One progress report: ``done`` of ``total`` items of ``mode`` finished in this session."""

    mode: str
    done: int
    total: int
    seconds: float
    skipped: int = 0

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None


class _WordCodec:
    """Whitespace words as tokens, for :func:`~medrwr.rollout.retrieval_step.fit_documents` without a tokenizer."""

    def __init__(self) -> None:
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        start = len(self.words)
        self.words.extend(text.split())
        return list(range(start, len(self.words)))

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


class _Tally:
    """Counts one mode's finished items and reports progress (items/s, ETA) after every stored append."""

    def __init__(self, progress: Progress, on_progress: Callable[[Progress], None] | None):
        self.progress, self.on_progress, self.t0 = progress, on_progress, time.perf_counter()
        if on_progress:
            on_progress(progress)

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, n: int) -> None:
        self.progress = dataclasses.replace(self.progress, done=self.progress.done + n, seconds=self.seconds())
        if self.on_progress:
            self.on_progress(self.progress)


# ---------------------------------------------------------------------- engines


class EvalEngines:
    """One policy backend and retriever shared by every mode's engine, built on first use (pass ``backend`` to
    reuse a loaded policy across runs)."""

    def __init__(self, cfg: Config, modes: list[str], backend: Any = None):
        self.cfg = cfg
        self.modes = modes
        self._backend: Any = backend
        self._retriever: Any = None
        self._engines: dict[str, Any] = {}
        self._judge: Any = None
        self.openai = is_openai_model(cfg.model.name)

    def llm_judge(self) -> Any:
        """The optional LLM judge of open answers (``eval.judge_url`` + ``judge_model``), or None."""
        e = self.cfg.eval
        if self._judge is None and e.judge_url:
            from medrwr.assets import cache_root
            from medrwr.eval.judge_llm import LLMJudge

            self._judge = LLMJudge(e.judge_url, e.judge_model or "", cache_root() / "judge",
                                   timeout=e.request_timeout_s, max_workers=e.concurrency)
        return self._judge

    def retriever(self) -> Any:
        if self._retriever is None:
            from medrwr.retrieval.open import open_retriever

            self._retriever = open_retriever(self.cfg)
        return self._retriever

    def search_mode(self) -> str | None:
        rc = self.cfg.retrieval
        mode = rc.mode if "mode" in rc.explicit_keys() else None
        return mode if mode in self.retriever().modes else None

    def get(self, mode: str) -> Any:
        key = "none" if mode in ("direct", "rag") else mode
        if key in self._engines:
            return self._engines[key]
        cfg = copy.deepcopy(self.cfg)
        if key == "none":
            cfg.rollout = dataclasses.replace(cfg.rollout, max_rounds=0)
        cfg.cdir.enabled = key == "rwr_cdir"
        if self.openai:
            e = cfg.eval
            engine: Any = ChatPolicyEngine(
                cfg.model.name or "", e.base_url or "", None if key == "none" else self.retriever(), cfg.rollout,
                k=cfg.retrieval.k, search_mode=None if key == "none" else self.search_mode(),
                api_key=api_key_from_env(e.api_key_env), continuation=e.continuation, concurrency=e.concurrency,
                timeout_s=e.request_timeout_s,
            )
        else:
            from medrwr.rollout.constrain import resolve_constrain
            from medrwr.rollout.engine import RolloutEngine, engine_from_config

            if self._backend is None:
                from medrwr.rollout.backends import build_backend

                self._backend = build_backend(cfg.model, cfg.rollout)
            if key == "none":
                engine = RolloutEngine(self._backend, None, cfg.rollout, k=cfg.retrieval.k,
                                       constrain=resolve_constrain(cfg.model, cfg.rollout))
            else:
                image_retriever = None
                if key == "rwr_cdir":
                    from medrwr.retrieval.open import open_image_retriever

                    image_retriever = open_image_retriever(cfg)
                engine = engine_from_config(cfg, backend=self._backend, retriever=self.retriever(),
                                            image_retriever=image_retriever)
        self._engines[key] = engine
        return engine

    def fit_documents(self, texts: list[str]) -> tuple[list[str], bool]:
        """``rag``'s documents in the budget of one retrieval round of the loop (``rollout.max_inserted_tokens``,
        cut by tokens as the loop cuts them), so ``rag`` and ``rwr`` read the same amount of text. Text-level
        policies have no tokenizer: words stand in for tokens (3 words per 4 tokens)."""
        from medrwr.rollout.retrieval_step import fit_documents

        budget = self.cfg.rollout.max_inserted_tokens
        if self.openai:
            return fit_documents(_WordCodec(), texts, budget * 3 // 4)
        return fit_documents(self.get("rag").codec, texts, budget)

    def close(self) -> None:
        for e in self._engines.values():
            if hasattr(e, "close"):
                e.close()
        if self._retriever is not None:
            self._retriever.close()
        if self._judge is not None:
            self._judge.close()


# ---------------------------------------------------------------------- one batch


def _row(record: EvalRecord, mode: str, trace: dict[str, Any], verdict: Any, **extra: Any) -> dict[str, Any]:
    meta = {k: v for k, v in (record.meta or {}).items() if isinstance(v, (str, int, float, bool)) or v is None}
    return {
        "id": record.id, "mode": mode, "benchmark": record.benchmark, "split": record.split,
        "answer_type": record.answer_type, "is_yes_no": record.is_yes_no, "lang": record.lang,
        "question": record.question, "options": record.options, "gold": record.answer, "meta": meta,
        "trace": trace, "verdict": verdict.to_dict(), **extra,
    }


def _rag_documents(engines: EvalEngines, records: list[EvalRecord]) -> list[dict[str, Any]]:
    """One batched search with the questions; never raises (a failure is recorded, the item gets no documents)."""
    from medrwr.rollout.retrieval_step import search_batch

    k = engines.cfg.retrieval.k
    results, error, seconds = search_batch(engines.retriever(), [r.question for r in records], k,
                                           engines.search_mode(), engines.cfg.rollout.retrieval_timeout_s,
                                           time.perf_counter)
    out = []
    for i, r in enumerate(records):
        hits = results[i] if results is not None else []
        out.append({"query": r.question, "hits": [h.to_dict() for h in hits], "error": error, "seconds": seconds})
    return out


def _prefetch_judge(llm: Any, records: list[EvalRecord], responses: list[str]) -> None:
    """Ask the LLM judge about every open, non-yes/no answer of a batch at once (its cache keeps the verdicts)."""
    from medrwr.eval.scoring import extract_answer
    from medrwr.eval.scoring.presets import llm_judged

    items = []
    for r, response in zip(records, responses):
        text, _ = extract_answer(response)
        if llm_judged(r) and text:
            items.append((r.question, r.answer, text))
    llm.verdicts(list(dict.fromkeys(items)))  # repeated items: one call each


def _requests(engines: EvalEngines, mode: str, records: list[EvalRecord]) -> tuple[list[Any], list[dict] | None]:
    """The rollout requests of ``records`` (``rag``: after one batched search with their questions)."""
    from medrwr.rollout.request import RolloutRequest

    rag = _rag_documents(engines, records) if mode == "rag" else None
    requests = []
    for i, r in enumerate(records):
        docs = None
        if rag is not None:
            docs, rag[i]["truncated"] = engines.fit_documents([h["text"] for h in rag[i]["hits"]])
        requests.append(RolloutRequest(question=question_text(r, docs), options=r.options, images=list(r.images),
                                       request_id=r.id, system=system_for(mode, r), metadata={"mode": mode}))
    return requests, rag


def _score(engines: EvalEngines, mode: str, records: list[EvalRecord], traces: list[Any],
           rag: list[dict] | None, seconds: list[float], want_rwr: bool) -> list[dict[str, Any]]:
    """Stored rows of finished items: trace, verdict (and for rwr_cdir the derived rwr row)."""
    from medrwr.eval.scoring import judge

    cfg = engines.cfg
    rows = []
    llm = engines.llm_judge()
    dicts = [trace_for_storage(tr.to_dict(), cfg.eval.keep_tokens) for tr in traces]
    if llm is not None:  # judge the batch's open answers concurrently; judge() below then reads the cache
        _prefetch_judge(llm, records, [d.get("completion_text") or "" for d in dicts])
    for i, (r, d) in enumerate(zip(records, dicts)):
        verdict = judge(r, d.get("completion_text") or "", preset=cfg.eval.preset, llm_judge=llm)
        extra: dict[str, Any] = {"seconds": seconds[i], "batch_size": cfg.eval.batch_size}
        if rag is not None:
            extra["rag"] = rag[i]
        if mode == "rwr_cdir":
            view = rwr_view(d)
            first = judge(r, view.get("completion_text") or "", preset=cfg.eval.preset, llm_judge=llm)
            extra["rwr_verdict"] = first.to_dict()
            rows.append(_row(r, mode, d, verdict, **extra))
            if want_rwr:
                rows.append(_row(r, "rwr", view, first, derived_from="rwr_cdir", **extra))
        else:
            rows.append(_row(r, mode, d, verdict, **extra))
    return rows


def _run_batch(engines: EvalEngines, mode: str, records: list[EvalRecord], want_rwr: bool) -> list[dict[str, Any]]:
    requests, rag = _requests(engines, mode, records)
    t0 = time.perf_counter()
    traces = engines.get(mode).run(requests)
    per_item = (time.perf_counter() - t0) / max(1, len(records))
    return _score(engines, mode, records, traces, rag, [per_item] * len(records), want_rwr)


def _run_streaming(engines: EvalEngines, mode: str, pending: list[EvalRecord], store: ResultStore,
                   report: Callable[[int], None]) -> None:
    """Continuous batching over every pending item: up to ``eval.batch_size`` rows at once; at each turn boundary
    the items that finished are scored and stored (one append + fsync) and new items take their places, so a
    batch never waits on its longest row with empty slots (``RolloutEngine.run(admit=...)``)."""
    queue = list(pending)
    active: dict[str, tuple[EvalRecord, dict | None, float]] = {}
    finished: list[tuple[str, Any]] = []

    def flush() -> None:
        if not finished:
            return
        done, now = finished[:], time.perf_counter()
        finished.clear()
        items = [active.pop(rid) for rid, _ in done]
        rag = [it[1] for it in items] if mode == "rag" else None
        store.append(_score(engines, mode, [it[0] for it in items], [tr for _, tr in done], rag,
                            [now - it[2] for it in items], False))
        report(len(done))

    def admit() -> list[Any]:
        flush()
        take = queue[: max(0, engines.cfg.eval.batch_size - len(active))]
        del queue[: len(take)]
        if not take:
            return []
        requests, rag = _requests(engines, mode, take)
        now = time.perf_counter()
        for i, r in enumerate(take):
            active[r.id] = (r, rag[i] if rag is not None else None, now)
        return requests

    def on_event(ev: Any) -> None:
        if ev.kind == "finish":
            finished.append((ev.request_id, ev.data["trace"]))

    engines.get(mode).run([], on_event=on_event, admit=admit)
    flush()


# ---------------------------------------------------------------------- the run


def _load_records(cfg: Config, benchmark: str, data: str | Path) -> list[EvalRecord]:
    from medrwr.eval import datasets

    records = datasets.load(benchmark, str(data), split=cfg.eval.split, languages=cfg.eval.languages)
    if cfg.eval.limit:
        records = records[: cfg.eval.limit]
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise EvalRunError(f"item id {r.id!r} appears twice in {data}; results are keyed by id, so ids must "
                               "be unique")
        seen.add(r.id)
    return records


def check_modes(cfg: Config, modes: list[str], explicit: bool) -> list[str]:
    """The modes this policy can run; raises when the user asked for one it cannot (before any model loads)."""
    if is_openai_model(cfg.model.name):
        if not cfg.eval.base_url:
            raise EvalRunError(f"--model {cfg.model.name} needs --base-url (an OpenAI-compatible endpoint, "
                               "e.g. http://127.0.0.1:8000/v1)")
        if "rwr_cdir" in modes:
            if explicit:
                raise EvalRunError("rwr_cdir needs token log-probabilities and image inputs mid-answer; openai: "
                                   "policies are text-level: use --mode rwr (or all, which skips rwr_cdir)")
            logger.warning("openai: policies are text-level: skipping rwr_cdir")
            modes = [m for m in modes if m != "rwr_cdir"]
    return modes


def run_eval(
    cfg: Config,
    benchmark: str,
    data: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    engines: Any = None,
) -> dict[str, Any]:
    """Run (or resume) an evaluation; returns the run summary written to ``run.json``.

    Every cheap check (modes, data layout, run directory identity) runs before any model loads.
    """
    requested = list(cfg.eval.modes)
    modes = check_modes(cfg, expand_modes(requested), explicit="all" not in requested)
    if not Path(data).exists():
        raise EvalRunError(f"--data {data} does not exist")
    records = _load_records(cfg, benchmark, data)
    if not records:
        raise EvalRunError(f"{data}: the {benchmark} loader found no items (check --split / --languages)")
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    ident = run_identity(cfg, benchmark, data, modes)
    prev = prepare_run_dir(run_dir, ident, force)
    store = ResultStore(run_dir)
    all_modes = [m for m in ("direct", "rag", "rwr", "rwr_cdir") if m in set(modes) | set(prev.get("modes", []))]
    summary: dict[str, Any] = {
        "version": 1, "identity": ident, "modes": all_modes, "n_items": len(records),
        "batch_size": cfg.eval.batch_size, "limit": cfg.eval.limit, "started": prev.get("started") or time.time(),
        "status": "running",
    }
    from medrwr import __version__

    summary["medrwr_version"] = __version__
    write_json_atomic(run_dir / RUN_JSON, summary)
    by_id = {r.id: r for r in records}
    want_rwr = "rwr" in modes
    # rwr rows that can be read from stored rwr_cdir rows (a run that added rwr later)
    if want_rwr and "rwr_cdir" in modes:
        derived = []
        for row in list(store):
            if row["mode"] == "rwr_cdir" and not store.has(row["id"], "rwr") and row["id"] in by_id:
                derived.append({**row, "mode": "rwr", "trace": rwr_view(row["trace"]),
                                "verdict": row.get("rwr_verdict") or row["verdict"], "derived_from": "rwr_cdir"})
        store.append(derived)
    engines = engines or EvalEngines(cfg, modes)
    timings: dict[str, Any] = dict(prev.get("timings") or {})
    try:
        for mode in modes:
            if mode == "rwr" and "rwr_cdir" in modes:
                continue  # read from the rwr_cdir traces
            pending = [r for r in records if not store.has(r.id, mode)]
            # similar lengths in one batch: less padding (results are keyed by id, so order does not matter)
            pending.sort(key=lambda r: len(r.question) + sum(len(str(o)) for o in (r.options or {}).values()))
            skipped = len(records) - len(pending)
            if pending:
                engines.get(mode)  # load the policy/retriever before the clock starts
            tally = _Tally(Progress(mode, 0, len(pending), 0.0, skipped), on_progress)
            # continuous batching on our own engine without CDIR (CDIR revisits finished rows; text-level
            # openai: policies batch by concurrency instead)
            if pending and mode != "rwr_cdir" and not engines.openai:
                _run_streaming(engines, mode, pending, store, tally.add)
            else:
                bs = cfg.eval.batch_size
                for start in range(0, len(pending), bs):
                    batch = pending[start: start + bs]
                    store.append(_run_batch(engines, mode, batch, want_rwr))
                    tally.add(len(batch))
            done, secs = tally.progress.done, tally.seconds()
            if done:
                timings[mode] = {"items": done, "seconds": secs, "items_per_s": done / secs if secs else None}
    finally:
        if isinstance(engines, EvalEngines):
            stats = {k: e.stats.to_dict() for k, e in engines._engines.items() if hasattr(e, "stats")}
            if stats:
                summary["engine_stats"] = stats
            engines.close()
    summary.update(status="finished", finished=time.time(), timings=timings)
    write_json_atomic(run_dir / RUN_JSON, summary)
    return summary
