"""Metrics and the Markdown report of evaluation runs, from ``results.jsonl`` alone (no model, no data).

:func:`compute_metrics` turns one run's stored rows into ``metrics.json``: per mode the overall accuracy, the
accuracy and N per answer type, per verdict bucket, per modality / question type / subject, the unparsed rate,
open-answer EM / recall / F1, retrieval rate and rounds, stop reasons, calibration of the answer confidence (ECE
and reliability bins), and for ``rwr_cdir`` what CDIR did (accuracy below / above the threshold, flips).
:func:`render` writes ``metrics.json``, ``report.md`` and the plots (:mod:`medrwr.eval.plots`) for one or more
runs, with a side-by-side table across modes and runs.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrwr._imports import is_available
from medrwr._io import write_json_atomic
from medrwr.eval.results import RUN_JSON, read_results

logger = logging.getLogger(__name__)

__all__ = ["compute_metrics", "ece", "render", "render_markdown"]

MODE_ORDER = ("direct", "rag", "rwr", "rwr_cdir")
GROUP_KEYS = ("modality", "question_type", "subject")
_MAX_ROWS = 25


def _acc(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    c = sum(1 for r in rows if r["verdict"].get("correct"))
    return {"n": n, "correct": c, "accuracy": c / n if n else None}


def ece(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> tuple[float | None, list[dict]]:
    """Expected calibration error over equal-width confidence bins, and the bins (for the reliability diagram).

    >>> round(ece([0.9, 0.9, 0.2, 0.2], [True, False, False, False])[0], 3)
    0.3
    """
    if not confidences:
        return None, []
    out = []
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo <= c < hi) or (b == bins - 1 and c == 1.0)]
        if not idx:
            out.append({"lo": lo, "hi": hi, "n": 0, "confidence": None, "accuracy": None})
            continue
        conf = sum(confidences[i] for i in idx) / len(idx)
        acc = sum(1 for i in idx if correct[i]) / len(idx)
        total += len(idx) / len(confidences) * abs(acc - conf)
        out.append({"lo": lo, "hi": hi, "n": len(idx), "confidence": conf, "accuracy": acc})
    return total, out


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _mode_metrics(rows: list[dict[str, Any]], threshold: float | None) -> dict[str, Any]:
    m: dict[str, Any] = {"overall": _acc(rows)}
    by_type: dict[str, list] = defaultdict(list)
    by_bucket: dict[str, list] = defaultdict(list)
    for r in rows:
        by_type[r.get("answer_type", "?")].append(r)
        by_bucket[r["verdict"].get("bucket", "?")].append(r)
    m["by_answer_type"] = {k: _acc(v) for k, v in sorted(by_type.items())}
    m["by_bucket"] = {k: _acc(v) for k, v in sorted(by_bucket.items())}
    n = len(rows)
    m["unparsed"] = {"n": len(by_bucket.get("unparsed", [])),
                     "rate": len(by_bucket.get("unparsed", [])) / n if n else None}
    opens = [r["verdict"] for r in rows if r.get("answer_type") == "open"]
    if opens:
        m["open_scores"] = {k: _mean([v.get(k) for v in opens]) for k in ("em", "recall", "f1")} | {"n": len(opens)}
    for key in GROUP_KEYS:
        groups: dict[str, list] = defaultdict(list)
        for r in rows:
            v = (r.get("meta") or {}).get(key)
            if v not in (None, ""):
                groups[str(v)].append(r)
        if groups:
            m[f"by_{key}"] = {k: _acc(v) for k, v in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))}
    rounds = [int((r.get("trace") or {}).get("rounds") or 0) for r in rows]
    if rows and rows[0].get("mode") == "rag":
        retrieved = [bool((r.get("rag") or {}).get("hits")) for r in rows]
    else:
        retrieved = [x > 0 for x in rounds]
    m["retrieval"] = {"rate": sum(retrieved) / n if n else None, "mean_rounds": _mean(rounds),
                      "rounds_hist": {str(k): v for k, v in sorted(Counter(rounds).items())}}
    m["stop_reasons"] = dict(Counter(str((r.get("trace") or {}).get("stop_reason")) for r in rows))
    conf = [(float(r["trace"]["confidence"]), bool(r["verdict"].get("correct"))) for r in rows
            if (r.get("trace") or {}).get("confidence") is not None]
    e, bins = ece([c for c, _ in conf], [k for _, k in conf])
    m["calibration"] = {"n": len(conf), "ece": e, "bins": bins}
    if rows and rows[0].get("mode") == "rwr_cdir":
        m["cdir"] = _cdir_metrics(rows, threshold)
    return m


def _cdir_metrics(rows: list[dict[str, Any]], threshold: float | None) -> dict[str, Any]:
    below, above, flips = [], [], Counter()
    triggered = 0
    for r in rows:
        cd = (r.get("trace") or {}).get("cdir") or {}
        thr = cd.get("threshold", threshold)
        first_ok = bool((r.get("rwr_verdict") or r["verdict"]).get("correct"))
        final_ok = bool(r["verdict"].get("correct"))
        conf = cd.get("confidence")
        if conf is not None and thr is not None:
            (below if conf < thr else above).append((first_ok, final_ok))
        if cd.get("triggered"):
            triggered += 1
            flips[f"{'right' if first_ok else 'wrong'}->{'right' if final_ok else 'wrong'}"] += 1

    def acc(pairs: list, i: int) -> float | None:
        return sum(1 for p in pairs if p[i]) / len(pairs) if pairs else None

    return {
        "threshold": threshold, "triggered": triggered, "trigger_rate": triggered / len(rows) if rows else None,
        "below": {"n": len(below), "accuracy_before": acc(below, 0), "accuracy_after": acc(below, 1)},
        "above": {"n": len(above), "accuracy": acc(above, 1)},
        "flips": {k: flips.get(k, 0) for k in ("wrong->right", "right->wrong", "right->right", "wrong->wrong")},
    }


def compute_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The metrics of one run directory (``results.jsonl`` + ``run.json``)."""
    run_dir = Path(run_dir)
    rows = read_results(run_dir)
    info: dict[str, Any] = {}
    if (run_dir / RUN_JSON).is_file():
        info = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))
    ident = info.get("identity", {})
    threshold = (ident.get("cdir") or {}).get("threshold")
    by_mode: dict[str, list] = defaultdict(list)
    for r in rows:
        by_mode[r["mode"]].append(r)
    modes = [m for m in MODE_ORDER if m in by_mode] + sorted(set(by_mode) - set(MODE_ORDER))
    data = ident.get("data") or {}
    presets = sorted({str(r["verdict"].get("preset")) for r in rows})
    return {
        "run_dir": str(run_dir),
        "name": run_dir.name,
        "benchmark": ident.get("benchmark") or (rows[0].get("benchmark") if rows else None),
        "split": sorted({str(r.get("split")) for r in rows}),
        "split_files": sorted((data.get("files") or {}).keys()),
        "data_path": data.get("path"),
        "model": (ident.get("model") or {}).get("name"),
        "preset": ident.get("preset") or (presets[0] if len(presets) == 1 else presets),
        "judge": (ident.get("judge") or {}).get("model")
        or next((r["verdict"]["judge"] for r in rows if r["verdict"].get("judge")), None),
        "answer_types": "mcq = has options (scored by letter); closed = yes/no or closed set without options; "
                        "open = free text (EM / token recall / token F1)",
        "n_items": info.get("n_items"),
        "status": info.get("status"),
        "timings": info.get("timings", {}),
        "modes": {m: _mode_metrics(by_mode[m], threshold) for m in modes},
    }


# ---------------------------------------------------------------------- Markdown


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _cell(a: dict[str, Any] | None) -> str:
    return "—" if not a or not a.get("n") else f"{_pct(a['accuracy'])} ({a['n']})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _side_by_side(runs: list[dict[str, Any]]) -> list[str]:
    rows = []
    for run in runs:
        for mode, m in run["modes"].items():
            bt = m["by_answer_type"]
            rows.append([run["name"], mode, str(m["overall"]["n"]), _pct(m["overall"]["accuracy"]),
                         _cell(bt.get("mcq")), _cell(bt.get("closed")), _cell(bt.get("open")),
                         _pct(m["unparsed"]["rate"]), _pct(m["retrieval"]["rate"]),
                         "—" if m["retrieval"]["mean_rounds"] is None else f"{m['retrieval']['mean_rounds']:.2f}",
                         "—" if m["calibration"]["ece"] is None else f"{m['calibration']['ece']:.3f}"])
    return _table(["run", "mode", "N", "acc %", "mcq % (N)", "closed % (N)", "open % (N)", "unparsed %",
                   "retrieval %", "rounds", "ECE"], rows)


def _grouped(run: dict[str, Any], key: str, title: str) -> list[str]:
    modes = list(run["modes"])
    values: dict[str, int] = {}
    for m in modes:
        for v, a in (run["modes"][m].get(key) or {}).items():
            values[v] = max(values.get(v, 0), a["n"])
    if not values:
        return []
    order = sorted(values, key=lambda v: (-values[v], v))
    out = [f"### {title}", ""]
    out += _table([title.lower()] + [f"{m} % (N)" for m in modes],
                  [[v] + [_cell((run["modes"][m].get(key) or {}).get(v)) for m in modes] for v in order[:_MAX_ROWS]])
    if len(order) > _MAX_ROWS:
        out.append(f"\n({len(order) - _MAX_ROWS} more in metrics.json)")
    return out + [""]


def _run_section(run: dict[str, Any], plots: list[str], level: str = "##") -> list[str]:
    out = [f"{level} {run['name']}", ""]
    out += [f"- benchmark: `{run['benchmark']}`, split: {', '.join(run['split'])}; split file(s): "
            f"{', '.join(f'`{f}`' for f in run['split_files']) or '—'}",
            f"- model: `{run['model']}`; scoring preset: `{run['preset']}`"
            + (f"; LLM judge (open answers): `{run['judge']}`" if run.get("judge") else "")
            + f"; items: {run['n_items']}; status: {run['status']}",
            f"- answer types: {run['answer_types']}", ""]
    out += _grouped(run, "by_answer_type", "Answer type")
    out += _grouped(run, "by_bucket", "Verdict bucket")
    for key, title in (("by_modality", "Modality"), ("by_question_type", "Question type"), ("by_subject", "Subject")):
        out += _grouped(run, key, title)
    opens = {m: v["open_scores"] for m, v in run["modes"].items() if v.get("open_scores")}
    if opens:
        out += ["### Open answers", ""]
        out += _table(["mode", "N", "EM %", "token recall %", "token F1 %"],
                      [[m, str(s["n"]), _pct(s["em"]), _pct(s["recall"]), _pct(s["f1"])] for m, s in opens.items()])
        out.append("")
    out += ["### Stop reasons", ""]
    out += _table(["mode", "stop reasons"], [[m, ", ".join(f"{k}: {v}" for k, v in sorted(x["stop_reasons"].items()))]
                                             for m, x in run["modes"].items()])
    out.append("")
    cd = (run["modes"].get("rwr_cdir") or {}).get("cdir")
    if cd:
        f = cd["flips"]
        out += ["### CDIR", "",
                f"threshold {cd['threshold']}; triggered on {cd['triggered']} items ({_pct(cd['trigger_rate'])} %). "
                f"Below the threshold (N={cd['below']['n']}): accuracy {_pct(cd['below']['accuracy_before'])} % "
                f"before CDIR → {_pct(cd['below']['accuracy_after'])} % after; above (N={cd['above']['n']}): "
                f"{_pct(cd['above']['accuracy'])} %. Flips: wrong→right {f['wrong->right']}, "
                f"right→wrong {f['right->wrong']} (unchanged: right {f['right->right']}, wrong {f['wrong->wrong']}).",
                ""]
    timings = run.get("timings") or {}
    if timings:
        out += ["### Throughput (this run's last session)", ""]
        out += _table(["mode", "items", "items/s"], [[m, str(t["items"]), f"{t['items_per_s']:.2f}"
                                                      if t.get("items_per_s") else "—"] for m, t in timings.items()])
        out.append("")
    if plots:
        out += ["### Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return out


def render_markdown(runs: list[dict[str, Any]], plots: dict[str, list[str]]) -> str:
    """The report: the side-by-side table, then one section per run."""
    out = ["# Evaluation report", "", "Accuracy in %, N in brackets. Unparsed answers are counted wrong.", ""]
    out += ["## All runs and modes", ""] + _side_by_side(runs) + [""]
    if plots.get("_all"):
        out += [f"![{Path(p).stem}]({Path(p).name})" for p in plots["_all"]] + [""]
    for run in runs:
        out += _run_section(run, plots.get(run["run_dir"], []))
    return "\n".join(out).rstrip() + "\n"


def render(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, *, plots: bool = True) -> dict[str, Any]:
    """Write ``metrics.json``, ``report.md`` and the PNG plots for ``run_dirs`` into ``out_dir`` (default: the
    run directory when there is one run). Returns ``{"report": path, "metrics": path, "plots": [paths]}``."""
    if not run_dirs:
        raise ValueError("no run directory given")
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0]) if len(run_dirs) == 1 else Path("eval-report")
    out.mkdir(parents=True, exist_ok=True)
    runs = [compute_metrics(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # two runs named alike: qualify by position
        for i, r in enumerate(runs):
            r["name"] = f"{i + 1}:{r['name']}"
    made: dict[str, list[str]] = {}
    if plots and not is_available("matplotlib"):
        logger.warning("matplotlib is not installed: writing the report without plots (pip install 'medrwr[eval]')")
        plots = False
    if plots:
        from medrwr.eval.plots import render_plots

        made = render_plots(runs, out)
    metrics = runs[0] if len(runs) == 1 else {"runs": runs}
    write_json_atomic(out / "metrics.json", metrics)
    md = render_markdown(runs, made)
    tmp = out / ".report.md.tmp"
    tmp.write_text(md, encoding="utf-8")
    tmp.replace(out / "report.md")
    return {"report": str(out / "report.md"), "metrics": str(out / "metrics.json"),
            "plots": [p for ps in made.values() for p in ps]}
