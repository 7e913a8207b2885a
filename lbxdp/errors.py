"""The one exception the CLI turns into a clean, one-line error with a hint and an exit code."""

from __future__ import annotations


class LbxError(Exception):
    """What went wrong, in the user's terms, and what to do about it."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message, self.hint, self.exit_code = message, hint, exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"
