"""A small pool of worker processes that runs decode jobs under a per-job time limit.

Why processes and not threads: decord can hang inside C code while holding the GIL (decord issues
304, 373), so no thread of the hung process, a watchdog included, ever runs again. Only another
process can notice the hang and end it. A job past its limit gets its worker SIGKILLed (a hung
decoder reacts to nothing else reliably) and replaced; a worker that dies (segfault, OOM kill) is
replaced too. Either way the job raises `SampleError`, which the loader counts and skips.

Workers are fresh interpreters started with `subprocess` (`python -c ...`), talking over a socket
pair with multiprocessing's `Connection` framing, rather than `multiprocessing.Process`:
  - no fork of a parent that runs torch and decoder threads (a forked threaded process can deadlock);
  - unlike 'spawn'/'forkserver', the parent's `__main__` (a training script) is not re-imported in
    every worker, so no `if __name__ == "__main__"` requirement and no heavy imports per worker;
  - a daemonic process (a torch DataLoader worker) may not start `multiprocessing` children, but
    it may start subprocesses, so the pool also works inside DataLoader workers.
A worker imports its preload modules, then reports ready; its start-up is not charged to any job.
Workers exit when the parent's end of the socket closes, so they do not outlive the parent.
POSIX only (it passes a file descriptor to the child).
"""

from __future__ import annotations

import atexit
import importlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import traceback
import weakref
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait

from megamoe.data.errors import DECODE_TIMEOUT, WORKER_DIED, SampleError

STARTUP_TIMEOUT_S = 120.0  # importing torch + decord on a loaded machine can take tens of seconds
_live_pools: weakref.WeakSet[DecodePool] = weakref.WeakSet()


def _child_main(fd: int, preload: str) -> None:
    """Loop of one worker: receive (fn, args), send back ('ok', result) or an error, until None/EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; we exit on EOF
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # preemption notice: the training process handles it
    conn = Connection(fd)
    sys.path[:] = conn.recv()  # the parent's, so its modules (and test modules) unpickle here
    try:
        import torch

        torch.set_num_threads(1)  # parallelism comes from the pool's processes, not intra-op threads
    except ImportError:
        pass
    for name in filter(None, preload.split(",")):
        module = importlib.import_module(name)
        if hasattr(module, "_preload"):
            module._preload()
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        fn, args = job
        try:
            reply = ("ok", fn(*args))
        except SampleError as e:
            reply = ("sample_error", e)
        except BaseException as e:  # a bug, not bad data: the parent re-raises it with this traceback
            reply = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        try:
            conn.send(reply)
        except Exception as e:  # e.g. an unpicklable result
            conn.send(("error", f"could not send the result of {fn!r} back: {type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, preload: tuple[str, ...]):
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        code = f"from megamoe.data.decode_pool import _child_main; _child_main({fd}, {','.join(preload)!r})"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL)
        child_sock.close()  # only the child holds its end now: its death reads as EOF here
        self.conn = Connection(parent_sock.detach())
        self.jobs = 0
        try:
            self.conn.send(sys.path)
            if not self.conn.poll(STARTUP_TIMEOUT_S) or self.conn.recv() != "ready":
                raise RuntimeError(f"decode worker did not start within {STARTUP_TIMEOUT_S:g} s")
        except (EOFError, OSError) as e:
            self.kill()
            raise RuntimeError(
                f"decode worker failed to start (exit code {self.process.poll()}); its stderr above says why"
            ) from e
        except BaseException:
            self.kill()
            raise

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 2.0) -> None:
        try:
            if self.alive:
                self.conn.send(None)
                self.process.wait(timeout)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        if self.alive:
            self.process.kill()  # SIGKILL: a decoder stuck in C holding the GIL handles nothing else
        self.process.wait()
        self.conn.close()


class DecodePool:
    """`num_workers` processes; `run(fn, *args)` runs `fn(*args)` in one of them within `timeout_s`.

    `fn` and its arguments must be picklable (module-level functions). `run` is thread-safe and
    blocks until a worker is free; `map` keeps all workers busy from a thread pool. Workers start
    on first use and are recycled after `max_jobs_per_worker` jobs, bounding what a leaking
    decoder can accumulate. Counters of jobs, timeouts, deaths and restarts are in `stats`.
    """

    def __init__(
        self,
        num_workers: int = 1,
        timeout_s: float = 30.0,
        max_jobs_per_worker: int | None = 5000,
        preload: tuple[str, ...] = ("megamoe.data.video",),
    ):
        if num_workers < 1:
            raise ValueError(f"DecodePool needs num_workers >= 1, got {num_workers}")
        if timeout_s is None or timeout_s <= 0:
            raise ValueError(f"DecodePool needs a positive timeout_s, got {timeout_s}; decode inline for none")
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self.max_jobs_per_worker, self.preload = max_jobs_per_worker, tuple(preload)
        self._idle: queue.Queue = queue.Queue()
        for _ in range(num_workers):
            self._idle.put(None)  # an empty slot; its worker starts on first use
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.stats = {"jobs": 0, "timeouts": 0, "worker_deaths": 0, "restarts": 0}
        _live_pools.add(self)

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _start(self) -> _Worker:
        worker = _Worker(self.preload)
        with self._lock:
            self._all.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)

    def run(self, fn, *args, timeout_s: float | None = None):
        """fn(*args) in a worker; SampleError(DECODE_TIMEOUT / WORKER_DIED) when it hangs or dies."""
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        limit = self.timeout_s if timeout_s is None else timeout_s
        name = getattr(fn, "__name__", repr(fn))
        worker = self._idle.get()
        try:
            if worker is not None and (
                not worker.alive or (self.max_jobs_per_worker and worker.jobs >= self.max_jobs_per_worker)
            ):
                self._discard(worker)
                worker = None
                self._count("restarts")
            if worker is None:
                worker = self._start()
            self._count("jobs")
            worker.jobs += 1
            try:
                worker.conn.send((fn, args))
                timed_out = not wait([worker.conn], limit)
                reply = None if timed_out else worker.conn.recv()
            except (EOFError, OSError):  # the worker's end closed: it died
                timed_out, reply = False, None
            if reply is None:
                self._discard(worker)
                worker = None  # the slot goes back empty; the next job starts a fresh worker
                self._count("timeouts" if timed_out else "worker_deaths")
                if timed_out:
                    raise SampleError(DECODE_TIMEOUT, detail=f"{name} ran past {limit:g} s; its worker was killed")
                raise SampleError(WORKER_DIED, detail=f"the decode worker died running {name}")
        finally:
            self._idle.put(worker)
        status, payload = reply
        if status == "ok":
            return payload
        if status == "sample_error":
            raise payload
        raise RuntimeError(f"decode job {name} failed in its worker: {payload}")

    def map(self, fn, args_list, timeout_s: float | None = None) -> list:
        """[fn(*args) for args in args_list] across all workers; a SampleError is returned in its slot."""

        def one(args):
            try:
                return self.run(fn, *args, timeout_s=timeout_s)
            except SampleError as e:
                return e

        with ThreadPoolExecutor(self.num_workers) as executor:
            return list(executor.map(one, args_list))

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._all if w.alive]

    def close(self) -> None:
        """Stop every worker (politely, then SIGKILL). Idempotent; also runs at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.stop()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_live_pools):
        pool.close()
