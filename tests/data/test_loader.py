"""ShardLoader: rank/worker split, exact resume with several workers and ranks, bad data, worker death."""

import json
import os
import signal
import tarfile
import time

import numpy as np
import pytest
import torch

from megamoe.data.loader import DataError, ShardLoader, StreamSpec, StreamStateError, check_shard_count
from megamoe.data.shards import resolve_shards
from megamoe.data.worker import WorkerStream
from megamoe.tools.latent_shards import encode_sample, write_shard
from megamoe.tools.synthetic_data import dataset_params, write_synthetic_dataset
from tests.data.latent_stream_oracle import LatentShardStream


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """20 clips in 8 shards of 2-3 clips: a few batches cross epochs."""
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_dataset(
        str(out), dataset_params(num_clips=20, frames=2, size=4, channels=3, text_len=4, text_dim=4)
    )
    return str(out)


def spec(shards, dp_rank=0, dp_size=1, workers=2, micro_batch_size=3, seed=11, **layout):
    return StreamSpec(
        shards=tuple(shards),
        format="latent",
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=max(1, workers),
        micro_batch_size=micro_batch_size,
        patch_size=(1, 2, 2),
        in_channels=3,
        text_dim=4,
        text_len=4,
        **layout,
    )


def loader(shards, workers=2, max_failure_fraction=0.05, min_samples=100, **kw):
    return ShardLoader(spec(shards, workers=workers, **kw), workers, max_failure_fraction, min_samples)


def same_batches(a, b):
    return a["key"] == b["key"] and torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_in_process_loader_is_the_latent_shard_stream(shard_dir, dp_rank):
    shards = resolve_shards(shard_dir)
    reference = LatentShardStream(shards, 3, dp_rank, 2, seed=11)
    ours = loader(shards, workers=0, dp_rank=dp_rank, dp_size=2)
    for _ in range(12):
        assert same_batches(next(reference), next(ours))


def test_shards_are_split_by_rank_then_by_worker(shard_dir):
    shards = resolve_shards(shard_dir)
    orders = []
    for epoch in range(3):
        parts = [
            WorkerStream(spec(shards, r, 2, workers=2), w).worker_shards(epoch) for r in range(2) for w in range(2)
        ]
        flat = [s for part in parts for s in part]
        assert sorted(flat) == sorted(shards)  # a partition: every shard once per epoch
        # rank r takes order[r::2], its worker w takes those[w::2]: the worker lists interleave per rank
        rank0 = WorkerStream(spec(shards, 0, 2, workers=1), 0).worker_shards(epoch)
        assert parts[0] == rank0[0::2] and parts[1] == rank0[1::2]
        orders.append(flat)
    assert orders[0] != orders[1]  # reshuffled every epoch


@pytest.mark.parametrize("dp_rank,dp_size", [(0, 1), (0, 2), (1, 2)])
def test_exact_resume_with_two_workers(shard_dir, dp_rank, dp_size):
    """2 ranks x 2 workers per rank (and 1 rank): 7 batches, save, resume: batches 8..12 as uninterrupted."""
    shards = resolve_shards(shard_dir)
    reference = loader(shards, dp_rank=dp_rank, dp_size=dp_size)
    expected = [next(reference) for _ in range(12)]
    end_state = reference.state_dict()
    end_epochs = [w["epoch"] for w in end_state["workers"]]
    reference.close()

    first = loader(shards, dp_rank=dp_rank, dp_size=dp_size)
    for _ in range(7):
        next(first)
    time.sleep(0.3)  # let the workers prefetch: unconsumed batches must not move the saved state
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    first.close()
    assert any(w["epoch"] < end for w, end in zip(state["workers"], end_epochs))  # 8..12 cross an epoch
    resumed = loader(shards, dp_rank=dp_rank, dp_size=dp_size)
    resumed.load_state_dict(state)
    for want in expected[7:]:
        assert same_batches(want, next(resumed))
    assert resumed.state_dict() == end_state  # and it ends where the uninterrupted run ended
    resumed.close()


def test_resume_at_another_data_parallel_size_is_refused_unless_restarted(shard_dir):
    shards = resolve_shards(shard_dir)
    saved = loader(shards, workers=0, dp_size=2)
    next(saved)
    state = saved.state_dict()
    with pytest.raises(
        StreamStateError, match="data-parallel size 2, this run has 4.*data.restart_stream_on_resume=true"
    ):
        loader(shards, workers=0, dp_size=4).load_state_dict(state)
    with pytest.raises(StreamStateError, match="data.num_workers=1, this run has 2"):
        loader(shards, workers=2, dp_size=2).load_state_dict(state)
    restarted = loader(shards, workers=0, dp_size=4)
    restarted.load_state_dict(state, restart=True)  # back to epoch 0, position 0
    fresh = loader(shards, workers=0, dp_size=4)
    for _ in range(3):
        assert same_batches(next(fresh), next(restarted))


# --- bad data ----------------------------------------------------------------------------------


def good_sample(index, channels=3, size=4):
    rng = np.random.default_rng(index)
    return encode_sample(
        rng.standard_normal((channels, 2, size, size)).astype(np.float32),
        rng.standard_normal((4, 4)).astype(np.float32),
        f"clip {index}",
    )


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad")
    write_synthetic_dataset(
        str(out), dataset_params(num_clips=24, frames=2, size=4, channels=3, text_len=4, text_dim=4)
    )
    wrong_shape = [(f"{i:08d}", good_sample(i)) for i in range(100, 103)] + [("00000103", good_sample(103, channels=2))]
    write_shard(str(out / "shard-000100.tar"), wrong_shape)
    missing = [(f"{i:08d}", good_sample(i)) for i in range(200, 203)]
    del missing[1][1]["text.npy"]
    write_shard(str(out / "shard-000101.tar"), missing)
    (out / "shard-000102.tar").write_bytes(np.random.default_rng(0).bytes(3000))  # garbage
    (out / "shard-000103.tar").write_bytes(b"")  # zero bytes
    write_shard(str(out / "shard-000104.tar"), [(f"{i:08d}", good_sample(i)) for i in range(300, 303)])
    with tarfile.open(out / "shard-000104.tar") as tar:
        last = tar.getmembers()[-1]  # 00000302.text.npy
    with open(out / "shard-000104.tar", "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)  # cut inside the last member
    return str(out)


# Per epoch: 1 wrong-shape latent; a missing member + the cut sample's lost member; 3 unreadable tars.
PER_EPOCH = {"bad_latent": 1, "missing_member": 2, "bad_tar": 3}
BAD_KEYS = {"00000103", "00000201", "00000302"}


def test_bad_samples_and_tars_are_skipped_and_counted(bad_dir):
    shards = resolve_shards(bad_dir)
    ours = loader(shards, max_failure_fraction=1.0)
    keys = set()
    while min(w["epoch"] for w in ours.state_dict()["workers"]) < 1:  # every worker finished epoch 0
        keys.update(next(ours)["key"])
    counts = ours.bad_data_counts()
    assert set(counts) == set(PER_EPOCH)
    for cause, n in PER_EPOCH.items():
        assert n <= counts[cause] <= 2 * n, (cause, counts)
    good = {f"{i:08d}" for i in [*range(24), *range(100, 103), *range(200, 203), *range(300, 303)]} - BAD_KEYS
    assert keys == good  # every good sample, including those of the cut shard; never a bad one
    bad_shards = set()
    for w in ours.state_dict()["workers"]:
        bad_shards.update(os.path.basename(p) for p in w["bad_shards"])
    assert bad_shards == {f"shard-{i:06d}.tar" for i in range(100, 105)}
    assert ours.samples_seen() >= 24 + 4 + 3 + 1 + 1 + 3
    ours.close()


def test_too_many_failures_stop_with_the_worst_shards_named(tmp_path):
    write_synthetic_dataset(
        str(tmp_path), dataset_params(num_clips=32, frames=2, size=4, channels=3, text_len=4, text_dim=4)
    )
    write_shard(str(tmp_path / "shard-000200.tar"), [(f"{i:08d}", good_sample(i, channels=5)) for i in range(200, 212)])
    write_shard(
        str(tmp_path / "shard-000201.tar"), [("00000300", good_sample(300, channels=5)), ("00000301", good_sample(301))]
    )
    ours = loader(resolve_shards(str(tmp_path)), max_failure_fraction=0.1, min_samples=20)
    with pytest.raises(DataError) as info:
        for _ in range(200):
            next(ours)
    message = str(info.value)
    assert "\n" not in message and "data.max_failure_fraction=0.1" in message
    assert message.split("worst shards: ")[1].startswith(str(tmp_path / "shard-000200.tar"))
    ours.close()


def test_shards_without_one_usable_sample_stop_instead_of_hanging(tmp_path):
    for i in range(4):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"not a tar" * 100)
    ours = loader(resolve_shards(str(tmp_path)), max_failure_fraction=1.0)
    with pytest.raises(DataError, match="without one usable sample"):
        next(ours)
    ours.close()


def test_a_killed_worker_is_replaced_and_the_stream_goes_on(tmp_path):
    # Batches of some 20 KB: the pipe buffers only a few, so the death is noticed within a few batches.
    write_synthetic_dataset(
        str(tmp_path), dataset_params(num_clips=48, frames=2, size=16, channels=3, text_len=4, text_dim=4)
    )
    shards = resolve_shards(str(tmp_path))
    reference = loader(shards)
    expected = [next(reference) for _ in range(40)]
    reference.close()
    ours = loader(shards)
    got = [next(ours) for _ in range(3)]
    victim = ours.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    got += [next(ours) for _ in range(37)]
    assert all(same_batches(a, b) for a, b in zip(expected, got))
    assert ours.bad_data_counts() == {"worker_died": 1}
    assert victim not in ours.worker_pids()
    ours.close()


def test_too_few_shards_for_ranks_times_workers(shard_dir):
    with pytest.raises(
        DataError,
        match=r"8 shards cannot feed 2 data-parallel rank.*x 5 loader worker.*write at least 10 shards "
        r"\(make_shards --shard-size smaller\) or set data.num_workers <= 4$",
    ):
        loader(resolve_shards(shard_dir), workers=5, dp_size=2)


@pytest.mark.parametrize(
    "shards,dp,workers,fix",
    [
        (1, 2, 1, "write at least 2 shards (make_shards --shard-size smaller)"),  # num_workers 0 or 1
        (1, 2, 3, "write at least 6 shards (make_shards --shard-size smaller)"),  # fewer workers cannot help
        (5, 2, 3, "write at least 6 shards (make_shards --shard-size smaller) or set data.num_workers <= 2"),
    ],
)
def test_too_few_shards_hint_names_only_a_fix_that_helps(shards, dp, workers, fix):
    with pytest.raises(DataError) as err:
        check_shard_count(shards, dp, workers)
    assert str(err.value).endswith("; " + fix)
    check_shard_count(dp * workers, dp, workers)  # exactly enough: accepted


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.format=mp4", "data.format"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.video_frames=16", "data.video_frames"),
        ("data.tokens_per_batch=-5", "data.tokens_per_batch"),
        ("data.max_failure_fraction=1.5", "data.max_failure_fraction"),
        ("data.decode_timeout_s=0", "data.decode_timeout_s"),
        ("data.buckets=[[5,16]]", "data.buckets"),
        ("data.buckets=[[5,15,16]]", "data.buckets"),
    ],
)
def test_data_config_is_validated(override, key):
    from megamoe.config import ConfigError, load_config
    from megamoe.config_checks import validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load_config(None, [override]), world_size=1)
    video = load_config(None, ["data.format=video", "data.path=/shards", "data.buckets=[[16,256,256]]"])
    with pytest.raises(ConfigError, match=r"data\.buckets entry \[16, 256, 256\]: video frames must be 4k\+1"):
        validate(video, world_size=1)
    video.data.buckets = [[17, 256, 256]]
    with pytest.raises(ConfigError, match="set data.vae_path and data.text_encoder_path"):
        validate(video, world_size=1)


def test_samples_that_do_not_fit_the_model_or_the_layout_are_skipped_as_bad_shape(tmp_path):
    """Under 4 sequence shards and rotary tables of 2 positions per axis, samples whose token count
    does not split 4 ways or whose patch grid is longer than the tables are skipped and counted as
    'bad_shape', and the stream goes on: it is the stream without those limits (where the misfits
    form batches of their own shapes) less the misfits' batches. A latent that does not split into
    patches fits no layout: 'bad_shape' in both."""

    def sample(i, frames=2, height=4, width=4):
        rng = np.random.default_rng(i)
        return (
            f"{i:08d}",
            encode_sample(
                rng.standard_normal((3, frames, height, width)).astype(np.float32),
                rng.standard_normal((4, 4)).astype(np.float32),
                f"clip {i}",
            ),
        )

    misfits = [
        sample(100, 1, 4, 6),
        sample(101, 1, 4, 6),  # 1 x 2 x 3 = 6 tokens: not a multiple of 4
        sample(102, 2, 4, 8),
        sample(103, 2, 4, 8),
    ]  # grid (2, 2, 4): 4 > rope_max_seq_len=2
    for s in range(4):  # 3 good samples (grid (2, 2, 2), 8 tokens) and a misfit in every shard
        write_shard(str(tmp_path / f"shard-{s:06d}.tar"), [sample(3 * s + i) for i in range(3)] + misfits[s : s + 1])
    write_shard(str(tmp_path / "shard-000004.tar"), [sample(12), sample(13), sample(104, 2, 4, 5)])
    shards = resolve_shards(str(tmp_path))
    ours = ShardLoader(spec(shards, workers=0, micro_batch_size=2, sequence_shards=4, rope_max_seq_len=2), 0, 1.0)
    unlimited = ShardLoader(spec(shards, workers=0, micro_batch_size=2), 0, 1.0)
    reference = (batch for batch in unlimited if batch["bucket"] == [2, 4, 4])
    for _ in range(20):  # 3 epochs
        assert same_batches(next(reference), next(ours))
    done = ours.state_dict()["workers"][0]["epoch"]  # whole epochs read; 5 misfits in each
    assert done == 2 and set(ours.bad_data_counts()) == {"bad_shape"}
    assert 5 * done <= ours.bad_data_counts()["bad_shape"] <= 5 * (done + 1)
    assert unlimited.bad_data_counts()["bad_shape"] <= done + 1


def test_a_caption_that_is_not_utf8_is_skipped_as_bad_caption(tmp_path):
    """The caption rule of make_shards holds in the latent loader too (errors.utf8_caption): the sample
    is skipped and counted, not kept with replacement characters. The reference: the same shard
    without that sample."""
    samples = [(f"{i:08d}", good_sample(i)) for i in range(5)]
    samples[2][1]["caption.txt"] = "a caf\u00e9".encode("latin-1")
    write_shard(str(tmp_path / "shard-000000.tar"), samples)
    write_shard(str(tmp_path / "ref-000000.tar"), samples[:2] + samples[3:])
    ours = loader([str(tmp_path / "shard-000000.tar")], workers=0, max_failure_fraction=1.0, micro_batch_size=2)
    reference = loader([str(tmp_path / "ref-000000.tar")], workers=0, micro_batch_size=2)
    got, want = set(), set()
    while ours.state_dict()["workers"][0]["epoch"] < 1:  # the whole shard, once
        got.update(next(ours)["key"])
        want.update(next(reference)["key"])
    assert got == want == {"00000000", "00000001", "00000003", "00000004"}
    assert 1 <= ours.bad_data_counts()["bad_caption"] <= 2 and set(ours.bad_data_counts()) == {"bad_caption"}
    assert reference.bad_data_counts() == {}
