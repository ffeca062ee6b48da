"""``medrwr data synth``: stage-2 MCQs from image–caption pairs (docs/data-pipelines.md)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from medrwr.cli._shared import ConfigOpt, SetOpt, _config, console
from medrwr.errors import CLIError

data_app = typer.Typer(help="Make training data: MCQs from image–caption pairs.", no_args_is_help=True)


@data_app.command("synth")
def synth(
    pairs: str = typer.Option(..., "--pairs", help="JSONL of image–caption pairs (image/images, caption, id, license)."),
    images: str = typer.Option(..., "--images", help="Folder the pairs' image paths are relative to."),
    out: str = typer.Option(..., "--out", help="Output folder (rerun with the same folder to resume)."),
    llm_url: Optional[str] = typer.Option(None, "--llm-url", help="OpenAI-compatible base URL, e.g. "
                                          "http://127.0.0.1:8000/v1 (key: MEDRWR_LLM_API_KEY or OPENAI_API_KEY)."),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="Model name the LLM server serves."),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="Questions wanted (default data.n = 6500)."),
    model: Optional[str] = typer.Option(None, "--model", help="Policy for stratify (hub id or folder; default "
                                        "model.name)."),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="Policy answers per question "
                                          "(default data.samples = 8)."),
    stages: str = typer.Option("select,write,stratify", "--stages", help="Stages to run, in order; the output "
                               "and data card are always written. Drop stratify to keep every valid question."),
    as_json: bool = typer.Option(False, "--json", help="Print the data card as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Select diverse pairs, have an LLM write one MCQ per caption, keep those of useful difficulty."""
    sets = list(overrides or [])
    sets += [f"data.n={n}"] if n else []
    sets += [f"data.samples={samples}"] if samples else []
    cfg = _config(config, sets)
    if model:
        cfg.model.name = model
    from medrwr.data.synth import synthesize
    from medrwr.errors import BackendError

    chosen = tuple(s.strip() for s in stages.split(",") if s.strip())
    try:
        report = synthesize(cfg, pairs, images, out, llm_url=llm_url, llm_model=llm_model, stages=chosen,
                            show_progress=progress)
    except (BackendError, OSError, ImportError) as exc:
        raise CLIError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(report.card, indent=1))
        return
    for stage, counts in report.stages.items():
        shown = {k: v for k, v in counts.items() if k not in ("usage", "plot")}
        console.print(f"[bold]{stage}[/bold]: " + ", ".join(f"{k} {v}" for k, v in shown.items()), highlight=False)
        if counts.get("usage"):
            console.print("  llm: " + ", ".join(f"{k} {v}" for k, v in counts["usage"].items()), highlight=False)
    console.print(f"[green]wrote[/green] {report.out / 'data.jsonl'} and {report.out / 'DATA_CARD.md'}")
