"""The training data loader: several worker processes per rank, one deterministic stream, exact resume.

What each worker reads, and its resume state, is described in `megamoe/data/worker.py`. Here the
training process puts the workers' batches in one order: batch i of a rank comes from worker
i % W (round robin), so the sequence never depends on which worker is faster.

Every batch arrives with the state of its worker right after making it; that state is committed
only when the batch is handed to the training loop, so batches prefetched but not consumed never
advance `state_dict()` (a `LoaderState`).

`load_state_dict` restarts worker w at its saved state, so after a resume each rank sees exactly
the batches the uninterrupted run would have seen. At another data-parallel size (or worker
count, seed, shard count) the saved positions mean nothing: that is refused, unless the user
sets data.restart_stream_on_resume=true, which restarts at epoch 0 (samples may repeat).

Why plain multiprocessing and not torch's DataLoader: (1) raw-video workers decode through a
`DecodePool`, and DataLoader workers are daemonic, which may not start child processes; (2) each
worker writes to its own pipe whose write end only the worker holds, so a worker that dies,
even mid-message, gives the training process EOF instead of a hang, and just that worker is
restarted from its committed state (DataLoader would tear all workers down); (3) the state
travelling with each batch and the commit on consumption are the heart of it either way.
Workers are forked (cheap; they touch no accelerator) and are not daemonic; they exit when the
training process closes their pipe, and at interpreter exit.
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import signal
import sys
import traceback
import weakref
from collections import Counter
from typing import TypedDict

import torch

from megamoe.data.worker import DataError, StreamSpec, WorkerState, WorkerStream, fresh_state
from megamoe.error_messages import first_line

__all__ = ["DataError", "StreamStateError", "ShardLoader", "StreamSpec", "build_loader"]

STATE_VERSION = 2
MAX_RESTARTS_WITHOUT_PROGRESS = 3  # a worker that keeps dying at the same place is a bug, not bad luck


class StreamStateError(ValueError):
    """A saved data-stream position cannot be used by this run; the message names the fix."""


def _worker_main(spec: StreamSpec, worker: int, state: dict, conn, readers: list) -> None:
    """Body of one worker process: send (kind, batch, state) items until the pipe closes."""
    for reader in readers:  # forked copies of read ends (its own and its siblings'): while any is
        reader.close()  # open, a worker's writes never fail and it would outlive the training process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process; it stops us
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # preemption notice: the training process handles it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run atexit: close the decode pool
    torch.set_num_threads(1)
    stream = None
    try:
        stream = WorkerStream(spec, worker, state)
        for item in stream:
            conn.send_bytes(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # the training process closed our pipe: stop quietly
    except BaseException as exc:  # reported to the training process, which raises it
        try:
            conn.send_bytes(pickle.dumps(("error", type(exc).__name__, first_line(exc), traceback.format_exc())))
        except OSError:
            pass
    finally:
        if stream is not None:
            stream.close()
        conn.close()


def _stop_workers(procs: list) -> None:
    """Close pipes (workers then exit on their next send), then terminate what is left."""
    for _, conn in procs:
        conn.close()
    for proc, _ in procs:
        proc.join(timeout=0.5)
        if proc.is_alive():  # busy reading or decoding: it would notice only at its next send
            proc.terminate()
            proc.join(timeout=2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    procs.clear()


class LoaderState(TypedDict):
    """A rank's data-stream position (`ShardLoader.state_dict()`), saved in its checkpoint rank file.

    The settings it was saved under are kept so that a resume that cannot continue it is refused
    with the setting named (see `load_state_dict`)."""

    version: int
    """STATE_VERSION of the code that saved it."""
    format: str
    seed: int
    dp_rank: int
    dp_size: int
    num_workers: int
    num_shards: int
    next_worker: int
    """The worker whose batch comes next (batches are taken from workers in turn)."""
    worker_died: int
    """Loader workers replaced so far."""
    workers: list[WorkerState]
    """Each worker's committed state: the one after the last batch consumed from it."""


class ShardLoader:
    """Infinite iterator of batches for one data-parallel rank; see the module docstring.

    Batches are dicts of torch tensors: latent shards give 'latents' [B, C, F, H, W] and 'text'
    [B, L, D]; video shards give 'pixels' uint8 [B, F, H, W, 3] (scaled to [-1, 1] and encoded by
    `VideoToLatents` on the training device); both give 'caption', 'key' (lists) and 'bucket' [F, H, W].
    """

    def __init__(
        self,
        spec: StreamSpec,
        num_workers: int,
        max_failure_fraction: float = 0.05,
        min_samples_before_failure_check: int = 100,
        start_method: str = "fork",
    ):
        if spec.num_workers != max(1, num_workers):
            raise ValueError(f"spec.num_workers={spec.num_workers} must be max(1, num_workers={num_workers})")
        W = spec.num_workers
        check_shard_count(len(spec.shards), spec.dp_size, W)
        self.spec, self.num_workers = spec, num_workers
        self.max_failure_fraction = max_failure_fraction
        self.min_samples_before_failure_check = min_samples_before_failure_check
        self._ctx = multiprocessing.get_context(start_method)
        self._states = [fresh_state() for _ in range(W)]
        self._next_worker = 0
        self._worker_died = 0
        self._restarts = [0] * W
        self._procs: list = []  # [(process, connection)] per worker, when running in processes
        self._inline: WorkerStream | None = None
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs)

    # --- iteration -------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._procs and self._inline is None:
            self._start()
        while True:
            w = self._next_worker
            kind, batch, state = self._receive(w)
            self._states[w], self._restarts[w] = state, 0  # commit: this item is being consumed
            self._check_failures()
            if kind == "batch":
                self._next_worker = (w + 1) % self.spec.num_workers
                return _to_torch(batch)

    def _start(self) -> None:
        if self.num_workers == 0:
            self._inline = WorkerStream(self.spec, 0, copy.deepcopy(self._states[0]))
        else:
            for w in range(self.num_workers):
                self._procs.append(self._spawn(w))

    def _spawn(self, w: int):
        reader, writer = self._ctx.Pipe(duplex=False)
        readers = [reader] + [conn for _, conn in self._procs if not conn.closed]
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.spec, w, self._states[w], writer, readers),
            name=f"megamoe-loader-{self.spec.dp_rank}-{w}",
            daemon=False,
        )
        proc.start()
        writer.close()  # only the worker holds the write end: its death reads as EOF here, never a hang
        return proc, reader

    def _receive(self, w: int) -> tuple:
        if self._inline is not None:
            return next(self._inline)
        while True:
            proc, conn = self._procs[w]
            try:
                if not conn.poll(1.0):
                    if not proc.is_alive() and not conn.poll(0):
                        self._replace(w)
                    continue
                item = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError, pickle.UnpicklingError):
                self._replace(w)
                continue
            if item[0] == "error":
                _, name, detail, trace = item
                if name == "DataError":
                    raise DataError(detail)
                print(trace, file=sys.stderr, flush=True)
                raise RuntimeError(
                    f"data loader worker {w} of data-parallel rank {self.spec.dp_rank} failed: {name}: {detail}"
                )
            return item

    def _replace(self, w: int) -> None:
        """Worker w died: restart it from its last committed state (its lost batches are remade)."""
        proc, conn = self._procs[w]
        conn.close()
        proc.join(timeout=1.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        self._worker_died += 1
        self._restarts[w] += 1
        how = f"killed by signal {-proc.exitcode}" if (proc.exitcode or 0) < 0 else f"exit code {proc.exitcode}"
        if self._restarts[w] > MAX_RESTARTS_WITHOUT_PROGRESS:
            raise DataError(
                f"loader worker {w} of data-parallel rank {self.spec.dp_rank} died "
                f"{self._restarts[w]} times in a row without making a batch ({how}); "
                f"it fails at epoch {self._states[w]['epoch']} shard position {self._states[w]['shard_pos']}"
            )
        print(
            f"warning: data loader worker {w} (pid {proc.pid}) of data-parallel rank {self.spec.dp_rank} died "
            f"({how}); restarting it from its last consumed batch",
            file=sys.stderr,
            flush=True,
        )
        self._procs[w] = self._spawn(w)

    def close(self) -> None:
        _stop_workers(self._procs)
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def worker_pids(self) -> list[int]:
        return [proc.pid for proc, _ in self._procs]

    # --- bad data --------------------------------------------------------------------------

    def bad_data_counts(self) -> dict[str, int]:
        """Failed samples by cause over the consumed stream; 'worker_died' adds loader workers replaced."""
        counts = Counter()
        for state in self._states:
            counts.update(state["bad"])
        if self._worker_died:
            counts["worker_died"] += self._worker_died
        return dict(counts)

    def samples_seen(self) -> int:
        return sum(state["seen"] for state in self._states)

    def _check_failures(self) -> None:
        seen = self.samples_seen()
        failed = sum(sum(state["bad"].values()) for state in self._states)
        if seen < max(1, self.min_samples_before_failure_check) or failed <= self.max_failure_fraction * seen:
            return
        shards, causes = Counter(), Counter()
        for state in self._states:
            shards.update(state["bad_shards"])
            causes.update(state["bad"])
        worst = ", ".join(f"{path} ({n})" for path, n in shards.most_common(3))
        why = ", ".join(f"{cause} {n}" for cause, n in causes.most_common())
        raise DataError(
            f"{failed} of {seen} samples failed on data-parallel rank {self.spec.dp_rank} "
            f"({100 * failed / seen:.1f}% > data.max_failure_fraction={self.max_failure_fraction}: {why}); "
            f"worst shards: {worst}; fix or remove them, or raise data.max_failure_fraction"
        )

    # --- resume ----------------------------------------------------------------------------

    def state_dict(self) -> LoaderState:
        spec = self.spec
        return {
            "version": STATE_VERSION,
            "format": spec.format,
            "seed": spec.seed,
            "dp_rank": spec.dp_rank,
            "dp_size": spec.dp_size,
            "num_workers": spec.num_workers,
            "num_shards": len(spec.shards),
            "next_worker": self._next_worker,
            "worker_died": self._worker_died,
            "workers": copy.deepcopy(self._states),
        }

    def load_state_dict(self, state: LoaderState, restart: bool = False) -> None:
        """Continue from `state`; restart=True (data.restart_stream_on_resume) starts over at epoch 0."""
        spec = self.spec
        self.close()
        if restart:
            self._states = [fresh_state() for _ in range(spec.num_workers)]
            self._next_worker = self._worker_died = 0
            return
        fix = "set data.restart_stream_on_resume=true to restart the data stream (samples may repeat)"
        if state.get("version") != STATE_VERSION:
            raise StreamStateError(
                f"the saved data stream has state version {state.get('version')}, this code "
                f"reads {STATE_VERSION}; {fix}"
            )
        if state["dp_size"] != spec.dp_size:
            raise StreamStateError(
                f"the data stream was saved at data-parallel size {state['dp_size']}, this run "
                f"has {spec.dp_size}; its positions do not carry over: {fix}"
            )
        now = {
            "num_workers": spec.num_workers,
            "seed": spec.seed,
            "num_shards": len(spec.shards),
            "format": spec.format,
            "dp_rank": spec.dp_rank,
        }
        for name, value in now.items():
            if state[name] != value:
                key = {"num_workers": "data.num_workers", "seed": "data.seed", "format": "data.format"}.get(name, name)
                raise StreamStateError(
                    f"the data stream was saved with {key}={state[name]}, this run has {value}; set it back, or {fix}"
                )
        self._states = copy.deepcopy(state["workers"])
        self._next_worker, self._worker_died = state["next_worker"], state["worker_died"]


def _to_torch(batch: dict) -> dict:
    out = dict(batch)
    if "pixels" in batch:  # stays uint8 [B, F, H, W, 3]: VideoToLatents scales it on the device, after
        out["pixels"] = torch.from_numpy(batch["pixels"])  # a copy of a quarter of float32's bytes
    else:
        out["latents"] = torch.from_numpy(batch["latents"])
        out["text"] = torch.from_numpy(batch["text"])
    return out


def build_loader(cfg, dp_rank: int, dp_size: int, compression: tuple[int, int] = (4, 16)) -> ShardLoader:
    """The loader of a run (`Config`): latent shards, raw video shards, or the embedded synthetic data.

    `compression` is the video VAE's (temporal, spatial) downsampling; it sizes video buckets in tokens.
    """
    from megamoe.config import sequence_shards
    from megamoe.tools.synthetic_data import ensure_synthetic_dataset

    d, m = cfg.data, cfg.model
    # Every rank may generate the synthetic dataset concurrently: generation is atomic and deterministic.
    path = ensure_synthetic_dataset(d, m) if d.path is None else d.path
    fmt = "latent" if d.path is None else d.format
    shards = _resolve(path)
    spec = StreamSpec(
        shards=tuple(shards),
        format=fmt,
        seed=d.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=max(1, d.num_workers),
        micro_batch_size=d.micro_batch_size,
        tokens_per_batch=d.tokens_per_batch,
        buckets=tuple(tuple(b) for b in d.buckets),
        patch_size=tuple(m.patch_size),
        compression=tuple(compression),
        in_channels=m.in_channels,
        text_dim=m.text_dim,
        text_len=d.text_len,
        video_frames=d.video_frames,
        video_fps=d.video_fps,
        decode_timeout_s=d.decode_timeout_s,
        decoder=d.decoder,
        sequence_shards=sequence_shards(cfg.parallel)[0],
        rope_max_seq_len=m.rope_max_seq_len,
    )
    for bucket in spec.buckets:  # validation checked them already when it could read the VAE's config
        problem = spec.shape_problem(bucket)
        if problem is not None:
            raise DataError(
                f"data.buckets entry {list(bucket)} {problem} (VAE compression {compression}); "
                f"change it, or the setting named"
            )
    return ShardLoader(spec, d.num_workers, d.max_failure_fraction, d.min_samples_before_failure_check)


def check_shard_count(num_shards: int, dp_size: int, workers: int) -> None:
    """Each of `workers` loader workers of each data-parallel rank needs a shard of its own.

    The hint names what helps: more shards always; fewer workers only when there are several
    (data.num_workers 0 and 1 both read in one worker).
    """
    if num_shards < dp_size * workers:
        fix = f"write at least {dp_size * workers} shards (make_shards --shard-size smaller)"
        if workers > 1 and num_shards >= dp_size:
            fix += f" or set data.num_workers <= {num_shards // dp_size}"
        raise DataError(
            f"{num_shards} shards cannot feed {dp_size} data-parallel rank(s) x {workers} loader worker(s); {fix}"
        )


def check_data_path(cfg, dp_size: int) -> None:
    """Before start-up: data.path names enough shards for the run, and data.val_path, whenever it is
    given (even where this run's validation never comes), names at least one: every rank reads the
    held-out set whole, in one worker (train/validation.py). DataError otherwise, naming the key;
    opens no shard."""
    if cfg.data.path is not None:
        check_shard_count(len(_resolve(cfg.data.path)), dp_size, max(1, cfg.data.num_workers))
    if cfg.data.val_path is not None:
        _resolve(cfg.data.val_path, "data.val_path")


def _resolve(path: str, key: str = "data.path") -> list[str]:
    from megamoe.data.shards import resolve_shards

    try:
        return resolve_shards(path)
    except (ValueError, FileNotFoundError) as exc:
        raise DataError(f"{key}: {exc}") from None
