"""``medrwr data synth``: select -> write -> stratify -> output, each stage resumable (docs/data-pipelines.md).

Files under ``--out``: ``select.jsonl`` (+ ``select/clusters.png``), ``write.jsonl``, ``stratify.jsonl``, and the
result ``data.jsonl`` in the generic MCQ format the training loader reads (``images`` relative to the file,
``question``, ``options`` {letter: text}, ``answer`` letter, ``explanation``; plus ``id``, ``source``,
``provenance``), with ``data_card.json`` / ``DATA_CARD.md``. Every stage skips what a previous run finished, so
a rerun after ``kill -9`` (or with a larger ``--n``) continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medrwr.data.journal import read_jsonl, write_jsonl_atomic
from medrwr.data.pairs import read_pairs
from medrwr.errors import SynthesisError

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "SynthReport", "build_output", "synthesize"]

STAGES = ("select", "write", "stratify")


@dataclass
class SynthReport:
    """Per-stage summaries (plain dicts, as in the data card) and the card's path."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None


def _rel(path: str, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # another drive on Windows
        return path


def build_output(out: Path, cfg: Any, used_stratify: bool) -> tuple[int, list[dict[str, Any]]]:
    """Write ``data.jsonl``: the first ``data.n`` questions (selection order) that passed write (and stratify)."""
    written = [r for r in read_jsonl(out / "write.jsonl") if r["status"] == "ok"]
    if used_stratify:
        strat = {r["id"]: r for r in read_jsonl(out / "stratify.jsonl")}
        written = [r for r in written if r["id"] in strat and strat[r["id"]]["kept"]]
    else:
        strat = {}
    rows = []
    for r in written[: cfg.data.n]:
        m, pair = r["mcq"], r["pair"]
        row = {"id": r["id"], "images": [_rel(p, out) for p in pair["images"]], "question": m["question"],
               "options": m["options"], "answer": m["answer"], "explanation": m["explanation"],
               "source": "medrwr-synth", "provenance": pair.get("provenance", {}), "cluster": pair.get("cluster")}
        if r["id"] in strat:
            row["policy_accuracy"] = strat[r["id"]]["accuracy"]
        rows.append(row)
    write_jsonl_atomic(out / "data.jsonl", rows)
    return len(rows), rows


def _card(report: SynthReport, rows: list[dict[str, Any]], cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
    licences = Counter(str(r["provenance"].get("license", r["provenance"].get("licence", "unknown"))) for r in rows)
    sources = Counter(str(r["provenance"].get("source", "unknown")) for r in rows)
    return {
        "name": "medrwr-synth stage-2 MCQs",
        "format": "generic MCQ JSONL (medrwr.train.data, format 'mcq')",
        "file": "data.jsonl",
        "questions": len(rows),
        "counts": {stage: {k: v for k, v in s.items() if k not in ("path", "plot", "usage")}
                   for stage, s in report.stages.items()},
        "sources": {"pairs": meta["pairs"], "llm_model": meta.get("llm_model"), "image_encoder": cfg.data.image_encoder,
                    "policy": meta.get("policy"), "pair_sources": dict(sorted(sources.items()))},
        "licences": dict(sorted(licences.items())),
        "licence_note": "each question keeps its pair's licence fields under 'provenance'; questions inherit the "
                        "licence of the image and caption they were written from",
        "config": {k: v for k, v in asdict(cfg.data).items() if not k.startswith("kb_")},
    }


def _card_md(card: dict[str, Any]) -> str:
    lines = [f"# Data card: {card['name']}", "", f"- file: `{card['file']}` ({card['format']})",
             f"- questions: {card['questions']}", "", "## Counts per stage", ""]
    for stage, counts in card["counts"].items():
        lines.append(f"- **{stage}**: " + ", ".join(f"{k} {json.dumps(v)}" for k, v in counts.items()))
    lines += ["", "## Sources", ""] + [f"- {k}: {json.dumps(v)}" for k, v in card["sources"].items()]
    lines += ["", "## Licences", ""] + [f"- {k}: {v}" for k, v in card["licences"].items()]
    lines += ["", card["licence_note"], ""]
    return "\n".join(lines)


def synthesize(cfg: Any, pairs_path: str | os.PathLike, images_dir: str | os.PathLike, out: str | os.PathLike, *,
               llm_url: str | None, llm_model: str | None, stages: tuple[str, ...] = STAGES,
               image_encoder: Any = None, backend: Any = None, show_progress: bool = True) -> SynthReport:
    """Run ``stages`` (in pipeline order) then write the output and the data card. ``image_encoder`` and
    ``backend`` (a policy backend for stratify) replace the configured ones (tests pass scripted ones)."""
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SynthesisError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    outp = Path(out)
    pairs = read_pairs(pairs_path, images_dir)  # checked before any model or request
    if "write" in stages and not (llm_url and llm_model):
        raise SynthesisError("the write stage needs --llm-url and --llm-model (an OpenAI-compatible chat server)")
    outp.mkdir(parents=True, exist_ok=True)
    report = SynthReport(out=outp)
    report.stages["pairs"] = {"pairs": len(pairs)}
    if "select" in stages:
        from medrwr.data.select import run_select

        s = run_select(pairs, outp, cfg.data, encoder=image_encoder)
        report.stages["select"] = {"pairs": s.pairs, "clusters": s.clusters, "selected": s.selected,
                                   "largest_cluster": max(s.cluster_sizes), "plot": str(s.plot)}
    if "write" in stages:
        from medrwr.data.llm import ChatClient
        from medrwr.data.write import run_write

        selected = _need(outp / "select.jsonl", "select")
        d = cfg.data
        with ChatClient(llm_url, llm_model, outp / "llm-cache", timeout_s=d.timeout_s, retries=d.http_retries,
                        backoff_s=d.backoff_s, temperature=d.temperature, max_tokens=d.max_tokens) as client:
            w = run_write(selected, outp, d, client, show_progress)
        report.stages["write"] = {"captions": w.total, "ok": w.ok, "invalid": w.invalid, "failed": w.failed,
                                  "invalid_reasons": w.reasons, "usage": w.usage, "cost_usd": round(w.cost, 4)}
    used_stratify = "stratify" in stages
    if used_stratify:
        from medrwr.data.stratify import direct_engine, run_stratify

        items = [r for r in _need(outp / "write.jsonl", "write") if r["status"] == "ok"]
        engine = direct_engine(cfg, backend=backend)
        st = run_stratify(items, outp, cfg.data, engine, show_progress)
        report.stages["stratify"] = {"questions": st.total, "kept": st.kept, "samples": st.samples,
                                     "band": st.band, "distribution": st.distribution}
    from medrwr._io import write_json_atomic

    for stage in STAGES:  # the card shows every stage's counts, also those of stages run by an earlier command
        summary = outp / stage / "summary.json"
        if stage in report.stages:
            write_json_atomic(summary, report.stages[stage])
        elif summary.is_file() and (stage != "stratify" or used_stratify):
            report.stages[stage] = json.loads(summary.read_text(encoding="utf-8"))
    report.stages = {k: report.stages[k] for k in ("pairs", *STAGES) if k in report.stages}
    n_out, rows = build_output(outp, cfg, used_stratify)
    report.stages["output"] = {"questions": n_out, "wanted": cfg.data.n}
    meta = {"pairs": str(pairs_path), "llm_model": llm_model, "policy": cfg.model.name if used_stratify else None}
    report.card = _card(report, rows, cfg, meta)
    write_json_atomic(outp / "data_card.json", report.card)
    (outp / "DATA_CARD.md").write_text(_card_md(report.card), encoding="utf-8")
    return report


def _need(path: Path, stage: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SynthesisError(f"{path} is missing: run the {stage} stage first (--stages {stage},...)")
    return read_jsonl(path)
