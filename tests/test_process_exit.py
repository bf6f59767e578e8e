"""megamoe/process_exit.py: `exit_now` keeps what a normal exit does that matters (exit code, atexit
handlers, buffered output, running non-daemon threads), checked in fresh processes against the same
script ending with `sys.exit`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit, sys, threading, time
from megamoe.process_exit import exit_now
out = sys.argv[1]
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
if sys.argv[3] == "thread":  # a non-daemon thread still working when main ends
    threading.Thread(target=lambda: (time.sleep(0.5), open(out + ".thread", "w").write("done"))).start()
sys.stdout.write("buffered, no newline")  # stdout is a pipe: block-buffered until flushed
{exit}(int(sys.argv[2]))
"""


@pytest.mark.parametrize("thread", ["none", "thread"])
@pytest.mark.parametrize("exit_call", ["exit_now", "sys.exit"])
def test_exit_now_keeps_what_sys_exit_keeps(tmp_path, exit_call, thread):
    out = tmp_path / "probe"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(exit=exit_call), str(out), "3", thread],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newline"
    assert (tmp_path / "probe.atexit").read_text() == "ran"
    if thread == "thread":
        assert (tmp_path / "probe.thread").read_text() == "done"
