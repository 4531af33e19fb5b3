"""User-facing errors.

Every problem caused by bad input is raised as :class:`ConicQPError` with a one-line message that
says what is wrong and what to do. The CLI prints the message (no traceback) and exits non-zero.
"""

from __future__ import annotations


class ConicQPError(Exception):
    """Bad input or an unusable environment; the message is shown to the user as-is."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        super().__init__(message)
