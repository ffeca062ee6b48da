"""What every ``medrwr`` sub-command shares: the consoles, the config options and the one-line errors."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console

from medrwr.config import Config, load_config
from medrwr.errors import CLIError, ConfigError

console = Console()
err_console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see configs/).")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set retrieval.k=5 (repeatable).")


def _config(config: Optional[str], overrides: Optional[List[str]]) -> Config:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        raise CLIError(f"config error: {exc}") from None


def apply_policy_flags(cfg: Config, *, model: str | None = None, threads: int | None = None,
                       index: str | None = None, image_index: str | None = None) -> None:
    """The flags ``ask``, ``serve api`` and ``eval run`` share, mapped onto their config keys in one place
    (a flag left out keeps the config's value)."""
    if model:
        cfg.model.name = model
    if threads is not None:
        cfg.model.threads = threads
    if index:
        cfg.retrieval.index = index
    if image_index:
        cfg.cdir.image_index = image_index
