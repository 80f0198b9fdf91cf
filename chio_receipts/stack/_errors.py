"""Errors of the local stack.

    StackError            a component could not be set up, started or reached
    └── PortBusyError     a fixed port is already taken

Each carries the component, a one-line cause, what to do, and the last lines of the
component's log, so the CLI and the test fixtures can print one clear message instead of a
stack trace.
"""

from __future__ import annotations

__all__ = ["PortBusyError", "StackError"]


class StackError(Exception):
    """A local-stack component failed; ``str()`` is a complete, user-facing message."""

    def __init__(self, component: str, cause: str, hint: str = "", log_tail: str = "") -> None:
        self.component = component
        self.cause = cause
        self.hint = hint
        self.log_tail = log_tail
        super().__init__(self.render())

    def render(self) -> str:
        """``component: cause`` + the hint + the log tail, as printed to a user."""
        text = f"{self.component}: {self.cause}"
        if self.hint:
            text += f"\n  what to do: {self.hint}"
        if self.log_tail:
            tail = "\n".join(f"    {line}" for line in self.log_tail.splitlines())
            text += f"\n  last log lines:\n{tail}"
        return text


class PortBusyError(StackError):
    """A port given explicitly is in use."""
