"""Errors a user can fix, as opposed to bugs.

A role raises a :class:`UserError` (or a subclass) with what went wrong and, where it is not
already in the message, what to do about it; the ``edgefl`` command catches it once and prints it
as one line, with no traceback, and exits with the error's code: 2 for a usage or configuration
error (the same command would fail again: systemd units stop restarting on it, see
``RestartPreventExitStatus=2``), 1 for a failure at run time (a broker that is down, a model
not yet installed: trying again later may work). Anything else that escapes is a bug and keeps
its traceback.
"""

from __future__ import annotations

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class UserError(Exception):
    """Something the user can fix: ``message`` says what, ``fix`` (optional) how."""

    exit_code: int = EXIT_RUNTIME
    fix: str | None = None

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        if fix is not None:
            self.fix = fix

    def line(self) -> str:
        """The message and its fix, as the command line prints it (one line, unless the message
        carries a log excerpt)."""
        text = str(self).rstrip(". ")
        return f"{text}; {self.fix}" if self.fix else text


class UsageError(UserError):
    """A command, option or configuration that cannot work as given (exit code 2)."""

    exit_code = EXIT_USAGE
