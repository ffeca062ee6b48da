"""``medrwr demo``: the default knowledge base, the demo image index and the default policy behind the chat API
and its web page, on loopback, in one command."""

from __future__ import annotations

from typing import List, Optional

import typer

from medrwr.cli._shared import ConfigOpt, SetOpt, _config, err_console


def demo(
    port: Optional[int] = typer.Option(None, "--port", help="Port (default 8322)."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Only print the URL; do not open a browser."),
    model: Optional[str] = typer.Option(None, "--model", help="Hub id or local path of the policy (default: packaged SmolLM2)."),
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Open the web demo: ask a question, watch the model search, read and answer (builds the default KB on first use)."""
    from medrwr.cli.serve import apply_api_options, run_api

    cfg = _config(config, overrides)
    cfg.cdir.image_index = cfg.cdir.image_index or "demo"  # the shipped demo image index, built on first use
    apply_api_options(cfg, model=model, port=port, host="127.0.0.1")

    def opened(url: str) -> None:
        err_console.print(f"open [bold]{url}/[/bold] in a browser", highlight=False)
        if not no_browser:
            import webbrowser

            try:
                webbrowser.open(url + "/")
            except Exception:  # noqa: BLE001 - no browser is fine: the URL is printed
                pass

    # the default policy is text-only: the page's images are then ignored with a warning, not refused
    run_api(cfg, "MedRwR demo", on_url=opened, drop_images=True)
