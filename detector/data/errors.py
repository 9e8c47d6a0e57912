"""The one error type for bad datasets: `DataError`.

Anything wrong with the user's data or data config (a missing folder, a malformed annotation
file, an unreadable image, ...) raises `DataError` with one line saying what is wrong and how to
fix it. It is a `detector.errors.UserError` (hence a ValueError), which the CLIs turn into that
line on stderr and exit code 2.

A `DataError` raised inside a DataLoader worker process reaches the main process as a
`DataError` again, still one line: torch re-raises worker exceptions as
``exc_type(message=<traceback text>)`` when the class has a ``message`` attribute, and the
constructor below keeps only the original line from that text.
"""

from __future__ import annotations

from detector.errors import UserError

_MARKER = "DataError: "


def _original_line(worker_text: str) -> str:
    """The message of the last ``...DataError: <message>`` line in a worker traceback text."""
    for line in reversed(worker_text.splitlines()):
        head, sep, tail = line.partition(_MARKER)
        if sep and (head == "" or head.endswith(".")):
            return tail
    return worker_text


class DataError(UserError):
    """Bad input data or data config; the message is one line: what is wrong and how to fix it."""

    message: str = "bad input data"  # class default; torch's worker re-raise keys on this name

    def __init__(self, *args: object, message: str | None = None) -> None:
        if message is not None:  # re-raised from a DataLoader worker: keep the original line
            args = (_original_line(message),)
        super().__init__(*args)
        self.message = str(args[0]) if args else type(self).message
