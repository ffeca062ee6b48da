"""``medrwr serve``: the retrieval service (and, when built, the OpenAI-compatible API)."""

from __future__ import annotations

from typing import List, Optional

import logging

import typer

from medrwr.cli._shared import ConfigOpt, SetOpt, _config, _not_built, err_console
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
def serve_api() -> None:
    """Run the OpenAI-compatible API over the whole loop (not available in this version)."""
    _not_built("serve api", "serve the reasoning-with-retrieval loop as an OpenAI-compatible chat API "
               "(default port 8322)")

