"""The errors a user sees: bad input (naming the file, row and field, or the config key) and a run that cannot go on.

Commands end on either with one line on stderr (`error: ...`) and exit status 1 (`compose.entry_point`).
"""

from __future__ import annotations

from collections.abc import Iterable


class InputError(ValueError):
    """Bad user input: the message names the file, row and field (or the config key) at fault."""


class RunError(RuntimeError):
    """A job that cannot go on (a worker group failed, a loss or gradient is not finite); finished work stands."""


class RowError(InputError):
    """A bad row of a corpus or dataset file: names the file (or hub dataset), the row and the field."""

    def __init__(self, path, row: int | None, field: str, problem: str):
        where = f"{path}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}, field '{field}': {problem}")


def check_choice(key: str, value, choices: Iterable) -> None:
    """An InputError naming `key`, its `value` and the `choices`, unless `value` is one of them."""
    choices = list(choices)
    if value not in choices:
        raise InputError(f"{key}={value} is not one of: {', '.join(map(str, choices))}")
