"""``medrwr kb from-explanations``: a knowledge base from MCQ explanations (docs/data-pipelines.md)."""

from __future__ import annotations

from typing import List, Optional

import typer

from medrwr.cli._shared import ConfigOpt, SetOpt, _config, console
from medrwr.errors import CLIError

kb_app = typer.Typer(help="Build knowledge bases from training data.", no_args_is_help=True)


@kb_app.command("from-explanations")
def from_explanations(
    data: List[str] = typer.Option(..., "--data", help="MCQ file(s) with an 'explanation' or 'exp' column "
                                   "(JSONL, JSON, CSV/TSV, parquet); repeatable. The dataset tag is the file name."),
    out: str = typer.Option(..., "--out", help="Output folder: passages.jsonl and index/."),
    column: Optional[str] = typer.Option(None, "--column", help="Column holding the explanation."),
    bm25_only: bool = typer.Option(False, "--bm25-only", help="Skip the dense index (default: retrieval.dense)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Split explanations into statements, drop near-duplicates, tag them, index them."""
    cfg = _config(config, overrides)
    from medrwr.data.kb import build_explanation_kb

    try:
        res = build_explanation_kb(data, out, cfg, column=column, dense=False if bm25_only else None,
                                   show_progress=progress)
    except (OSError, ImportError) as exc:
        raise CLIError(str(exc)) from None
    console.print(f"explanations {res.explanations}, statements {res.statements}, near-duplicates dropped "
                  f"{res.near_duplicates}, passages {res.passages} " + str(res.per_dataset), highlight=False)
    console.print(f"[green]built[/green] {res.index} (search it with --set retrieval.index={res.index})")
