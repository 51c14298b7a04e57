"""One error hierarchy for the whole kit.

Every error is a HangkitError; subclasses also inherit the standard exception they refine, so
callers that already catch TimeoutError or ValueError keep working. The CLI turns any HangkitError
into one line and an exit code (see hangkit.cli).
"""

from __future__ import annotations


class HangkitError(Exception):
    """Base class. `hint` is a one-line suggestion of what to do about it."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        text = str(self)
        return f"{text} ({self.hint})" if self.hint else text


class UsageError(HangkitError, ValueError):
    """Bad input from the user: a bad option value, a missing command, an unknown name."""

    exit_code = 2


class CaptureError(HangkitError, RuntimeError):
    """Evidence could not be captured from a process (it is noted in the report, not raised)."""


# The checks of values a user gives. Library functions name their parameter ("timeout"), the
# CLI its option ("--timeout"): one rule, each layer naming its own input.

def check_positive_seconds(name: str, value: float) -> float:
    if not (value > 0 and value != float("inf")):
        raise UsageError(f"{name} must be a positive number of seconds, got {value:g}")
    return value


def check_seconds_or_zero(name: str, value: float) -> float:
    if not (value >= 0 and value != float("inf")):
        raise UsageError(f"{name} must be zero or more seconds, got {value:g}")
    return value


def check_at_least(name: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}")
    return value
