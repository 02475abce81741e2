"""The `circatt` command line: one Typer app; each command lives in its own module and registers itself."""

from __future__ import annotations

import importlib
import warnings

import typer

from . import __version__

app = typer.Typer(
    name="circatt",
    help="Denoise images with GroupCDL on circulant-sparse attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that define `register(app)`; one line per command group.
COMMAND_MODULES = [
    "circatt_cli.info",
    "circatt_cli.bench",
    "circatt_cli.denoise",
    "circatt_cli.inspect",
    "circatt_cli.train",
    "circatt_cli.evaluate",
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"circatt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Denoise images with GroupCDL on circulant-sparse attention."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the user reads it: its message, without the source file and code line that raised it."""
    return f"warning: {message}\n"


def main() -> None:
    """Console-script entry point."""
    warnings.formatwarning = _one_line_warning
    app()


if __name__ == "__main__":
    main()
