"""User-facing errors.

Every failure that a user can cause (a bad file, an unknown config key, a missing package) is a
`KarmaError`: the CLI prints its message as one line and exits with status 2, never a traceback.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class KarmaError(Exception):
    """An error caused by input or environment, whose message alone tells the user what to fix."""


class ConfigError(KarmaError):
    """A config file, environment variable or CLI override that does not fit the schema."""


class DataValidationError(KarmaError):
    """Input data that breaks the data contract; the message names the file, column and line."""

    def __init__(self, source: str, message: str, column: str | None = None, line: int | None = None):
        self.source = source
        self.column = column
        self.line = line
        where = source
        if column is not None:
            where += f", column '{column}'"
        if line is not None:
            where += f", line {line}"
        super().__init__(f"{where}: {message}")
