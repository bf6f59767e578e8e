"""metrics.jsonl, diagnostics.jsonl and tensorboard after a resume: each step once, with the values of the
run that carried on, as an uninterrupted run logs them."""

import json

import pytest

from megamoe.train.logging import RunLogger


def scalars(step, run):
    return {"loss": 1.0 / step + run, "lr": 1e-3, "grad_norm": float(step)}


def log_steps(out, steps, run, resume_at=None):
    log = RunLogger(str(out), 6, tensorboard=True, enabled=True)
    if resume_at is not None:
        log.resume_at(resume_at)
    for step in steps:
        log.log_step(step, scalars(step, run), samples_per_step=4, data={"samples_seen": 4 * step})
        with open(out / "diagnostics.jsonl", "a") as f:  # what log_diagnostics appends
            f.write(json.dumps({"step": step, "run": run}) + "\n")
    log.close()


def lines(path):
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("samples_per_s", None)  # a timing
        out.append(record)
    return out


def test_resume_logs_every_step_once_as_the_uninterrupted_run(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    log_steps(full, range(1, 7), run=0)
    log_steps(part, range(1, 6), run=1)  # killed after step 5, its last line cut short
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    log_steps(part, range(4, 7), run=0, resume_at=3)  # resumed from the checkpoint of step 3
    assert [r["step"] for r in lines(part / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    # steps 1-3 from the first run, 4-6 from the resumed one: the uninterrupted run's values from step 4
    assert lines(part / "metrics.jsonl")[3:] == lines(full / "metrics.jsonl")[3:]
    assert [(r["step"], r["run"]) for r in lines(part / "diagnostics.jsonl")] == [
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 0),
        (5, 0),
        (6, 0),
    ]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(part / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    for step, value in loss:
        assert value == pytest.approx(scalars(step, 1 if step <= 3 else 0)["loss"])
