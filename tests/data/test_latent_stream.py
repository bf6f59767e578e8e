"""The test oracle LatentShardStream (latent_stream_oracle.py): rank split, exact resume; and shard resolution."""

import json
import os

import pytest
import torch

from megamoe.data.shards import resolve_shards
from megamoe.tools.synthetic_data import dataset_params, write_synthetic_dataset
from tests.data.latent_stream_oracle import LatentShardStream


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """20 clips in 8 shards of 2-3 clips: small enough that a few batches cross epochs."""
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_dataset(
        str(out), dataset_params(num_clips=20, frames=2, size=4, channels=3, text_len=4, text_dim=4)
    )
    return str(out)


def test_batch_contents(shard_dir):
    batch = next(LatentShardStream(resolve_shards(shard_dir), 3, dp_rank=0, dp_size=1, seed=7))
    assert batch["latents"].dtype == torch.float32 and batch["latents"].shape == (3, 3, 2, 4, 4)
    assert batch["text"].dtype == torch.float32 and batch["text"].shape == (3, 4, 4)
    assert len(batch["caption"]) == 3 and all(c.startswith("a ") for c in batch["caption"])
    assert all(len(k) == 8 and k.isdigit() for k in batch["key"])


def epoch_keys(stream, epoch):
    """Keys this rank yields in `epoch` (batches of one; the cursor rolls over lazily)."""
    keys = []
    while True:
        batch = next(stream)
        current = stream.state_dict()["epoch"]
        if current > epoch:
            return keys
        if current == epoch:
            keys += batch["key"]


def test_ranks_split_each_epoch(shard_dir):
    shards = resolve_shards(shard_dir)
    for epoch in range(3):
        per_rank = [epoch_keys(LatentShardStream(shards, 1, rank, 2, seed=3), epoch) for rank in range(2)]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == [f"{i:08d}" for i in range(20)]
    # Same seed, same stream; another epoch or seed, another order.
    again = epoch_keys(LatentShardStream(shards, 1, 0, 2, seed=3), 0)
    assert again == epoch_keys(LatentShardStream(shards, 1, 0, 2, seed=3), 0)
    assert again != epoch_keys(LatentShardStream(shards, 1, 0, 2, seed=4), 0)


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_exact_resume_across_epochs(shard_dir, dp_rank):
    shards = resolve_shards(shard_dir)
    uninterrupted = LatentShardStream(shards, 3, dp_rank, 2, seed=11)
    expected = [next(uninterrupted) for _ in range(12)]

    first = LatentShardStream(shards, 3, dp_rank, 2, seed=11)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["epoch"] < uninterrupted.state_dict()["epoch"]  # batches 8..12 cross an epoch boundary
    resumed = LatentShardStream(shards, 3, dp_rank, 2, seed=11)
    resumed.load_state_dict(state)
    for want, got in zip(expected[7:], [next(resumed) for _ in range(5)]):
        assert torch.equal(want["latents"], got["latents"]) and torch.equal(want["text"], got["text"])
        assert want["key"] == got["key"] and want["caption"] == got["caption"]


def test_resume_at_another_size_is_refused(shard_dir):
    shards = resolve_shards(shard_dir)
    state = LatentShardStream(shards, 2, 0, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="data-parallel size changed from 2 to 4"):
        LatentShardStream(shards, 2, 0, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        LatentShardStream(shards, 2, 0, 2, seed=1).load_state_dict(state)


def test_too_few_shards(shard_dir):
    with pytest.raises(ValueError, match="8 shards cannot feed 9 data-parallel ranks; write at least 9 shards"):
        LatentShardStream(resolve_shards(shard_dir), 1, 0, 9, seed=0)


def test_missing_shard(shard_dir, tmp_path):
    missing = str(tmp_path / "shard-000099.tar")
    stream = LatentShardStream([missing], 1, 0, 1, seed=0)
    with pytest.raises(FileNotFoundError, match="shard-000099.tar"):
        next(stream)


def test_resolve_shards(shard_dir, tmp_path):
    listed = resolve_shards(shard_dir)
    assert [os.path.basename(p) for p in listed] == [f"shard-{i:06d}.tar" for i in range(8)]
    assert resolve_shards(os.path.join(shard_dir, "shard-{000000..000007}.tar")) == listed
    assert resolve_shards(listed[3]) == [listed[3]]
    for nothing in (str(tmp_path / "nowhere"), str(tmp_path / "none-{000000..000003}.tar"), str(tmp_path)):
        with pytest.raises(ValueError, match=f"no shards found at '{nothing}'"):
            resolve_shards(nothing)
    with pytest.raises(FileNotFoundError, match="shard-000008.tar"):
        resolve_shards(os.path.join(shard_dir, "shard-{000000..000008}.tar"))
