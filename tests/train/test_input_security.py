"""Untrusted inputs never run code: configs go through a safe YAML loader, and a checkpoint file
carrying a pickled call is refused in one line before the call can run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamoe.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny.yaml"
SMALL = [
    "model.num_layers=2",
    "model.dim=32",
    "model.ffn_dim=64",
    "data.micro_batch_size=4",
    "train.steps=1",
    "checkpoint.every_steps=1",
]


class CreatesMarker:
    """Unpickling this calls open(marker, 'w'): the marker file appears if the payload ever runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_yaml_tags_that_construct_objects_are_refused(tmp_path):
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model:\n  dim: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(config))
    with pytest.raises(ConfigError):
        load_config(TINY, [f"train.output_dir=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def pretrain_one_process(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, str(REPO / "launcher" / "pretrain.py"), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def plant(checkpoint: Path, rel: str, payload) -> None:
    """Replace one file of a checkpoint and record its new size, so only the loader can object."""
    torch.save(payload, checkpoint / rel)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"][rel] = (checkpoint / rel).stat().st_size
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.mark.slow
def test_a_pickled_call_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    out = tmp_path / "run"
    common = ["--config", TINY, f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL]
    first = pretrain_one_process(*common)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = out / "checkpoints" / "step_00000001"
    marker = tmp_path / "marker"
    plant(checkpoint, "rank_00000.pt", {"step": 1, "payload": CreatesMarker(marker)})

    result = pretrain_one_process(*common, "train.steps=2", "--resume", str(checkpoint))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "could not be loaded" in errors[0] and "pass another checkpoint" in errors[0]
    assert not marker.exists()
