"""``medrwr train``: GRPO stages 1-2 and the SFT cold start (``--config configs/stage1.yaml``), and ``report``.

``medrwr train --config C --out DIR`` trains into DIR (metrics.jsonl, checkpoints, checkpoint-final/);
running it again on the same DIR resumes from the last checkpoint. ``medrwr train report DIR`` draws
DIR/metrics.jsonl as PNG curves. See docs/training.md.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from medrwr.cli._shared import ConfigOpt, SetOpt, _config, console
from medrwr.errors import CLIError

train_app = typer.Typer(help="Train a policy: SFT cold start, then two-stage GRPO (docs/training.md).",
                        invoke_without_command=True)


@train_app.callback()
def train(
    ctx: typer.Context,
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default train.output_dir)."),
    model: Optional[str] = typer.Option(None, "--model", help="Policy to start from (model.name), e.g. the "
                                        "previous stage's DIR/checkpoint-final."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Training file (train.dataset)."),
    resume: bool = typer.Option(True, "--resume/--restart", help="Resume from the last checkpoint in --out "
                                "(default) or start over."),
) -> None:
    """Train with the stage the config names (train.stage: 0 SFT, 1 text GRPO, 2 image GRPO)."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None and not overrides:
        raise CLIError("pass --config (e.g. configs/stage1.yaml, configs/tiny/stage1.yaml) or --set train.*=...",
                       code=2)
    cfg = _config(config, overrides)
    if model is not None:
        cfg.model.name = model
    if dataset is not None:
        cfg.train.dataset = dataset
    from medrwr.train.run import run_training

    what = {0: "SFT cold start", 1: "GRPO stage 1", 2: "GRPO stage 2"}[cfg.train.stage]
    console.print(f"{what}: model {cfg.model.name or 'packaged SmolLM2'}, data {cfg.train.dataset}", highlight=False)
    result = run_training(cfg, out, resume=resume)
    if result.resumed_from:
        console.print(f"resumed from {result.resumed_from}", highlight=False)
    console.print(f"done: {result.global_step} steps; metrics {result.metrics}; model {result.checkpoint}",
                  highlight=False)


@train_app.command("report")
def report(
    run_dir: str = typer.Argument(..., help="A run directory holding metrics.jsonl."),
    out: Optional[str] = typer.Option(None, "--out", help="PNG path (default RUN_DIR/curves.png)."),
) -> None:
    """Draw a run's metrics.jsonl (reward components, accuracy, KL, retrieval rate, rounds, tokens/s) as PNG."""
    from medrwr.train.metrics.report import render_report

    path = render_report(run_dir, out)
    console.print(f"wrote {path}", highlight=False)


@train_app.command("verl-data")
def verl_data(
    src: str = typer.Argument(..., help="MedQA / MedMCQA / MCQ file (.jsonl, .json or .parquet)."),
    out: str = typer.Argument(..., help="The verl parquet to write (*.parquet)."),
    fmt: str = typer.Option("auto", "--format", help="auto, medqa, medmcqa or mcq."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N questions."),
    data_source: Optional[str] = typer.Option(None, "--data-source", help="verl's data_source (default "
                                              "medrwr/<format>)."),
    split: str = typer.Option("train", "--split", help="Recorded in extra_info.split."),
) -> None:
    """Convert an MCQ training file to verl parquet, rows tagged agent_name=medrwr_agent (docs/scaling.md)."""
    from medrwr.train.verl_data import convert_to_verl

    n = convert_to_verl(src, out, fmt=fmt, limit=limit, data_source=data_source, split=split)
    console.print(f"wrote {n} verl rows to {out}", highlight=False)
