"""Terminal output of the commands: one console setting and one format for error and note lines.

User text (file names, messages that quote them) is printed as it is: rich would otherwise read
`[...]` in it as markup and `:name:` as an emoji code, so `a[b].png` would lose `[b]`."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

__all__ = ["escape", "make_console", "print_error", "print_note"]


def make_console(**kwargs) -> Console:
    """A rich console that reads no :emoji: codes and highlights nothing on its own."""
    return Console(emoji=False, highlight=False, **kwargs)


def print_error(console: Console, message: object) -> None:
    """`error: MESSAGE`, the message shown as it is."""
    console.print(f"[red]error:[/] {escape(str(message))}")


def print_note(console: Console, message: object) -> None:
    """`note: MESSAGE`, the message shown as it is."""
    console.print(f"[yellow]note:[/] {escape(str(message))}")
