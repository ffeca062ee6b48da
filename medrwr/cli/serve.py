"""``medrwr serve``: the retrieval service and the OpenAI-compatible API over the whole loop."""

from __future__ import annotations

import logging
from typing import List, Optional

import typer

from medrwr.cli._shared import ConfigOpt, SetOpt, _config, apply_policy_flags, err_console
from medrwr.errors import CLIError, ConfigError

serve_app = typer.Typer(help="Run the retrieval service or the OpenAI-compatible API.", no_args_is_help=True)


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
def serve_api(
    model: Optional[str] = typer.Option(None, "--model", help="Hub id or local path of the policy (default: packaged SmolLM2)."),
    index: Optional[str] = typer.Option(None, "--index", help="Index directory (default: shipped KB)."),
    image_index: Optional[str] = typer.Option(None, "--image-index", help="Image index for CDIR (a folder or 'demo')."),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default 8322)."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Env var holding a bearer token."),
    allow_file_root: Optional[str] = typer.Option(None, "--allow-file-root", help="Serve file:// images under DIR."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Fetch http(s) image URLs."),
    cdir: bool = typer.Option(False, "--cdir", help="CDIR for every request (else per request: medrwr_cdir)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (model.threads)."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Run the OpenAI-compatible chat API over the whole loop (docs/serving.md)."""
    cfg = _config(config, overrides)
    apply_api_options(cfg, model=model, index=index, image_index=image_index, host=host, port=port,
                      api_key_env=api_key_env, allow_file_root=allow_file_root,
                      allow_remote_images=allow_remote_images, cdir=cdir, threads=threads)
    run_api(cfg, "chat API")


def apply_api_options(cfg, *, model=None, index=None, image_index=None, host=None, port=None, api_key_env=None,
                      allow_file_root=None, allow_remote_images=False, cdir=False, threads=None) -> None:
    """Put the command-line options on the config and check them before anything loads (shared with demo)."""
    import dataclasses
    import os
    from pathlib import Path

    changes = {k: v for k, v in (("host", host), ("api_port", port), ("api_key_env", api_key_env),
                                 ("allow_file_root", allow_file_root)) if v is not None}
    if allow_remote_images:
        changes["allow_remote_images"] = True
    try:
        cfg.server = dataclasses.replace(cfg.server, **changes)
    except ConfigError as exc:
        raise CLIError(f"bad option: {exc}") from None
    apply_policy_flags(cfg, model=model, threads=threads, index=index, image_index=image_index)
    if cdir:
        cfg.cdir.enabled = True
        cfg.cdir.image_index = cfg.cdir.image_index or "demo"
    if cfg.retrieval.index and not cfg.retrieval.url and not Path(cfg.retrieval.index).expanduser().exists():
        raise CLIError(f"index directory {cfg.retrieval.index} does not exist; build one with `medrwr index build "
                       f"--corpus PATH --out {cfg.retrieval.index}` (or omit --index for the shipped KB)")
    root = cfg.server.allow_file_root
    if root and not Path(root).expanduser().is_dir():
        raise CLIError(f"--allow-file-root {root} is not a directory")
    if cfg.server.api_key_env and not os.environ.get(cfg.server.api_key_env):
        raise CLIError(f"--api-key-env {cfg.server.api_key_env}: that environment variable is empty or unset")


def run_api(cfg, what: str, on_url=None, drop_images: bool = False) -> None:
    """Load the engine and serve until Ctrl-C; print the URL once the port is bound."""
    from medrwr.errors import BackendError, PortInUse
    from medrwr.serve.api.server import serve_api as serve

    def ready(url: str) -> None:
        auth = f", bearer key from ${cfg.server.api_key_env}" if cfg.server.api_key_env else ""
        err_console.print(f"[green]{what}[/green] at [bold]{url}[/bold] (POST /v1/chat/completions; GET /v1/models, "
                          f"/healthz, /metrics, / web page{auth}); Ctrl-C stops it")
        if on_url is not None:
            on_url(url)

    err_console.print("[dim]loading the policy and the retriever…[/dim]", highlight=False)
    log_level = "info" if logging.getLogger().getEffectiveLevel() <= logging.INFO else "warning"
    try:
        serve(cfg, on_ready=ready, log_level=log_level, drop_images=drop_images)
    except PortInUse as exc:
        raise CLIError(str(exc)) from None
    except (FileNotFoundError, ValueError, ImportError, OSError, BackendError) as exc:
        raise CLIError(str(exc)) from None
