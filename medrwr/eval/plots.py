"""The report's PNG plots (matplotlib, Agg backend: no display needed), drawn from computed metrics only.

Per report: ``accuracy_by_mode.png`` (every run and mode). Per run: ``retrieval.png`` (retrieval rate per mode
and the rounds histogram), ``reliability.png`` (reliability diagram of the answer confidence per mode, ECE in
the legend), and with ``rwr_cdir``: ``cdir_threshold.png`` (accuracy below vs above the CDIR threshold, before
and after CDIR) and ``cdir_flips.png`` (what CDIR changed: wrong→right, right→wrong).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medrwr._imports import require

__all__ = ["render_plots"]


def _plt() -> Any:
    mpl = require("matplotlib", "eval", "the evaluation report's plots")
    mpl.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def _accuracy_by_mode(plt: Any, runs: list[dict[str, Any]], path: Path) -> str:
    modes = [m for m in ("direct", "rag", "rwr", "rwr_cdir") if any(m in r["modes"] for r in runs)]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(modes) * max(1, len(runs)) ** 0.5 + 2), 3.2))
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        xs = [j + i * width for j in range(len(modes))]
        ys = [100 * (run["modes"].get(m, {}).get("overall", {}).get("accuracy") or 0) for m in modes]
        bars = ax.bar(xs, ys, width, label=run["name"])
        for b, m in zip(bars, modes):
            n = run["modes"].get(m, {}).get("overall", {}).get("n")
            if n:
                ax.annotate(f"{b.get_height():.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))], modes)
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 105)
    ax.set_title("Accuracy by mode")
    if len(runs) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _retrieval(plt: Any, run: dict[str, Any], path: Path) -> str:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    modes = list(run["modes"])
    a1.bar(modes, [100 * (run["modes"][m]["retrieval"]["rate"] or 0) for m in modes], color="tab:green")
    a1.set_ylabel("items with retrieval %")
    a1.set_ylim(0, 105)
    a1.set_title("Retrieval rate")
    loops = [m for m in modes if m in ("rwr", "rwr_cdir")] or modes
    top = max((int(k) for m in loops for k in run["modes"][m]["retrieval"]["rounds_hist"]), default=0)
    width = 0.8 / len(loops)
    for i, m in enumerate(loops):
        hist = run["modes"][m]["retrieval"]["rounds_hist"]
        a2.bar([k + i * width for k in range(top + 1)], [hist.get(str(k), 0) for k in range(top + 1)], width, label=m)
    a2.set_xticks([k + 0.4 - width / 2 for k in range(top + 1)], [str(k) for k in range(top + 1)])
    a2.set_xlabel("retrieval rounds")
    a2.set_ylabel("items")
    a2.set_title("Rounds per item")
    a2.legend(fontsize=7)
    return _save(fig, path)


def _reliability(plt: Any, run: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for m, mm in run["modes"].items():
        cal = mm["calibration"]
        pts = [(b["confidence"], b["accuracy"]) for b in cal["bins"] if b["n"]]
        if pts:
            label = f"{m} (ECE {cal['ece']:.3f}, N={cal['n']})"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("answer confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability of the answer confidence")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def _cdir_threshold(plt: Any, cd: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    labels = [f"below (N={cd['below']['n']})\nbefore", f"below (N={cd['below']['n']})\nafter CDIR",
              f"above (N={cd['above']['n']})"]
    ys = [100 * (cd["below"]["accuracy_before"] or 0), 100 * (cd["below"]["accuracy_after"] or 0),
          100 * (cd["above"]["accuracy"] or 0)]
    ax.bar(labels, ys, color=["tab:orange", "tab:blue", "tab:grey"])
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy %")
    ax.set_title(f"Accuracy vs the CDIR threshold ({cd['threshold']})", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    return _save(fig, path)


def _cdir_flips(plt: Any, cd: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    keys = ["wrong->right", "right->wrong", "right->right", "wrong->wrong"]
    ax.bar([k.replace("->", "→") for k in keys], [cd["flips"][k] for k in keys],
           color=["tab:green", "tab:red", "tab:grey", "tab:grey"])
    ax.set_ylabel("items (CDIR triggered)")
    ax.set_title(f"What CDIR changed ({cd['triggered']} triggered)", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    return _save(fig, path)


def render_plots(runs: list[dict[str, Any]], out: Path) -> dict[str, list[str]]:
    """Draw every plot into ``out``; returns ``{"_all": [...], run_dir: [...]}`` (file paths)."""
    plt = _plt()
    made: dict[str, list[str]] = {"_all": [_accuracy_by_mode(plt, runs, out / "accuracy_by_mode.png")]}
    for i, run in enumerate(runs):
        prefix = "" if len(runs) == 1 else f"run{i + 1}_"
        files = [_retrieval(plt, run, out / f"{prefix}retrieval.png")]
        if any(m["calibration"]["n"] for m in run["modes"].values()):
            files.append(_reliability(plt, run, out / f"{prefix}reliability.png"))
        cd = (run["modes"].get("rwr_cdir") or {}).get("cdir")
        if cd:
            files.append(_cdir_threshold(plt, cd, out / f"{prefix}cdir_threshold.png"))
            files.append(_cdir_flips(plt, cd, out / f"{prefix}cdir_flips.png"))
        made[run["run_dir"]] = files
    return made
