"""The ``medrwr`` command. Commands stay thin: parse flags, load the config, call a layer, render.

Heavy libraries are imported inside commands, so ``medrwr --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from medrwr.config import Config, ConfigError, load_config
from medrwr.errors import CLIError, MedRwRError

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
    import time

    cfg = _config(config, overrides)
    t0 = time.perf_counter()
    try:
        if corpus == "default":
            from medrwr.kb.default import build_default_kb

            path = build_default_kb(out, config=cfg.retrieval if (config or overrides) else None)
        else:
            from medrwr.retrieval.index.corpus import read_corpus
            from medrwr.retrieval.index.hybrid import build_index

            docs = read_corpus(corpus, preset=preset)
            path = build_index(docs, out, config=cfg.retrieval)
        from medrwr.retrieval.index.store import load_manifest

        manifest = load_manifest(path, verify=False)
    except (ValueError, OSError, ImportError) as exc:
        raise CLIError(str(exc)) from None
    console.print(
        f"[green]built[/green] {path}: {manifest.get('doc_count')} documents, "
        f"modes {', '.join(manifest.get('modes', []))}, in {time.perf_counter() - t0:.1f}s"
    )


@index_app.command("info")
def index_info(
    path: str = typer.Argument(..., help="Index directory."),
    verify: bool = typer.Option(False, "--verify", help="Hash every file in full (slow for big indexes)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show an index's manifest: documents, encoder, build config, checksums."""
    import json

    from rich.table import Table

    from medrwr.retrieval.index.store import IndexStoreError, load_manifest

    try:
        m = load_manifest(path, verify="full" if verify else True)
    except IndexStoreError as exc:
        raise CLIError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(m, indent=2, ensure_ascii=False))
        return
    files = m.get("files", {})
    corpus = m.get("corpus") or {}
    enc = m.get("encoder") or {}
    dense = m.get("dense") or {}
    rows = [
        ("path", str(path)),
        ("format version", str(m.get("format_version"))),
        ("created", f"{m.get('created_at')} (medrwr {m.get('medrwr_version')}, {m.get('build_seconds')}s)"),
        ("documents", str(m.get("doc_count"))),
        ("sources", ", ".join(f"{k or '-'}: {v}" for k, v in (corpus.get("sources") or {}).items())),
        ("corpus sha256", str(corpus.get("sha256"))),
        ("modes", ", ".join(m.get("modes", []))),
        ("bm25", ", ".join(f"{k}={v}" for k, v in (m.get("bm25") or {}).items())),
        ("encoder", f"{enc.get('name')} ({enc.get('spec')!r}, dim {enc.get('dim')})"
         if enc else "none (BM25 only)"),
        ("faiss", ", ".join(f"{k}={v}" for k, v in dense.items() if v is not None) if dense else "none"),
        ("files", f"{len(files)} files, {sum(f.get('size', 0) for f in files.values()) / 1e6:.1f} MB"),
        ("checksums", "ok (every byte hashed)" if verify else "ok (size + sha256; big files: ends only)"),
    ]
    known = {"kind", "doc_count", "corpus", "modes", "bm25", "encoder", "dense", "build_config",
             "build_seconds", "format_version", "created_at", "medrwr_version", "files", "checksum_policy"}
    for key, value in m.items():
        if key not in known:
            rows.append((key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)))
    table = Table(title=f"index {path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


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
    """Search the knowledge base (an index, the default KB, or a server with --set retrieval.url=URL)."""
    import json

    from medrwr.retrieval.base import SEARCH_MODES

    cfg = _config(config, overrides)
    rcfg = cfg.retrieval
    if mode is not None and mode not in SEARCH_MODES:
        raise CLIError(f"unknown mode {mode!r}; choose one of {', '.join(SEARCH_MODES)}")
    k = rcfg.k if k is None else k
    if k < 1:
        raise CLIError(f"-k must be >= 1, got {k}")
    if index:
        rcfg.index = index
    from medrwr.retrieval.open import open_retriever

    try:
        with open_retriever(cfg) as retriever:
            results = retriever.search(query, k=k, mode=mode)
            mode = mode or retriever.default_mode
            about = retriever.describe()
    except (ValueError, OSError, ImportError) as exc:
        raise CLIError(str(exc)) from None
    path = about.get("path") or about.get("url")
    if as_json:
        payload = {
            "index": str(path),
            "mode": mode,
            "k": k,
            "results": [{"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in zip(query, results)],
        }
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    from rich.table import Table

    for q, hits in zip(query, results):
        table = Table(title=f"{q!r}  ({mode}, k={k}, {about['doc_count']} documents)", expand=True)
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("score", justify="right", no_wrap=True)
        table.add_column("source", no_wrap=True)
        table.add_column("title", overflow="fold", ratio=1)
        table.add_column("text", overflow="fold", ratio=3)
        for rank, h in enumerate(hits, 1):
            snippet = h.text if len(h.text) <= 240 else h.text[:240].rsplit(" ", 1)[0] + " ..."
            table.add_row(str(rank), f"{h.score:.4f}", h.source, h.title, snippet)
        if not hits:
            table.add_row("-", "-", "-", "-", "no matching documents")
        console.print(table)


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
    import dataclasses
    import os
    from pathlib import Path

    cfg = _config(config, overrides)
    changes = {k: v for k, v in (("host", host), ("port", port), ("api_key_env", api_key_env)) if v is not None}
    try:
        cfg.server = dataclasses.replace(cfg.server, **changes)
    except ConfigError as exc:
        raise CLIError(f"bad option: {exc}") from None
    if index:
        cfg.retrieval.index = index
    index_path = cfg.retrieval.index
    if index_path is not None and not cfg.retrieval.url and not Path(index_path).expanduser().exists():
        raise CLIError(
            f"index directory {index_path} does not exist; build one with "
            f"`medrwr index build --corpus PATH --out {index_path}` (or omit --index for the shipped KB)"
        )
    if ray and shards < 1:
        raise CLIError(f"--shards must be >= 1, got {shards}")
    if cfg.server.api_key_env and not os.environ.get(cfg.server.api_key_env):
        raise CLIError(f"--api-key-env {cfg.server.api_key_env}: that environment variable is empty or unset")
    from medrwr.errors import PortInUse
    from medrwr.retrieval.service.server import serve

    def ready(url: str) -> None:
        auth = f", bearer key from ${cfg.server.api_key_env}" if cfg.server.api_key_env else ""
        err_console.print(
            f"[green]retrieval service[/green] at [bold]{url}[/bold] (POST /v1/search, /v1/search/image, /queries; "
            f"GET /healthz, /metrics{auth}); Ctrl-C stops it"
        )

    log_level = "info" if logging.getLogger().getEffectiveLevel() <= logging.INFO else "warning"
    try:
        serve(cfg, shards=shards if ray else 1, ray=ray, on_ready=ready, log_level=log_level)
    except PortInUse as exc:
        raise CLIError(str(exc)) from None
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise CLIError(str(exc)) from None


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
    from pathlib import Path

    cfg = _config(config, overrides)
    if model:
        cfg.model.name = model
    if index:
        cfg.retrieval.index = index
    if cdir:
        cfg.cdir.enabled = True
    if image_index:
        cfg.cdir.image_index = image_index
    images = list(image or [])
    for p in images:
        if not Path(p).is_file():
            raise CLIError(f"image file {p} does not exist")
    from medrwr.rollout.backends import BackendError, policy_supports_images

    if images and cfg.model.backend == "hf" and policy_supports_images(cfg.model.name) is False:
        which = "the default policy (SmolLM2-135M-Instruct)" if cfg.model.name is None else cfg.model.name
        raise CLIError(
            f"--image needs a vision-language model, and {which} is text-only. Pass one with "
            "--model Qwen/Qwen2.5-VL-7B-Instruct (or the released Luxuriant16/Med-RwR, or a local Qwen2.5-VL folder)."
        )
    from medrwr.rollout.engine import RolloutRequest, engine_from_config
    from medrwr.rollout.trace import render_trace

    try:
        with err_console.status("loading the policy and the retriever…"):
            engine = engine_from_config(cfg)
        if images and not engine.backend.supports_images:
            raise CLIError(
                f"--image needs a vision-language model; {cfg.model.name} is text-only. "
                "Pass one with --model Qwen/Qwen2.5-VL-7B-Instruct or a local Qwen2.5-VL folder."
            )
        with err_console.status("reasoning…"):
            trace = engine.run([RolloutRequest(question=question, options=list(option) if option else None,
                                               images=images)])[0]
    except (BackendError, ValueError, OSError, ImportError) as exc:
        raise CLIError(str(exc)) from None
    if as_json:
        typer.echo(trace.to_json())
    else:
        console.print(render_trace(trace))


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
    except MedRwRError as exc:  # every deliberate error: one line, the class's exit code, no traceback
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except SystemExit as exc:  # click exits with the command's code (usage errors: 2)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
