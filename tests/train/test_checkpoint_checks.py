"""Checkpoints that cannot be used are refused before start-up, in one line, touching nothing."""

import json
from pathlib import Path

from launcher.pretrain import main
from megamoe.config import load_config, to_yaml
from megamoe.train.checkpoint import (
    FORMAT,
    CheckpointError,
    check_compatible,
    complete_checkpoints,
    prune_checkpoints,
    resolve_resume,
)

TINY = "configs/tiny.yaml"


def fake_checkpoint(root, step, cfg, files=None):
    """A checkpoint directory as save_checkpoint lays it out (contents are not loaded here)."""
    path = root / "checkpoints" / f"step_{step:08d}"
    (path / "state").mkdir(parents=True)
    files = files or {"state/shard-00001-model-00001-of-00001.safetensors": b"x" * 10, "rank_00000.pt": b"y" * 5}
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    meta = {
        "format": FORMAT,
        "step": step,
        "world_size": 1,
        "dp_size": 1,
        "config": to_yaml(cfg),
        "files": {rel: len(data) for rel, data in files.items()},
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def run(tmp_path, capsys, *args):
    code = main(["--config", TINY, f"train.output_dir={tmp_path}", *args])
    return code, capsys.readouterr().err.strip()


def snapshot(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_one_line_error(code, err, *needles):
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    for needle in needles:
        assert needle in err


def test_missing_checkpoint(tmp_path, capsys):
    code, err = run(tmp_path, capsys, "--resume", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "does not exist")


def test_latest_without_any_checkpoint(tmp_path, capsys):
    code, err = run(tmp_path, capsys, "--resume", "latest")
    assert_one_line_error(code, err, "no complete checkpoint", "drop --resume")


def test_incomplete_checkpoint_without_meta(tmp_path, capsys):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    path = fake_checkpoint(tmp_path, 5, cfg)
    (path / "meta.json").unlink()
    code, err = run(tmp_path, capsys, "--resume", str(path))
    assert_one_line_error(code, err, "incomplete", "meta.json")


def test_truncated_file_and_corrupt_meta(tmp_path, capsys):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    path = fake_checkpoint(tmp_path, 5, cfg)
    (path / "rank_00000.pt").write_bytes(b"y")
    before = snapshot(tmp_path)
    code, err = run(tmp_path, capsys, "--resume", str(path))
    assert_one_line_error(code, err, "rank_00000.pt", "truncated")
    (path / "meta.json").write_text("{not json")
    code, err = run(tmp_path, capsys, "--resume", "latest")
    assert_one_line_error(code, err, "corrupt meta.json")
    (path / "meta.json").write_text(json.dumps({"step": 5}))
    before = snapshot(tmp_path)
    code, err = run(tmp_path, capsys, "--resume", str(path))
    assert_one_line_error(code, err, "corrupt meta.json")
    assert snapshot(tmp_path) == before


def test_config_mismatch_names_the_keys(tmp_path, capsys):
    saved_cfg = load_config(TINY, ["model.dim=256", "model.num_layers=3"])
    path = fake_checkpoint(tmp_path, 5, saved_cfg)
    code, err = run(tmp_path, capsys, "--resume", str(path))
    assert_one_line_error(code, err)
    assert err == (
        f"error: checkpoint '{path}' does not match the config: model.dim: checkpoint 256, config 128; "
        f"model.num_layers: checkpoint 3, config 4; set each to the checkpoint's value"
    )


MOE = ["model.moe.num_experts=4", "model.moe.bias_balancing=true"]


def compatibility_error(saved: list[str], ours: list[str]) -> str | None:
    """check_compatible's message for a checkpoint of TINY + MOE + `saved` resumed with `ours`, or None."""
    meta = {"config": to_yaml(load_config(TINY, MOE + saved))}
    try:
        check_compatible(load_config(TINY, MOE + ours), meta, Path("ckpt"))
    except CheckpointError as exc:
        return str(exc)
    return None


def test_config_mismatch_names_nested_keys_alone():
    """A model.moe key is named by itself with both values, not as two whole model.moe dicts."""
    assert compatibility_error(["model.moe.top_k=2"], ["model.moe.top_k=4"]) == (
        "checkpoint 'ckpt' does not match the config: model.moe.top_k: checkpoint 2, config 4; "
        "set each to the checkpoint's value"
    )
    message = compatibility_error(
        ["model.moe.router=linear", "model.moe.diagnostics_every=5"],
        ["model.moe.router=expert_choice", "model.moe.bias_update_centered=true", "model.moe.diagnostics_every=10"],
    )
    assert message == (
        "checkpoint 'ckpt' does not match the config: model.moe.router: checkpoint linear, config expert_choice; "
        "model.moe.bias_update_centered: checkpoint false, config true; set each to the checkpoint's value"
    )


def test_observation_keys_may_change_on_resume(tmp_path):
    """Diagnostics and trace keys change what a run reports, not the model or its state."""
    saved = ["model.moe.diagnostics_every=5"]
    changed = ["model.moe.diagnostics_every=10", "model.moe.trace_every=2", "model.moe.trace_tokens=64"]
    assert compatibility_error(saved, changed) is None
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", *MOE, *changed])
    path = fake_checkpoint(tmp_path, 5, load_config(TINY, MOE + saved))
    assert resolve_resume(cfg, str(path), world_size=1) == path


def test_fresh_run_refuses_to_overwrite_existing_checkpoints(tmp_path, capsys):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    fake_checkpoint(tmp_path, 5, cfg)
    before = snapshot(tmp_path)
    code, err = run(tmp_path, capsys)
    assert_one_line_error(code, err, "already holds checkpoints", "--resume latest")
    assert snapshot(tmp_path) == before


def test_latest_skips_a_save_interrupted_mid_write(tmp_path):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    fake_checkpoint(tmp_path, 5, cfg)
    interrupted = tmp_path / "checkpoints" / ".step_00000010.tmp"
    (interrupted / "state").mkdir(parents=True)
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000005"]


def test_pruning_keeps_the_newest(tmp_path):
    cfg = load_config(TINY)
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step, cfg)
    prune_checkpoints(tmp_path / "checkpoints", keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000003", "step_00000004"]
    prune_checkpoints(tmp_path / "checkpoints", keep_last=0)  # never below one
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000004"]


def test_other_data_parallel_size_needs_a_restarted_stream(tmp_path, capsys, monkeypatch):
    """Weights and optimizer state reshard to any layout; the data stream's position does not."""
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    path = fake_checkpoint(tmp_path, 5, cfg)  # written by 1 rank: data-parallel size 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run(tmp_path, capsys, "--resume", str(path))
    assert_one_line_error(code, err, "data-parallel size 1, this run has 2", "data.restart_stream_on_resume=true")
    restarted = load_config(TINY, [f"train.output_dir={tmp_path}", "data.restart_stream_on_resume=true"])
    assert resolve_resume(restarted, str(path), world_size=2) == path
    # other parallel sizes at the same data-parallel size: accepted (tensor parallel 2 on 2 ranks)
    tp = load_config(TINY, [f"train.output_dir={tmp_path}", "parallel.tensor_parallel_size=2"])
    assert resolve_resume(tp, str(path), world_size=2) == path


def test_checkpoint_in_deepspeeds_format_is_refused(tmp_path, capsys):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    path = fake_checkpoint(tmp_path, 5, cfg)
    meta = json.loads((path / "meta.json").read_text())
    del meta["format"]
    (path / "meta.json").write_text(json.dumps(meta))
    code, err = run(tmp_path, capsys, "--resume", str(path))
    assert_one_line_error(code, err, "DeepSpeed's own format", "train.init_from=")


def test_sampler_with_a_missing_checkpoint_names_one_that_exists(tmp_path, capsys):
    """launcher/sample.py has no --resume: its message names the newest checkpoint of the run instead."""
    from launcher.sample import main as sample

    cfg = load_config(TINY)
    newest = fake_checkpoint(tmp_path, 4, cfg)
    fake_checkpoint(tmp_path, 2, cfg)
    for given in (tmp_path / "checkpoints" / "step_00000006", tmp_path):  # a typo; the run directory
        code = sample(["--checkpoint", str(given), "--caption", "a red circle"])
        err = capsys.readouterr().err.strip()
        assert_one_line_error(code, err, f"'{newest}'")
        assert "--resume" not in err
    # pretrain does have --resume latest, and still suggests it
    code, err = run(tmp_path, capsys, "--resume", str(tmp_path / "checkpoints" / "step_00000006"))
    assert_one_line_error(code, err, "--resume latest", f"'{newest}'")
