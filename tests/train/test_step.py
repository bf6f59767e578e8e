"""train_step and TrainState in one process (a gloo world of one), without starting ranks.

The distributed tests compare whole parallel runs through `train_step` with the one-process run;
these check the step itself against the plain sequence of engine calls it stands for, its skipped
step, and the state contract of a checkpoint's rank file.
"""

import dataclasses
import os

import pytest
import torch

from megamoe.moe.layer import routers_after_step
from megamoe.parallel.reductions import sum_over_token_shards
from megamoe.train.engine import EMA, build_engine
from megamoe.train.moe_step_hooks import step_hooks_for
from megamoe.train.objective import training_loss
from megamoe.train.resilience import StepAgreement
from megamoe.train.state import TrainState
from megamoe.train.step import StepHooks, step_generator, train_step
from tests.distributed.parallel_training_harness import SMALL_MOE, build_reference_model, global_batch, make_config

ACCUM = 2


@pytest.fixture(scope="module")
def world_of_one():
    from megamoe.config import ParallelConfig
    from megamoe.parallel.topology import destroy_distributed, init_distributed

    environ = dict(os.environ)  # init_distributed sets RANK, WORLD_SIZE, MASTER_* for its world of one
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    try:
        yield init_distributed(ParallelConfig(), torch.device("cpu"))
    finally:
        destroy_distributed()
        os.environ.clear()
        os.environ.update(environ)


def config(zero_stage: int):
    moe = dataclasses.replace(SMALL_MOE.moe, bias_balancing=True, bias_update_rate=0.01)  # router state across steps
    cfg = make_config({}, model=dataclasses.replace(SMALL_MOE, moe=moe), zero_stage=zero_stage, ema_decay=0.9)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=ACCUM))


def micro_batches(cfg, step: int, poison: bool = False):
    latents, text = global_batch(cfg, step, ACCUM)
    if poison:
        latents = torch.full_like(latents, float("nan"))
    mb = cfg.data.micro_batch_size
    for a in range(ACCUM):
        rows = slice(a * mb, (a + 1) * mb)
        yield latents[rows], text[rows], step_generator(cfg.train.seed, a, step)


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Recorder(StepHooks):
    """Counts the calls `train_step` makes at each fixed point."""

    def __init__(self):
        self.calls = []

    def before_forward(self, step, last):
        self.calls.append(("before_forward", step, last))

    def after_forward(self, step, last):
        self.calls.append(("after_forward", step, last))

    def after_step(self, step):
        self.calls.append(("after_step", step))
        return {"step": step}

    def after_skipped_step(self, step):
        self.calls.append(("after_skipped_step", step))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_train_step_is_the_plain_sequence_of_engine_calls(world_of_one, zero_stage):
    """Three steps of train_step (with the MoE hooks and the EMA) leave the same weights, router
    biases and EMA as the engine driven by hand, and report the micro-batch mean of each loss part."""
    cfg = config(zero_stage)
    torch.manual_seed(0)
    ours, plain = build_engine(build_reference_model(cfg), cfg), build_engine(build_reference_model(cfg), cfg)
    ours_ema, plain_ema = EMA(ours.module, 0.9), EMA(plain.module, 0.9)
    agreement, hooks = StepAgreement(torch.device("cpu"), 3), step_hooks_for(cfg, ours.module)
    for step in range(3):
        outcome = train_step(ours, cfg, step + 1, micro_batches(cfg, step), agreement, hooks, ours_ema)
        parts = []
        for latents, text, generator in micro_batches(cfg, step):
            loss, part = training_loss(plain, plain.module, latents, text, cfg, generator)
            plain.backward(loss)
            plain.step()
            parts.append(part)
        routers_after_step(plain.module, sum_over_token_shards(cfg.parallel))
        plain_ema.update(plain.module)
        assert not outcome.skipped and not outcome.stop and outcome.report is None  # diagnostics are off
        assert outcome.losses.keys() == parts[0].keys()
        for name, value in outcome.losses.items():
            assert torch.equal(value, sum(p[name].float() for p in parts) / ACCUM), name
    for name, tensor in weights(plain.module).items():
        assert torch.equal(weights(ours.module)[name], tensor), name
    assert any(".expert_bias" in name for name in weights(ours.module))  # the hooks' update is compared
    for name, tensor in plain_ema.shadow.items():
        assert torch.equal(ours_ema.shadow[name], tensor), name


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_nonfinite_step_is_skipped_and_the_next_one_trains(world_of_one, zero_stage):
    cfg = config(zero_stage)
    torch.manual_seed(0)
    engine = build_engine(build_reference_model(cfg), cfg)
    ema, agreement, hooks = EMA(engine.module, 0.9), StepAgreement(torch.device("cpu"), 3), Recorder()
    train_step(engine, cfg, 1, micro_batches(cfg, 0), agreement, hooks, ema)
    before, ema_before = weights(engine.module), {k: v.clone() for k, v in ema.shadow.items()}

    hooks.calls.clear()
    outcome = train_step(engine, cfg, 2, micro_batches(cfg, 1, poison=True), agreement, hooks, ema)
    assert outcome.skipped and outcome.report is None
    assert agreement.skipped_steps == 1 and agreement.streak == 1
    assert all(torch.equal(weights(engine.module)[k], v) for k, v in before.items())
    assert all(torch.equal(ema.shadow[k], v) for k, v in ema_before.items())
    assert hooks.calls == [
        ("before_forward", 2, False),
        ("after_forward", 2, False),
        ("before_forward", 2, True),
        ("after_forward", 2, True),
        ("after_skipped_step", 2),
    ]

    # The accumulation boundary is where it was: the next step's two micro-batches make one update.
    outcome = train_step(engine, cfg, 3, micro_batches(cfg, 2), agreement, hooks, ema)
    assert not outcome.skipped and outcome.report == {"step": 3} and agreement.streak == 0
    assert engine.is_gradient_accumulation_boundary() is False  # the next micro-step starts a new step
    assert not all(torch.equal(weights(engine.module)[k], v) for k, v in before.items())


class StubLoader:
    """Stands for the ShardLoader: its state and how it was restored."""

    def __init__(self, position):
        self.position, self.restarted = position, None

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state, restart=False):
        self.position, self.restarted = state["position"], restart


@pytest.mark.parametrize("restart", [False, True])
def test_train_state_round_trip(restart):
    saved = TrainState(StubLoader(17), StepAgreement(torch.device("cpu"), 5), None, torch.device("cpu"))
    saved.step, saved.agreement.skipped_steps, saved.agreement.streak = 12, 3, 1
    state = saved.state_dict()
    expected_draw = torch.rand(4)  # what the global RNG draws next, from the saved state

    torch.manual_seed(1234)
    restored = TrainState(
        StubLoader(0), StepAgreement(torch.device("cpu"), 5), None, torch.device("cpu"), restart_stream=restart
    )
    restored.load_state_dict(state)
    assert restored.step == 12 and restored.agreement.skipped_steps == 3 and restored.agreement.streak == 1
    assert restored.loader.position == 17 and restored.loader.restarted is restart
    assert torch.equal(torch.rand(4), expected_draw)
    assert set(state) == {"step", "data", "rng", "skipped_steps", "nonfinite_streak"}  # the RankState keys
