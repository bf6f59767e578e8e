"""One loader worker's stream: its shards, its samples, its buckets, and its exact resume state.

Which shards (the distribution rule): epoch e orders all shards by a permutation seeded by
(seed, e). Data-parallel rank r of R takes `order[r::R]`; its worker w of W takes `those[w::W]`.
Within a shard, samples are visited in a permutation seeded by (seed, e, crc32(file name)).
With W = 1 this is exactly the order of the tests' oracle (tests/data/latent_stream_oracle.py). R and r are the DATA-parallel size and
rank (megatron-core `parallel_state.get_data_parallel_rank()`): tensor- and context-parallel
ranks of one model replica share them and so read the same samples, as they must (they split
one sample's work); expert-parallel ranks are data-parallel ranks for the data (each brings
its own tokens to the all-to-all), so they read different samples.

A worker's position is a cursor (epoch, shard_pos, sample_pos) into that order; every sample is
a pure function of its cursor (frame-sampling seeds included), so `WorkerState` restores the
stream exactly.

Bad data never stops the worker: a sample that fails is counted by cause and by shard and
skipped; a tar that cannot be opened counts once as 'bad_tar' per visit (and as one sample seen).
Shards must be uncompressed tars: members are read by offset, so a shard is indexed, not loaded.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from megamoe.data import errors
from megamoe.data.buckets import (
    BAD_SHAPE,
    Bucketer,
    Shape,
    assign_bucket,
    batch_size_for,
    crop_latents,
    latent_shape,
    shape_problem,
    tokens_per_sample,
)
from megamoe.data.errors import SampleError
from megamoe.data.shards import split_member_name
from megamoe.error_messages import describe

DETAIL_CHARS = 200  # of a library's message in a bad sample's detail, which is logged once per sample


class DataError(RuntimeError):
    """The data cannot feed training (too many bad samples, no usable shard); one line names the shards."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to produce its stream; picklable, the same for every worker of a rank."""

    shards: tuple
    format: str  # 'latent' or 'video'
    seed: int
    dp_rank: int
    dp_size: int
    num_workers: int  # logical workers, >= 1 (num_workers=0 runs one in the training process)
    micro_batch_size: int
    tokens_per_batch: int = 0
    buckets: tuple = ()
    patch_size: tuple = (1, 2, 2)
    compression: tuple = (4, 16)  # video VAE (temporal, spatial) downsampling
    in_channels: int = 48
    text_dim: int = 4096
    text_len: int = 512
    video_frames: int = 17
    video_fps: float = 16.0
    decode_timeout_s: float = 30.0
    decoder: str = "decord"  # data.decoder: 'decord', 'torchcodec' or 'pyav' (PyAV is the fallback of all)
    sequence_shards: int = 1  # pieces each sample's tokens are cut into (CP, x TP under sequence parallelism)
    rope_max_seq_len: int = 1024  # model.rope_max_seq_len: the largest patch-grid extent per axis

    @property
    def video(self) -> bool:
        return self.format == "video"

    def shape_problem(self, bucket: Shape) -> str | None:
        """Why samples of `bucket` cannot be trained (they are skipped as 'bad_shape'), or None."""
        return shape_problem(
            bucket, self.video, self.compression, self.patch_size, self.sequence_shards, self.rope_max_seq_len
        )


class WorkerState(TypedDict):
    """One worker's position in its stream and its counters: plain values only, saved in checkpoints."""

    epoch: int
    shard_pos: int
    """Index of the shard being read in this worker's share of the epoch's shard order."""
    sample_pos: int
    """Index of the next sample to read in the shard's sample order."""
    pending: list
    """[[bucket, [cursor, ...]], ...]: samples read but not yet batched (re-read on resume)."""
    seen: int
    """Samples read so far, bad ones included."""
    batches: int
    """Batches made so far."""
    stalled: int
    """Shard visits in a row without a usable sample."""
    visit_usable: int
    """Usable samples so far in the current shard visit."""
    visit_batches: int
    """Batches so far in the current shard visit."""
    bad: dict[str, int]
    """Failed samples by cause (data/errors.py)."""
    bad_shards: dict[str, int]
    """Failed samples by shard path."""


def fresh_state() -> WorkerState:
    return {
        "epoch": 0,
        "shard_pos": 0,
        "sample_pos": 0,
        "pending": [],
        "seen": 0,
        "batches": 0,
        "stalled": 0,
        "visit_usable": 0,
        "visit_batches": 0,
        "bad": {},
        "bad_shards": {},
    }


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([e % 2**64 for e in entropy]))


def _name_hash(path: str) -> int:
    # The file name, not the path: moving the dataset must not change the stream.
    return zlib.crc32(os.path.basename(path).encode("utf-8"))


def index_shard(path: str) -> tuple[list, str | None]:
    """(samples in file order as (key, {ext: (offset, size)}), problem or None).

    Raises SampleError(BAD_TAR) when not one sample can be read. A tar cut short keeps the
    samples before the cut (the problem says so); a member whose data runs past the end of the
    file is dropped, so its sample fails later as 'missing_member'.
    """
    samples: list = []
    problem = None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                if info.offset_data + info.size > size:
                    problem = f"truncated at member '{info.name}'"
                    break
                parts = split_member_name(info.name)
                if parts is None:
                    continue
                key, ext = parts
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        if not samples:
            raise SampleError(errors.BAD_TAR, shard=path, detail=describe(exc, DETAIL_CHARS)) from None
        problem = f"unreadable after {len(samples)} samples ({describe(exc, DETAIL_CHARS)})"
    return samples, problem


class OpenShard:
    """A shard's index in visiting order, and an open file to read members by offset."""

    def __init__(self, path: str, samples: list, order: np.ndarray):
        self.path = path
        self.samples = [samples[i] for i in order]
        self.file_index = [int(i) for i in order]  # position in the file: stable frame-sampling seeds
        self._file = None

    def members(self, position: int) -> tuple[str, dict[str, bytes]]:
        key, where = self.samples[position]
        if self._file is None:
            self._file = open(self.path, "rb")
        out = {}
        for ext, (offset, size) in where.items():
            self._file.seek(offset)
            out[ext] = self._file.read(size)
        return key, out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def load_latent_sample(key: str, members: dict[str, bytes], shard: str, spec: StreamSpec) -> dict:
    """{'latents' [C, F, H, W], 'text' [text_len, text_dim] float32, 'caption', 'key'}; SampleError if bad.

    The caption.txt member is optional (training uses text.npy); one that is not UTF-8 is BAD_CAPTION."""
    for ext in ("latents.npy", "text.npy"):
        if ext not in members:
            raise SampleError(errors.MISSING_MEMBER, key, shard, f"no '{ext}' member")
    try:
        latents = np.load(io.BytesIO(members["latents.npy"]), allow_pickle=False)
        text = np.load(io.BytesIO(members["text.npy"]), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError... for a broken .npy
        raise SampleError(errors.BAD_LATENT, key, shard, f"unreadable .npy ({describe(exc, DETAIL_CHARS)})") from None
    if latents.ndim != 4 or latents.shape[0] != spec.in_channels or latents.dtype.kind != "f" or 0 in latents.shape:
        raise SampleError(
            errors.BAD_LATENT,
            key,
            shard,
            f"latents {latents.dtype} {latents.shape}, expected float "
            f"[{spec.in_channels}, F, H, W] (model.in_channels)",
        )
    if text.ndim != 2 or text.shape[1] != spec.text_dim or text.dtype.kind != "f":
        raise SampleError(
            errors.BAD_LATENT,
            key,
            shard,
            f"text {text.dtype} {text.shape}, expected float [L, {spec.text_dim}] (model.text_dim)",
        )
    # Zero rows pad a short text, as Wan pads umT5 outputs; a longer one is cut at text_len.
    fixed = np.zeros((spec.text_len, spec.text_dim), dtype=np.float32)
    fixed[: min(len(text), spec.text_len)] = text[: spec.text_len]
    caption = errors.utf8_caption(members.get("caption.txt", b""), key, shard, "caption.txt")
    return {"latents": latents.astype(np.float32, copy=False), "text": fixed, "caption": caption, "key": key}


class WorkerStream:
    """Iterator of (kind, batch, state): kind 'batch', or 'report' after a shard visit that gave no
    batch (so failure counts reach the training process even when a worker makes no batches)."""

    def __init__(self, spec: StreamSpec, worker: int, state: dict | None = None):
        self.spec, self.worker = spec, worker
        s = state or fresh_state()
        self.epoch, self.shard_pos, self.sample_pos = s["epoch"], s["shard_pos"], s["sample_pos"]
        self.seen, self.batches, self.stalled = s["seen"], s["batches"], s["stalled"]
        self.bad, self.bad_shards = Counter(s["bad"]), Counter(s["bad_shards"])
        self.max_stalled = max(64, len(spec.shards))
        self.bucketer = Bucketer(self._batch_size)
        self._shards: tuple[int, list[str]] | None = None
        self._open: tuple[int, int, OpenShard | None] | None = None
        self.visit_usable, self.visit_batches = s["visit_usable"], s["visit_batches"]
        self._pool = None
        for bucket, cursors in s["pending"]:
            for cursor in cursors:
                sample = self._read(cursor, count_seen=False)
                if sample is not None:
                    self.bucketer.restore(tuple(bucket), cursor, sample)

    # --- order -----------------------------------------------------------------------------

    def worker_shards(self, epoch: int) -> list[str]:
        if self._shards is None or self._shards[0] != epoch:
            spec = self.spec
            order = _rng(spec.seed, epoch, 0).permutation(len(spec.shards))
            mine = order[spec.dp_rank :: spec.dp_size][self.worker :: spec.num_workers]
            self._shards = (epoch, [spec.shards[i] for i in mine])
        return self._shards[1]

    def _shard(self, epoch: int, shard_pos: int) -> tuple[OpenShard | None, str | None]:
        """The shard at (epoch, shard_pos), cached; (None, why) when it cannot be opened."""
        if self._open is not None and self._open[:2] == (epoch, shard_pos):
            return self._open[2], None
        if self._open is not None and self._open[2] is not None:
            self._open[2].close()
        path = self.worker_shards(epoch)[shard_pos]
        problem = None
        try:
            samples, problem = index_shard(path)
            order = _rng(self.spec.seed, epoch, 1, _name_hash(path)).permutation(len(samples))
            shard = OpenShard(path, samples, order)
        except SampleError as exc:
            shard, problem = None, exc.detail
        self._open = (epoch, shard_pos, shard)
        return shard, problem

    def _batch_size(self, bucket: Shape) -> int:
        spec = self.spec
        tokens = tokens_per_sample(latent_shape(bucket, spec.video, spec.compression), spec.patch_size)
        return batch_size_for(tokens, spec.tokens_per_batch, spec.micro_batch_size)

    # --- samples ---------------------------------------------------------------------------

    def _fail(self, cause: str, shard: str) -> None:
        self.bad[cause] += 1
        self.bad_shards[shard] += 1

    def _read(self, cursor: list, count_seen: bool = True) -> dict | None:
        """The bucketed sample at `cursor`, or None when it is bad (counted)."""
        epoch, shard_pos, position = cursor
        shard, _ = self._shard(epoch, shard_pos)
        path = self.worker_shards(epoch)[shard_pos]
        if count_seen:
            self.seen += 1
        if shard is None:
            self._fail(errors.BAD_TAR, path)
            return None
        spec = self.spec
        try:
            key, members = shard.members(position)
            if spec.video:  # the decode worker checks the shape, before decoding
                sample = self._load_video(key, members, path, epoch, shard.file_index[position])
            else:
                sample = load_latent_sample(key, members, path, spec)
                bucket, cause = assign_bucket(sample["latents"].shape[1:], spec.buckets, crop_only=True)
                if bucket is None:
                    raise _Skip(cause)
                if spec.shape_problem(bucket) is not None:
                    raise _Skip(BAD_SHAPE)
                sample["latents"], sample["bucket"] = crop_latents(sample["latents"], bucket), bucket
        except SampleError as exc:
            self._fail(exc.cause, path)
            return None
        except _Skip as skip:
            self._fail(skip.cause, path)
            return None
        except OSError:  # the shard file vanished or broke under us
            self._fail(errors.BAD_TAR, path)
            return None
        return sample

    def _load_video(self, key: str, members: dict, path: str, epoch: int, file_index: int) -> dict:
        from megamoe.data.video import parse_caption, video_member
        from megamoe.data.video_buckets import decode_to_bucket

        caption = parse_caption(members, key, path)  # cheap; may spare a decode
        _, data = video_member(members, key, path)
        seed = int(np.random.SeedSequence([self.spec.seed, epoch, _name_hash(path), file_index]).generate_state(1)[0])
        try:
            decoded = self._decode_pool().run(decode_to_bucket, data, self.spec, seed)
        except SampleError as exc:
            raise exc.with_location(key, path) from None
        if "skip" in decoded:
            raise _Skip(decoded["skip"])
        return {"pixels": decoded["clip"], "caption": caption, "key": key, "bucket": tuple(decoded["bucket"])}

    def _decode_pool(self):
        if self._pool is None:
            from megamoe.data.decode_pool import DecodePool

            self._pool = DecodePool(num_workers=1, timeout_s=self.spec.decode_timeout_s)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._open is not None and self._open[2] is not None:
            self._open[2].close()

    # --- the stream ------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "sample_pos": self.sample_pos,
            "pending": self.bucketer.state(),
            "seen": self.seen,
            "batches": self.batches,
            "stalled": self.stalled,
            "visit_usable": self.visit_usable,
            "visit_batches": self.visit_batches,
            "bad": dict(self.bad),
            "bad_shards": dict(self.bad_shards),
        }

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, dict | None, dict]:
        while True:
            shards = self.worker_shards(self.epoch)
            if self.shard_pos >= len(shards):
                self.epoch, self.shard_pos, self.sample_pos = self.epoch + 1, 0, 0
                continue
            shard, problem = self._shard(self.epoch, self.shard_pos)
            # `problem` comes only with a fresh open; at sample_pos > 0 (a resume) it was counted before.
            if problem is not None and self.sample_pos == 0:
                self.seen += shard is None  # an unopenable tar counts as one sample seen and failed
                self._fail(errors.BAD_TAR, shards[self.shard_pos])
            if shard is None or self.sample_pos >= len(shard.samples):
                report = self._end_visit()
                if report:
                    return "report", None, self.state()
                continue
            cursor = [self.epoch, self.shard_pos, self.sample_pos]
            self.sample_pos += 1
            sample = self._read(cursor)
            if sample is None:
                continue
            self.visit_usable += 1
            full = self.bucketer.add(sample["bucket"], cursor, sample)
            if full is not None:
                self.batches += 1
                self.visit_batches += 1
                return "batch", collate(full, self.spec.video), self.state()

    def _end_visit(self) -> bool:
        """Move to the next shard; True when this visit gave no batch (then a report is due)."""
        self.stalled = 0 if self.visit_usable else self.stalled + 1
        report = self.visit_batches == 0
        self.shard_pos, self.sample_pos = self.shard_pos + 1, 0
        self.visit_usable = self.visit_batches = 0
        if self.stalled >= self.max_stalled:
            worst = ", ".join(f"{p} ({n})" for p, n in self.bad_shards.most_common(3))
            raise DataError(
                f"loader worker {self.worker} of data-parallel rank {self.spec.dp_rank} visited "
                f"{self.stalled} shards in a row without one usable sample (worst: {worst or 'none'}); "
                f"check data.path and the shards"
            )
        return report


class _Skip(Exception):
    """A readable sample that no bucket takes, or whose bucket does not fit the model or the layout;
    carries its cause."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


def collate(samples: list[dict], video: bool) -> dict:
    """numpy batch of one bucket (torch conversion happens in the training process)."""
    batch = {
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "bucket": list(samples[0]["bucket"]),
    }
    if video:
        batch["pixels"] = np.stack([s["pixels"] for s in samples])  # uint8 [B, F, H, W, 3]
    else:
        batch["latents"] = np.stack([s["latents"] for s in samples])
        batch["text"] = np.stack([s["text"] for s in samples])
    return batch
