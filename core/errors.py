"""The core's error family.

Every error the core raises on purpose derives from :class:`CoreError` and carries a stable,
machine-readable ``code`` (and, where one field is at fault, ``param``). The service maps these to HTTP
in one place; the CLI prints them without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class CoreError(Exception):
    """Base of every deliberate core error."""

    code: str = "core_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidSpec(CoreError, ValueError):
    """A job or training setting is invalid (bad value, unknown model, impossible privacy target)."""

    code = "invalid_spec"


class BudgetExceeded(CoreError):
    """A job would spend more privacy budget than its dataset has left."""

    code = "budget_exceeded"


class Cancelled(CoreError):
    """The progress callback asked the pipeline to stop."""

    code = "cancelled"


@dataclass(frozen=True)
class DataIssue:
    """One problem found in a dataset file; ``line`` is 1-based (the header of a CSV/TSV is line 1)."""

    line: int | None
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        what = f" ({self.field})" if self.field else ""
        return f"{where}{what}: {self.message}"


class DatasetFormatError(CoreError, ValueError):
    """A dataset file is malformed. ``issues`` lists every problem found, not just the first."""

    code = "invalid_dataset"

    def __init__(self, issues: list[DataIssue], *, param: str | None = "file") -> None:
        shown = "; ".join(str(i) for i in issues[:20])
        more = f" (and {len(issues) - 20} more)" if len(issues) > 20 else ""
        super().__init__(f"{len(issues)} problem(s) in dataset: {shown}{more}", param=param)
        self.issues = issues
