"""Errors a user can cause. Each carries one sentence naming the thing and the fix; the CLI prints it without a
traceback and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us (config, data, files, flags), as opposed to a bug in rlhfkit."""


class ConfigError(UserError):
    """A config file or flag names an unknown key or holds a value of the wrong type."""


class DataError(UserError):
    """A data row is missing a field, has the wrong type, or cannot be used as it is."""

    def __init__(self, path: str, row: int | None, field: str | None, reason: str):
        self.path, self.row, self.field, self.reason = path, row, field, reason
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {reason}")


class TrainingDiverged(UserError):
    """A loss or metric became NaN or infinite."""
