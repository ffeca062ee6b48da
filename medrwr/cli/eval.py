"""``medrwr eval``: benchmark evaluation (``run``), what a loader reads (``data``), reports (``report``).

See docs/evaluation.md. ``run`` prints progress (items/s, ETA) to stderr and ends with the report of the run.
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from medrwr.cli._shared import ConfigOpt, SetOpt, _config, apply_policy_flags, console, err_console
from medrwr.errors import CLIError

eval_app = typer.Typer(help="Evaluate policies on medical VQA benchmarks (direct, RAG, RwR, RwR+CDIR).",
                       no_args_is_help=True)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _progress_printer():
    tty = sys.stderr.isatty()

    def show(p) -> None:
        head = f"[{p.mode}] {p.done}/{p.total}"
        if p.skipped:
            head += f" (+{p.skipped} already done)"
        line = f"{head}  {p.rate:.2f} items/s  elapsed {_fmt_s(p.seconds)}  ETA {_fmt_s(p.eta_s)}"
        if tty:
            sys.stderr.write("\r" + line + ("\n" if p.done >= p.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


@eval_app.command("run")
def run(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help="Loader name (see `medrwr eval data --help`)."),
    data: str = typer.Option(..., "--data", help="The benchmark's local file or folder."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id, local path, or openai:MODEL (with --base-url)."),
    mode: Optional[List[str]] = typer.Option(None, "--mode", help="direct|rag|rwr|rwr_cdir|all (repeatable; "
                                             "default eval.modes)."),
    index: Optional[str] = typer.Option(None, "--index", help="Text index directory (default: the shipped KB)."),
    image_index: Optional[str] = typer.Option(None, "--image-index", help="CDIR image index (default: demo)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N items."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Rows running at once (eval.batch_size, default 32)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Scoring preset (standard, medevalkit, llava_med)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to load, where the benchmark has several."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default eval.output_dir/BENCHMARK)."),
    resume: bool = typer.Option(True, "--resume/--force", help="Resume a run in --out (default), or start it "
                                "over, also when its configuration differs (old files kept as *.bak-TIME)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint for openai:MODEL."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the report's PNG plots at the end."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint of an LLM judge "
                                            "for open answers (key from MEDRWR_JUDGE_API_KEY or OPENAI_API_KEY)."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="The judge model's name (with "
                                              "--judge-url); verdicts are cached and the judge is in the report."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Evaluate a policy on a benchmark in one or more modes; resumable; writes results, metrics and a report."""
    from pathlib import Path

    cfg = _config(config, overrides)
    apply_policy_flags(cfg, model=model, index=index, image_index=image_index)
    if mode:
        cfg.eval.modes = [m.strip() for x in mode for m in x.split(",") if m.strip()]
    for key, value in (("limit", limit), ("batch_size", batch_size), ("preset", preset), ("split", split),
                       ("base_url", base_url), ("judge_url", judge_url), ("judge_model", judge_model)):
        if value is not None:
            setattr(cfg.eval, key, value)
    from medrwr.eval.modes import expand_modes
    from medrwr.eval.report import render
    from medrwr.eval.runner import run_eval

    try:
        expand_modes(cfg.eval.modes)
    except ValueError as exc:
        raise CLIError(str(exc), code=2) from None
    if (cfg.eval.judge_url is None) != (cfg.eval.judge_model is None):
        raise CLIError("--judge-url and --judge-model go together: give both, or neither", code=2)
    run_dir = Path(out) if out else Path(cfg.eval.output_dir) / benchmark
    err_console.print(f"[dim]evaluating {benchmark} ({', '.join(cfg.eval.modes)}) into {run_dir}…[/dim]",
                      highlight=False)
    try:
        run_eval(cfg, benchmark, data, run_dir, force=not resume, on_progress=_progress_printer())
    except (ValueError, OSError, ImportError) as exc:
        if hasattr(exc, "exit_code"):
            raise
        raise CLIError(str(exc)) from None
    made = render([run_dir], run_dir, plots=plots)
    console.print(f"results: {run_dir / 'results.jsonl'}\nreport:  {made['report']}\nmetrics: {made['metrics']}",
                  highlight=False)


@eval_app.command("data")
def data_cmd(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help="Loader name."),
    data: str = typer.Option(..., "--data", help="The benchmark's local file or folder."),
    split: Optional[str] = typer.Option(None, "--split"),
    language: Optional[List[str]] = typer.Option(None, "--language", help="Keep this language (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show what a loader reads from local files (N and N per bucket), without a model."""
    from medrwr.eval import datasets

    if benchmark not in datasets.NAMES:
        raise CLIError(f"unknown benchmark {benchmark!r}; choose from {', '.join(datasets.NAMES)}", code=2)
    records = datasets.load(benchmark, data, split=split, languages=list(language) if language else None)
    summary = datasets.describe(records)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
        return
    from rich.table import Table

    console.print(f"[bold]{benchmark}[/bold] {data}: {len(records)} items", highlight=False)
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            t = Table(title=key, title_justify="left")
            t.add_column(key)
            t.add_column("N", justify="right")
            for k, v in value.items():
                t.add_row(str(k), str(v))
            console.print(t)
        elif not isinstance(value, dict):
            console.print(f"{key}: {value}", highlight=False)


@eval_app.command("report")
def report(
    run_dirs: List[str] = typer.Argument(..., help="Run directories of `medrwr eval run`."),
    out: Optional[str] = typer.Option(None, "--out", help="Where to write report.md, metrics.json and the plots "
                                      "(default: the run directory for one run, ./eval-report for several)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
) -> None:
    """Re-render metrics, report.md and plots from saved results (no model, no data)."""
    from pathlib import Path

    from medrwr.eval.report import render

    for d in run_dirs:
        if not (Path(d) / "results.jsonl").is_file():
            raise CLIError(f"{d} has no results.jsonl: pass run directories written by `medrwr eval run`", code=2)
    made = render(run_dirs, out, plots=not no_plots)
    console.print(f"report:  {made['report']}\nmetrics: {made['metrics']}", highlight=False)
    for p in made["plots"]:
        console.print(f"plot:    {p}", highlight=False)
