"""`--resume auto`: the newest usable checkpoint, else a fresh start; killed saves never count."""

import pytest

from megamoe.config import load_config
from megamoe.train.checkpoint import CheckpointError, complete_checkpoints, prune_checkpoints, resolve_resume
from tests.train.test_checkpoint_checks import TINY, fake_checkpoint, run, snapshot


def test_auto_without_checkpoints_starts_fresh(tmp_path, capsys):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    assert resolve_resume(cfg, "auto", 1) is None
    assert "starting a fresh run" in capsys.readouterr().out


def test_auto_takes_the_newest_complete_and_passes_over_killed_and_truncated_saves(tmp_path, capsys):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    fake_checkpoint(tmp_path, 2, cfg)
    truncated = fake_checkpoint(tmp_path, 4, cfg)
    (truncated / "rank_00000.pt").write_bytes(b"y")
    (tmp_path / "checkpoints" / ".step_00000006.tmp" / "state").mkdir(parents=True)  # a save killed mid-write
    assert resolve_resume(cfg, "auto", 1) == tmp_path / "checkpoints" / "step_00000002"
    printed = capsys.readouterr().out
    assert "--resume auto skips" in printed and "step_00000004" in printed and "truncated" in printed
    (truncated / "rank_00000.pt").write_bytes(b"y" * 5)
    assert resolve_resume(cfg, "auto", 1) == truncated


def test_auto_still_refuses_another_model_naming_the_keys(tmp_path, capsys):
    fake_checkpoint(tmp_path, 5, load_config(TINY, ["model.dim=256"]))
    before = snapshot(tmp_path)
    code, err = run(tmp_path, capsys, "--resume", "auto")
    assert code == 2 and len(err.splitlines()) == 1 and ": model.dim: checkpoint 256, config 128; set each" in err
    assert snapshot(tmp_path) == before


def test_pruning_removes_killed_saves_older_than_the_newest_checkpoint(tmp_path):
    cfg = load_config(TINY)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step, cfg)
    for step in (2, 9):
        (root / f".step_{step:08d}.tmp").mkdir()
    prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == [".step_00000009.tmp", "step_00000002", "step_00000003"]
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000002", "step_00000003"]


def test_latest_still_requires_a_checkpoint(tmp_path):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(cfg, "latest", 1)
