"""The stop flag that SIGTERM and SIGUSR1 (preemption) raise; megamoe/train/resilience.py says how
the ranks agree on it.

Apart from resilience.py, and free of heavy imports, so that launcher/pretrain.py installs the
handlers first thing, before seconds of importing torch, DeepSpeed and megatron-core: a signal in
that window would otherwise kill the rank with the default action. torchrun sends one to every
other rank when a rank exits, e.g. after refusing bad input, and the others should refuse it too.
A flag still raised when the launcher's input checks are done ends the rank there, before it waits
for the other ranks (launcher/pretrain.py `stop_before_start_up`).
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Remembers that SIGTERM or SIGUSR1 arrived; the training loop stops after the current step.

    The handler only sets a flag: a signal can arrive inside a collective or a checkpoint write,
    and stopping there would leave the other ranks waiting or the checkpoint half written.
    """

    def __init__(self):
        self.received: str | None = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> StopSignals:
        """Idempotent: the launcher installs it before start-up (which can take minutes), the loop again."""
        if threading.current_thread() is threading.main_thread() and not self._installed:  # handlers: main thread only
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
            self._installed = True
        return self

    @property
    def requested(self) -> bool:
        return self.received is not None


STOP_REQUEST = StopSignals()
"""The process's one stop flag (a signal handler is process-wide)."""
