"""Errors qdit raises. Each names where the problem is, what was expected, what was found and what to do."""

from __future__ import annotations


class QditError(Exception):
    """Base class of every error qdit raises on purpose."""


class CheckpointError(QditError):
    """A checkpoint cannot be read or does not match what its config promises."""

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        tensor: str | None = None,
        layer: str | None = None,
        expected: str | None = None,
        found: str | None = None,
        hint: str | None = None,
    ):
        self.problem = problem
        self.file = file
        self.tensor = tensor
        self.layer = layer
        self.expected = expected
        self.found = found
        self.hint = hint
        lines = [problem]
        for label, value in (
            ("file", file),
            ("tensor", tensor),
            ("layer", layer),
            ("expected", expected),
            ("found", found),
            ("what to do", hint),
        ):
            if value is not None:
                lines.append(f"  {label}: {value}")
        super().__init__("\n".join(lines))


class UnsupportedFormatError(CheckpointError):
    """The checkpoint is in a format or quant_algo qdit does not read."""


class BackendUnavailableError(QditError):
    """A kernel backend was requested that cannot run here."""
