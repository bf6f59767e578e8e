"""Cluster faults on 2 gloo ranks under torchrun: preemption signals, a save killed mid-write,
a rank killed mid-run under --max-restarts, and non-finite steps. Each is checked against an
uninterrupted run (for a skipped step: against the weights of the step before, and against a
run resumed right after the skip, which never held the skipped step's router statistics)."""

import json
import os
import signal
import socket

import pytest
import torch

from tests.distributed.launch_helpers import (
    REPO,
    assert_stopped_together,
    pretrain,
    read_metrics,
    start_pretrain,
    steps_logged,
    wait_until,
    worker_pids,
)

TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ["model.num_layers=2", "model.dim=32", "model.ffn_dim=64", "data.micro_batch_size=4"]
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2"]
RACE = [*MOE, "model.moe.router=expert_race"]
BIAS = [
    *MOE,
    "model.moe.router=linear",
    "model.moe.num_null_experts=1",
    "model.moe.bias_balancing=true",
    "model.moe.bias_update_rate=0.01",
]


def common(out, data_cache, steps, *extra):
    return [
        "--config",
        TINY,
        f"train.output_dir={out}",
        f"data.cache_dir={data_cache}",
        f"train.steps={steps}",
        "logging.every_steps=1",
        "optim.warmup_steps=2",
        *extra,
    ]


def checkpoints(out) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"  # the sharded export's index


def weights(checkpoint):
    from megamoe.model.weights import read_state_dict

    return read_state_dict(checkpoint / "weights")


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "weights differ"


REFERENCE_STEPS = 24
"""How far the uninterrupted reference run goes (of a 400-step schedule): past any step the faults below compare."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    """The run the fault tests must reproduce: 400-step schedule, stopped after REFERENCE_STEPS,
    a checkpoint every 3 steps. Saving changes nothing in the run (each step's noise is a function
    of its coordinates), so runs that save at other steps compare with it."""
    full = tmp_path_factory.mktemp("uninterrupted") / "run"
    extra = [*SMALL, "checkpoint.every_steps=3", "checkpoint.keep_last=10", f"train.exit_interval={REFERENCE_STEPS}"]
    pretrain(common(full, data_cache, 400, *extra))
    return full


def test_sigterm_to_torchrun_saves_and_resume_auto_continues_exactly(tmp_path, data_cache, uninterrupted):
    part = tmp_path / "part"
    args = common(part, data_cache, 400, *SMALL, "checkpoint.every_steps=0")  # only the preemption saves
    run = start_pretrain(args + ["--resume", "auto"])  # a fresh start: nothing to resume yet
    wait_until(lambda: steps_logged(part) >= 3, "3 steps", run)
    run.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
    out, err = run.communicate(timeout=600)

    saved = checkpoints(part)
    assert len(saved) == 1 and saved[0].startswith("step_"), saved  # complete, no temp directory left
    stopped = int(saved[0][5:])
    assert 3 <= stopped < 400
    assert f"preempted: saved checkpoint {part / 'checkpoints' / saved[0]} at step {stopped}" in out
    assert max(read_metrics(part)) == stopped  # no rank went on past the agreed step
    assert "forcefully" not in err  # the workers exited on their own, before torchrun's kill timeout
    assert run.returncode != 0 and "got signal: 15" in err  # torchrun re-raises a signal it forwarded

    assert stopped + 3 <= REFERENCE_STEPS, f"stopped at step {stopped}: raise REFERENCE_STEPS"
    stop_at = [f"train.exit_interval={stopped + 3}"]  # compare three steps after the preemption
    resumed = pretrain(args + stop_at + ["--resume", "auto"])
    assert f"resumed from {part / 'checkpoints' / saved[0]} at step {stopped}" in resumed.stdout
    reference, continued = read_metrics(uninterrupted), read_metrics(part)
    for step in range(stopped + 1, stopped + 4):
        for name in ("loss", "grad_norm", "lr"):
            assert continued[step][name] == reference[step][name], (step, name)


def test_a_signal_reaching_one_rank_stops_all_after_the_same_step(tmp_path, data_cache):
    out_dir = tmp_path / "run"
    run = start_pretrain(common(out_dir, data_cache, 400, *SMALL, "checkpoint.every_steps=0"))
    wait_until(lambda: steps_logged(out_dir) >= 3, "3 steps", run)
    os.kill(worker_pids(run)[1], signal.SIGUSR1)  # rank 1 only; rank 0 (which logs) never gets it
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-4000:]
    saved = checkpoints(out_dir)
    assert len(saved) == 1
    stopped = int(saved[0][5:])
    assert f"at step {stopped}; continue with --resume auto" in out and max(read_metrics(out_dir)) == stopped
    ckpt = out_dir / "checkpoints" / saved[0]
    assert (ckpt / "rank_00000.pt").is_file() and (ckpt / "rank_00001.pt").is_file()


def test_save_killed_mid_write_is_skipped_by_resume_auto(tmp_path, data_cache):
    out_dir = tmp_path / "run"
    args = common(out_dir, data_cache, 6, *SMALL, "checkpoint.every_steps=2")
    # the checkpoint of step 4 stalls after its weights are written, before its rename
    run = start_pretrain(args + ["--resume", "auto"], faults={"MEGAMOE_TEST_SLOW_SAVE": "4:600"})
    stalled = out_dir / "checkpoints" / ".step_00000004.tmp" / "weights" / INDEX_NAME
    wait_until(stalled.is_file, "the save of step 4", run)
    pids = worker_pids(run)

    # A second run on the directory (a restart while the first job's ranks still run) is refused, naming
    # the holder (rank 0 of the first run), on every rank; the first run's unfinished save stays.
    second = pretrain(args + ["--resume", "auto"], check=False)
    assert_stopped_together(second, "is in use by another run", f"host {socket.gethostname()}, pid {pids[0]},")
    assert stalled.is_file()
    for pid in [run.pid, *pids.values()]:
        os.kill(pid, signal.SIGKILL)
    assert "INJECTED a stall of 600 s in the save of step 4" in run.communicate()[0]
    assert checkpoints(out_dir) == [".step_00000004.tmp", "step_00000002"]

    resumed = pretrain(args + ["--resume", "auto"])
    assert f"resumed from {out_dir / 'checkpoints' / 'step_00000002'} at step 2" in resumed.stdout
    assert checkpoints(out_dir) == ["step_00000002", "step_00000004", "step_00000006"]  # the stale temp dir is gone


def test_max_restarts_brings_a_killed_rank_back_with_identical_final_weights(tmp_path, data_cache, uninterrupted):
    job = tmp_path / "job"
    extra = [*SMALL, "checkpoint.every_steps=3", "checkpoint.keep_last=10", "train.exit_interval=12"]
    # The save of step 6 stalls a few seconds, so the job is surely still running when rank 1 is killed,
    # after step 5 is logged: the restart resumes from step 3 and redoes steps 4 and 5.
    run = start_pretrain(
        common(job, data_cache, 400, *extra) + ["--resume", "auto"],
        faults={"MEGAMOE_TEST_SLOW_SAVE": "6:5"},
        torchrun_args=["--max-restarts", "1"],
    )
    wait_until(lambda: steps_logged(job) >= 5, "step 5", run)
    os.kill(worker_pids(run)[1], signal.SIGKILL)
    out, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-4000:]
    assert "resumed from" in out  # the restarted workers continued from a checkpoint
    assert "INJECTED a stall of 5 s in the save of step 6" in out

    final = "checkpoints/step_00000012"
    assert_same_weights(weights(job / final), weights(uninterrupted / final))
    # metrics.jsonl holds each step once, as the uninterrupted run logged it
    logged = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    reference = read_metrics(uninterrupted)
    assert [m["step"] for m in logged] == list(range(1, 13))
    for m in logged:
        for name in ("loss", "grad_norm", "lr"):
            assert m[name] == reference[m["step"]][name], (m["step"], name)


def router_buffers(state) -> dict:
    """The routers' non-gradient state in a weights file: Expert Race thresholds, aux-free biases."""
    return {
        k: v
        for k, v in state.items()
        if ".router." in k and k.rsplit(".", 1)[1] in ("threshold", "threshold_initialized", "expert_bias")
    }


def test_nonfinite_step_is_skipped_on_every_rank_and_leaves_no_trace(tmp_path, data_cache):
    """Expert Race, ZeRO-2: the skipped step changes no weight and no threshold and gets no routing
    report, and its K-th scores (NaN) never reach the threshold, which stays finite for good."""
    out_dir = tmp_path / "run"
    extra = (
        *SMALL,
        *RACE,
        "optim.zero_stage=2",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=10",
        "model.moe.diagnostics_every=1",
    )
    # ZeRO-2 reduces gradients during backward; the NaN batch reaches data-parallel rank 0 only.
    result = pretrain(common(out_dir, data_cache, 4, *extra), faults={"MEGAMOE_TEST_NAN_AT_STEPS": "3"})
    ckpts = out_dir / "checkpoints"
    assert_same_weights(weights(ckpts / "step_00000002"), weights(ckpts / "step_00000003"))  # no update
    after, before = weights(ckpts / "step_00000004"), weights(ckpts / "step_00000003")
    assert not all(after[k].equal(before[k]) for k in after)  # step 4 trains again
    metrics = read_metrics(out_dir)
    assert [metrics[s]["skipped_steps"] for s in range(1, 5)] == [0, 0, 1, 1]
    assert "warning: step 3: non-finite loss or gradient norm; step skipped" in result.stdout
    assert "skipped_steps 1" in result.stdout
    reports = [json.loads(line)["step"] for line in (out_dir / "diagnostics.jsonl").read_text().splitlines()]
    assert reports == [1, 2, 4]  # none for the skipped step

    thresholds = {s: router_buffers(weights(ckpts / f"step_{s:08d}")) for s in range(1, 5)}
    assert len(thresholds[4]) == 4  # threshold and its flag in each of the 2 MoE blocks
    for step, buffers in thresholds.items():
        assert all(torch.isfinite(v.float()).all() for v in buffers.values()), (step, buffers)
    assert not all(thresholds[4][k].equal(thresholds[3][k]) for k in thresholds[3])  # it kept learning after the skip


def test_nonfinite_step_without_zero_is_skipped_and_leaves_the_bias_untouched(tmp_path, data_cache):
    """Aux-free bias balancing with a null expert, without ZeRO (the loop's own skip): the next bias
    update counts the loads of its own step only. Reference: a run resumed from the checkpoint
    written right after the skip, which holds no statistics of the skipped step; the two must end
    bit-identical, expert biases included (an exact resume across the skip)."""
    out_dir = tmp_path / "run"
    extra = (*SMALL, *BIAS, "optim.zero_stage=0", "checkpoint.every_steps=1", "checkpoint.keep_last=10")
    pretrain(common(out_dir, data_cache, 4, *extra), faults={"MEGAMOE_TEST_NAN_AT_STEPS": "3"})
    ckpts = out_dir / "checkpoints"
    assert_same_weights(weights(ckpts / "step_00000002"), weights(ckpts / "step_00000003"))
    assert read_metrics(out_dir)[4]["skipped_steps"] == 1
    biases, before = router_buffers(weights(ckpts / "step_00000004")), router_buffers(weights(ckpts / "step_00000003"))
    assert len(biases) == 2 and not all(biases[k].equal(before[k]) for k in biases)

    resumed = tmp_path / "resumed"  # no NaN hook needed: the bad step is behind the checkpoint
    result = pretrain(common(resumed, data_cache, 4, *extra) + ["--resume", str(ckpts / "step_00000003")])
    assert f"resumed from {ckpts / 'step_00000003'} at step 3" in result.stdout
    assert_same_weights(weights(resumed / "checkpoints" / "step_00000004"), weights(ckpts / "step_00000004"))


def test_consecutive_nonfinite_steps_stop_the_run_naming_the_step(tmp_path, data_cache):
    out_dir = tmp_path / "run"
    result = pretrain(
        common(out_dir, data_cache, 8, *SMALL, "train.max_nonfinite_steps=2"),
        nproc=None,
        check=False,
        faults={"MEGAMOE_TEST_NAN_AT_STEPS": "3,4"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "steps 3..4 all had a non-finite loss" in errors[0] and "stopped at step 4" in errors[0]
    assert max(read_metrics(out_dir)) == 3  # step 3 was skipped (and logged), step 4 stopped the run
