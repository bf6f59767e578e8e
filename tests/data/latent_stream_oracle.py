"""The test oracle of the latent data stream: a one-process, one-worker reading of the shards.

`LatentShardStream` is the order the loader (megamoe/data/loader.py, worker.py) must reproduce with
one worker per rank, written as plainly as possible and apart from the loader's code, so tests can
compare the two batch by batch. It is a pure function of (shards, seed, dp_rank, dp_size) and a
cursor of three integers, which is what makes exact resumption possible without replaying the run.
The shard layout is described in megamoe/tools/latent_shards.py.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch

from megamoe.tools.latent_shards import decode_sample, read_shard

STATE_VERSION = 1


def _rng(*entropy: int) -> np.random.Generator:
    # SeedSequence mixes every entropy word, so (seed, epoch, ...) tuples give independent streams.
    return np.random.Generator(np.random.PCG64([e % 2**64 for e in entropy]))


class LatentShardStream:
    """Infinite iterator of micro-batches for one data-parallel rank.

    Epoch e visits the shards in a permutation seeded by (seed, e); rank r takes every dp_size-th
    shard of that order, starting at r. Shards are split by data-parallel rank only: ranks that
    share a data-parallel rank in later tensor/context-parallel layouts see the same samples, as
    they must. Within a shard, samples are visited in a permutation seeded by (seed, e, shard file
    name), so moving the dataset to another directory does not change the stream. Batches run on
    across shard and epoch boundaries. The shard being visited is held in memory whole (shuffling
    within it needs its sample count), so shards should stay small: tens to hundreds of MB.
    """

    def __init__(self, shards: list[str], micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if len(shards) < dp_size:
            raise ValueError(
                f"{len(shards)} shards cannot feed {dp_size} data-parallel ranks; write at least {dp_size} shards"
            )
        self.shards = list(shards)
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        # Cursor of the next sample: epoch, index into this rank's shard list, index into the shard.
        self.epoch = self.shard_pos = self.sample_pos = 0
        self._rank_shards: tuple[int, list[str]] | None = None
        self._shard: tuple[int, int, list] | None = None

    def rank_shards(self, epoch: int) -> list[str]:
        if self._rank_shards is None or self._rank_shards[0] != epoch:
            order = _rng(self.seed, epoch, 0).permutation(len(self.shards))
            self._rank_shards = (epoch, [self.shards[i] for i in order[self.dp_rank :: self.dp_size]])
        return self._rank_shards[1]

    def _shard_samples(self, epoch: int, shard_pos: int, path: str) -> list:
        if self._shard is None or self._shard[:2] != (epoch, shard_pos):
            samples = read_shard(path)
            name_hash = zlib.crc32(os.path.basename(path).encode("utf-8"))
            order = _rng(self.seed, epoch, 1, name_hash).permutation(len(samples))
            self._shard = (epoch, shard_pos, [samples[i] for i in order])
        return self._shard[2]

    def _next_sample(self) -> dict:
        empty_shards = 0
        while True:
            shards = self.rank_shards(self.epoch)
            if self.shard_pos >= len(shards):
                self.epoch, self.shard_pos, self.sample_pos = self.epoch + 1, 0, 0
                continue
            path = shards[self.shard_pos]
            samples = self._shard_samples(self.epoch, self.shard_pos, path)
            if self.sample_pos < len(samples):
                key, members = samples[self.sample_pos]
                self.sample_pos += 1
                return decode_sample(key, members, path)
            if not samples:
                empty_shards += 1
                if empty_shards > len(self.shards):  # every shard of several epochs was empty
                    raise ValueError(f"the shards of data-parallel rank {self.dp_rank} hold no samples")
            self.shard_pos, self.sample_pos = self.shard_pos + 1, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        samples = [self._next_sample() for _ in range(self.micro_batch_size)]
        try:
            latents = np.stack([s["latents"] for s in samples]).astype(np.float32, copy=False)
            text = np.stack([s["text"] for s in samples]).astype(np.float32, copy=False)
        except ValueError:
            shapes = ", ".join(f"{s['key']}: {s['latents'].shape}/{s['text'].shape}" for s in samples)
            raise ValueError(f"samples of one batch differ in shape (latents/text): {shapes}") from None
        return {
            "latents": torch.from_numpy(latents),
            "text": torch.from_numpy(text),
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples],
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "sample_pos": self.sample_pos,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self.seed,
            "num_shards": len(self.shards),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state has version {state.get('version')}, this code reads {STATE_VERSION}")
        if state["dp_size"] != self.dp_size:
            raise ValueError(
                f"the data-parallel size changed from {state['dp_size']} to {self.dp_size}; "
                f"resuming the data stream at another data-parallel size is not supported yet"
            )
        for name, now in (("seed", self.seed), ("dp_rank", self.dp_rank), ("num_shards", len(self.shards))):
            if state[name] != now:
                raise ValueError(
                    f"data stream state was saved with {name}={state[name]} but this stream has "
                    f"{name}={now}; resume with the same data.seed, rank layout and shards"
                )
        self.epoch, self.shard_pos, self.sample_pos = state["epoch"], state["shard_pos"], state["sample_pos"]
        self._shard = None
