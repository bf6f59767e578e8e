"""Ending a finished process without the interpreter's teardown of torch, DeepSpeed and megatron-core.

After `main` returns, CPython finalizes every module and object it still holds; with torch,
DeepSpeed and megatron-core imported that takes about 1.3 s of CPU (measured on a 2-core CPU
machine), on every rank at every exit, and writes nothing a finished run needs. `exit_now` does what
a normal exit does that matters (atexit handlers, which also join or end multiprocessing children;
flushing stdout and stderr), then ends the process with `os._exit`. Files still open are not
flushed, so it serves runs that closed their own: launcher/pretrain.py after a run that returned 0
(its loader and logs closed), not after a refusal.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Exit with `code`: atexit handlers, flushed stdout and stderr, then `os._exit(code)`.

    While a non-daemon thread other than the main thread still runs, it exits as `sys.exit` does
    (which waits for such threads), so no unfinished work is cut off.
    """
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # CPython's own call at exit; undocumented but stable since 3.0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing left to write to
            pass
    os._exit(code)
