"""One line from an exception, for the one-line error messages megamoe prints instead of a traceback.

Libraries (PyYAML, safetensors, numpy, torch.distributed.checkpoint) raise messages of many lines,
with context a user of megamoe does not need; the first line names the problem.
"""

from __future__ import annotations


def first_line(exc: BaseException, max_chars: int | None = None) -> str:
    """The first line of the exception's message, at most `max_chars` long; '' when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0][:max_chars] if lines else ""


def describe(exc: BaseException, max_chars: int | None = None) -> str:
    """'TypeName: first line', or the type's name alone for an exception without a message."""
    line = first_line(exc, max_chars)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
