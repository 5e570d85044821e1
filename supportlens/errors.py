"""Errors a person can cause, and how they are told."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: shown as a one-line message and a hint, never a traceback."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
