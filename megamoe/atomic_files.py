"""Writing a file so that its name holds either the old content or the whole new one, never a part.

The content goes to a temporary file in the same directory (a rename is atomic only within one
filesystem), is flushed to disk, and is then renamed over the target. A crash, a full disk or a
kill at any moment leaves the previous file, or none, under the name, and at worst a hidden
`.tmp-*` file beside it; an error on the way removes the temporary file and is raised.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` to write a temporary file, then rename it to `path` once it is on disk."""
    path = os.fspath(path)
    fd, tmp = _temporary_beside(path)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)  # before the rename: otherwise a power loss may leave the new name with no data
        # mkstemp makes the file private (0600); give it the mode any new file gets (0644 under umask 022)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`write_atomic` for a text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


class AtomicFile:
    """A binary file written over several calls and published under `path` only by `commit()`.

    For writes that span other work (a safetensors file streamed tensor by tensor between
    collectives, parallel/sharded_weights.py), where `write_atomic`'s one callback does not fit.
    `file` is the open temporary file; `abort()` closes and removes it, leaving `path` as it was.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        fd, self.tmp = _temporary_beside(self.path)
        self.file = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o666 & ~_umask())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def _temporary_beside(path: str) -> tuple[int, str]:
    """(descriptor, name) of a new hidden file in `path`'s directory (a rename stays on one filesystem)."""
    return tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.basename(path))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)  # fsync flushes the file, whichever descriptor names it
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
