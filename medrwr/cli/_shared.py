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
