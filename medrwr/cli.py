"""The ``medrwr`` command. Commands stay thin: parse flags, load the config, call a layer, render.

Heavy libraries are imported inside commands, so ``medrwr --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

import typer
from rich.console import Console

from medrwr.config import Config, ConfigError, load_config

app = typer.Typer(
    name="medrwr",
    help="MedRwR: multimodal medical reasoning-with-retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and inspect knowledge-base indexes.", no_args_is_help=True)
serve_app = typer.Typer(help="Run the retrieval service or the OpenAI-compatible API.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(serve_app, name="serve")

console = Console()
err_console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see configs/).")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set retrieval.k=5 (repeatable).")


class CLIError(Exception):
    """A user-facing failure: printed without a traceback, exit code 1 (or ``code``)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _config(config: Optional[str], overrides: Optional[List[str]]) -> Config:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        raise CLIError(f"config error: {exc}") from None


def _not_built(command: str, issue: str) -> None:
    err_console.print(
        f"[yellow]`medrwr {command}` is not built yet[/yellow] ({issue}). It does nothing rather than pretend."
    )
    raise typer.Exit(code=2)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
    debug: bool = typer.Option(False, "--debug", help="Log at DEBUG level."),
) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------ retrieval


@index_app.command("build")
def index_build(
    corpus: str = typer.Option(..., "--corpus", help="Corpus file (JSONL, TSV/CSV, parquet) or 'default'."),
    out: str = typer.Option(..., "--out", help="Index directory to write (atomically)."),
    preset: str = typer.Option("auto", "--preset", help="Column mapping: auto, medrag, medrwr, flashrag, plain."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Build a BM25 + dense index over a corpus."""
    _not_built("index build", "issue: knowledge base and hybrid retrieval")


@index_app.command("info")
def index_info(path: str = typer.Argument(..., help="Index directory.")) -> None:
    """Show an index's manifest: documents, encoder, build config, checksums."""
    _not_built("index info", "issue: knowledge base and hybrid retrieval")


@app.command("retrieve")
def retrieve(
    query: List[str] = typer.Argument(..., help="One or more queries."),
    index: Optional[str] = typer.Option(None, "--index", help="Index directory (default: shipped KB)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="bm25, dense or hybrid."),
    k: Optional[int] = typer.Option(None, "-k", help="Hits per query."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Search the knowledge base."""
    _not_built("retrieve", "issue: knowledge base and hybrid retrieval")


@serve_app.command("retrieval")
def serve_retrieval(
    index: Optional[str] = typer.Option(None, "--index", help="Index directory (default: shipped KB)."),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default 8321)."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Env var holding a bearer token."),
    ray: bool = typer.Option(False, "--ray", help="Shard the index over Ray Serve replicas."),
    shards: int = typer.Option(2, "--shards", help="Number of shards with --ray."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Run the batched retrieval HTTP service."""
    _not_built("serve retrieval", "issue: retrieval service")


@serve_app.command("api")
def serve_api() -> None:
    """Run the OpenAI-compatible API that executes the whole reasoning-with-retrieval loop."""
    _not_built("serve api", "no issue yet: serving and UX")


# ------------------------------------------------------------------------------------------ rollout


@app.command("ask")
def ask(
    question: str = typer.Argument(..., help="The question (options as 'A. ...' lines, or via --option)."),
    image: Optional[List[str]] = typer.Option(None, "--image", help="Image file(s); needs a VLM."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="An answer option (repeatable)."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id or local path of the policy."),
    index: Optional[str] = typer.Option(None, "--index", help="Index directory (default: shipped KB)."),
    cdir: bool = typer.Option(False, "--cdir", help="Confidence-driven image re-retrieval."),
    image_index: Optional[str] = typer.Option(None, "--image-index", help="Image index for --cdir."),
    as_json: bool = typer.Option(False, "--json", help="Print the trace as JSON."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Answer one question with the reasoning-with-retrieval loop and print the trace."""
    _not_built("ask", "issue: rollout engine")


# ------------------------------------------------------------------------------------------ later layers


@app.command("eval")
def eval_cmd() -> None:
    """Evaluate on medical VQA benchmarks (direct, RAG, RwR, RwR+CDIR)."""
    _not_built("eval", "no issue yet: evaluation harness")


@app.command("train")
def train() -> None:
    """Two-stage GRPO training."""
    _not_built("train", "no issue yet: two-stage GRPO training")


@app.command("demo")
def demo() -> None:
    """Open the web demo (reasoning trace, queries, documents, images)."""
    _not_built("demo", "no issue yet: serving and UX")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit code instead of raising SystemExit."""
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="medrwr")
    except CLIError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        return exc.code
    except SystemExit as exc:  # click exits with the command's code (usage errors: 2)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
