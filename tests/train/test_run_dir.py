"""The run directory and data.path are checked before start-up: one line, exit code 2, nothing written."""

import pytest

import megamoe.train.run_dir as run_dir
from launcher.pretrain import main
from megamoe.config import load_config
from megamoe.tools.parameter_counts import checkpoint_bytes
from megamoe.train.run_dir import RunDirError, check_output_dir
from tests.train.test_checkpoint_checks import TINY, assert_one_line_error, snapshot


def launch(capsys, *overrides):
    code = main(["--config", TINY, "train.steps=1", *overrides])  # one step, should a check ever let it through
    return code, capsys.readouterr().err.strip()


def test_output_dir_under_a_regular_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the run directory should be")
    code, err = launch(capsys, f"train.output_dir={blocker / 'run'}")
    assert_one_line_error(code, err, f"'{blocker / 'run'}' cannot be created", "is a file", "train.output_dir")
    assert blocker.read_text() == "a file where the run directory should be"


def test_unwritable_checkpoint_directory_is_refused(tmp_path, capsys):
    (tmp_path / "checkpoints").write_text("")  # creating the checkpoint directory would fail at the first save
    code, err = launch(capsys, f"train.output_dir={tmp_path}")
    assert_one_line_error(code, err, "checkpoints", "is a file", "train.output_dir")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]  # refused before start-up: nothing written


def test_too_little_free_space_is_refused_and_nothing_is_created(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    need = checkpoint_bytes(load_config(TINY), 1)
    monkeypatch.setattr(run_dir, "free_bytes", lambda path: need - 1)
    code, err = launch(capsys, f"train.output_dir={out}")
    assert_one_line_error(code, err, "GB free", f"needs {need / 1e9:.2f} GB")
    assert not out.exists()
    monkeypatch.setattr(run_dir, "free_bytes", lambda path: need)
    check_output_dir(load_config(TINY, [f"train.output_dir={out}"]), 1)  # exactly enough passes
    assert out.is_dir() and not any(out.iterdir())  # the write probe is gone


def test_unfinished_saves_count_as_room(tmp_path, monkeypatch):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}"])
    need = checkpoint_bytes(cfg, 1)
    killed = tmp_path / "checkpoints" / ".step_00000004.tmp" / "state"
    killed.mkdir(parents=True)
    (killed / "shard.safetensors").write_bytes(b"x" * 1000)
    monkeypatch.setattr(run_dir, "free_bytes", lambda path: need - 1000)
    check_output_dir(cfg, 1)
    monkeypatch.setattr(run_dir, "free_bytes", lambda path: need - 1001)
    with pytest.raises(RunDirError, match="with 0.00 GB of unfinished saves"):
        check_output_dir(cfg, 1)


def test_data_path_without_shards_is_refused_before_start_up(tmp_path, capsys):
    empty, out = tmp_path / "shards", tmp_path / "run"
    empty.mkdir()
    code, err = launch(capsys, f"train.output_dir={out}", f"data.path={empty}")
    assert_one_line_error(code, err, "data.path", f"no shards found at '{empty}'")
    assert not out.exists()
    for name in ("a.tar", "b.tar"):
        (empty / name).write_bytes(b"")  # 2 shards cannot feed 3 loader workers
    code, err = launch(capsys, f"train.output_dir={out}", f"data.path={empty}", "data.num_workers=3")
    assert_one_line_error(code, err, "2 shards cannot feed 1 data-parallel rank(s) x 3 loader worker(s)")
    assert not out.exists()


def test_refusals_leave_an_existing_run_directory_untouched(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(tmp_path)
    monkeypatch.setattr(run_dir, "free_bytes", lambda path: 0)
    code, err = launch(capsys, f"train.output_dir={tmp_path}")
    assert code == 2 and snapshot(tmp_path) == before
