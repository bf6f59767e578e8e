"""Stops for bad input on 2 gloo ranks under torchrun: whichever rank finds the problem, every rank
stops after the same agreement with exit code 2, the user sees one line, and torchrun's failure
summary names that line as the root cause (torchrun itself exits 1, as for any failed worker)."""

import pytest

from megamoe.config import load_config
from megamoe.train.checkpoint import inspect_checkpoint, resolve_resume
from tests.distributed.launch_helpers import REPO, assert_stopped_together, pretrain

TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ["model.num_layers=2", "model.dim=32", "model.ffn_dim=64", "data.micro_batch_size=4", "optim.warmup_steps=2"]


def test_failed_save_on_one_rank_stops_all_and_keeps_the_previous_checkpoint(tmp_path, data_cache):
    out = tmp_path / "run"
    args = [
        "--config",
        TINY,
        f"train.output_dir={out}",
        f"data.cache_dir={data_cache}",
        "train.steps=2",
        "checkpoint.every_steps=1",
        *SMALL,
    ]
    # Rank 1's part of the checkpoint of step 2 fails as on a full disk; rank 0 must clean up.
    failed = pretrain(args, check=False, faults={"MEGAMOE_TEST_FAIL_SAVE": "2:1"})
    assert_stopped_together(
        failed,
        "could not write checkpoint",
        "step_00000002",
        "No space left on device",
        "[rank 1; every rank stopped]",
        "step_00000001 is the newest checkpoint",
        "--resume auto",
    )
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001"]  # no .tmp left holding the space
    inspect_checkpoint(ckpts / "step_00000001")  # every recorded file present at its size

    # The planner's checkpoint size covers the real one, with little to spare.
    from megamoe.tools.parameter_counts import checkpoint_bytes
    from megamoe.train.run_dir import check_output_dir

    written = sum(p.stat().st_size for p in (ckpts / "step_00000001").rglob("*") if p.is_file())
    planned = checkpoint_bytes(load_config(TINY, SMALL), 2)
    assert written <= planned <= 1.25 * written + (2 << 20), (written, planned)

    # --resume auto starts from the previous checkpoint, and the run directory passes the start-up check.
    cfg = load_config(TINY, [f"train.output_dir={out}", *SMALL])
    assert resolve_resume(cfg, "auto", 2) == ckpts / "step_00000001"
    check_output_dir(cfg, 2)


@pytest.fixture(scope="module")
def bad_on_rank_1(tmp_path_factory):
    """4 latent shards of 8 clips; the 2 that data-parallel rank 1 reads first hold a bad latent in every
    other sample, rank 0's are clean."""
    from megamoe.data.loader import build_loader
    from megamoe.data.worker import WorkerStream
    from megamoe.tools.latent_shards import encode_sample, write_shard
    from megamoe.tools.synthetic_data import dataset_params, embed_caption, make_clip

    out = tmp_path_factory.mktemp("half_bad")
    paths = [str(out / f"shard-{i:06d}.tar") for i in range(4)]
    for path in paths:
        write_shard(path, [])
    cfg = load_config(TINY, [f"data.path={out}"])
    loader = build_loader(cfg, 1, 2)
    rank_1 = set(WorkerStream(loader.spec, 0).worker_shards(0))
    loader.close()
    assert len(rank_1) == 2
    p = dataset_params(num_clips=32, frames=5, size=16, channels=3, text_len=8, text_dim=32)
    for shard, path in enumerate(paths):
        samples = []
        for index in range(shard * 8, shard * 8 + 8):
            channels = 2 if path in rank_1 and index % 2 else 3
            latents, caption = make_clip(p["seed"], index, 5, 16, channels)
            samples.append((f"{index:08d}", encode_sample(latents, embed_caption(caption, 8, 32), caption)))
        write_shard(path, samples)
    return str(out)


def test_too_many_bad_samples_on_one_rank_stop_every_rank(tmp_path, bad_on_rank_1):
    out = tmp_path / "run"
    result = pretrain(
        [
            "--config",
            TINY,
            f"train.output_dir={out}",
            f"data.path={bad_on_rank_1}",
            "train.steps=20",
            "data.max_failure_fraction=0.2",
            "data.min_samples_before_failure_check=8",
            "logging.every_steps=1",
            *SMALL,
        ],
        check=False,
    )
    assert_stopped_together(
        result, "on data-parallel rank 1", "data.max_failure_fraction=0.2", "bad_latent", "[rank 1; every rank stopped]"
    )
    assert not (out / "checkpoints").exists()  # nothing saved after the stop


def test_bad_input_before_start_up_is_torchruns_root_cause_and_writes_nothing(tmp_path):
    empty, out = tmp_path / "shards", tmp_path / "run"
    empty.mkdir()
    result = pretrain(["--config", TINY, f"train.output_dir={out}", f"data.path={empty}"], check=False)
    line = assert_stopped_together(result, "data.path", "no shards found")
    assert result.stderr.rstrip().splitlines()[-2].strip() == f"traceback : {line}"  # the last words torchrun prints
    assert not out.exists()


# The signal torchrun sends to the other ranks once one exits, raised here while the launcher is still
# importing torch: deterministic, where the race it stands for (one rank refusing before another has
# finished its imports) depends on scheduling.
SIGTERM_DURING_IMPORTS = """
import os, runpy, signal, sys

class SignalOnTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, SignalOnTorchImport())
sys.argv = ["launcher/pretrain.py", *sys.argv[1:]]
runpy.run_path("launcher/pretrain.py", run_name="__main__")
"""


def test_sigterm_while_the_launcher_imports_does_not_kill_a_refusing_rank(tmp_path):
    import subprocess
    import sys

    empty = tmp_path / "shards"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_DURING_IMPORTS, "--config", TINY, f"data.path={empty}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])  # not -15: the handler came first
    assert done.stderr.strip().splitlines()[-1].startswith("error: data.path"), done.stderr[-3000:]


def test_sigterm_while_the_launcher_imports_ends_a_rank_with_good_input_before_start_up(tmp_path, data_cache):
    """Nothing is trained yet, and the signal may be torchrun's after another rank died: the rank must
    not go on to wait for the other ranks (a world of one here, which would train and save instead)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SIGTERM_DURING_IMPORTS,
            "--config",
            TINY,
            f"train.output_dir={out}",
            f"data.cache_dir={data_cache}",
            "train.steps=2",
            *SMALL,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -15, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert "SIGTERM before start-up (rank 0): stopping, nothing to save" in done.stderr, done.stderr[-3000:]
    assert not (out / "checkpoints").exists()
