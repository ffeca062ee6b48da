"""The ``medrwr`` command line (typer); ``main`` is the console-script entry point."""

from medrwr.cli.app import app, main

__all__ = ["app", "main"]
