"""One optimizer step, top to bottom: `train_step`.

    for each micro-batch: noise level, noise, text dropout -> model -> velocity loss (+ router losses)
                          -> DeepSpeed backward -> DeepSpeed step (the optimizer steps at the last one)
    -> every rank agrees: stop? step skipped (non-finite)? bad input somewhere?
    -> after the step: hooks (router updates, diagnostics) and the EMA, or, when skipped, hooks only

The training loop (loop.py) calls it once per step, and so does the distributed test harness
(tests/distributed/parallel_training_harness.py), which compares a parallel run with the
one-process run: both go through this very function.

What a model needs around the step beyond this (MoE: recording routings for diagnostics on the
last micro-batch, router updates after an applied step, dropping what a skipped step gathered)
is a `StepHooks` object, called at fixed points; the step knows nothing of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from megamoe.config import Config
from megamoe.deepspeed_adapter import skip_micro_step
from megamoe.parallel.reductions import any_rank
from megamoe.train.objective import training_loss
from megamoe.train.resilience import StepAgreement, local_grads_finite, poison_if_nonfinite
from megamoe.train.stop_signals import STOP_REQUEST

MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Generator]
"""(latents [B, C, F, H, W], text [B, L, text_dim], the generator its noise levels, noise and text dropout
are drawn from). The training loop passes one generator to all micro-batches of a step (drawn in
turn); the test harness one per micro-batch, keyed by the data-parallel rank it stands for."""


def step_generator(seed: int, dp_rank: int, step: int) -> torch.Generator:
    """The RNG of one step on one data-parallel rank, a pure function of its coordinates.

    Noise, noise levels and text dropout of step k never depend on what ran before, so a
    resumed run draws exactly what the uninterrupted run drew. Keyed by data-parallel rank
    (not global rank) so that ranks sharing a batch in a model-parallel group agree.
    """
    state = np.random.SeedSequence([seed, dp_rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class StepHooks:
    """Fixed points of a step where model-specific bookkeeping runs; these do nothing.

    `step` is the 1-based number of the step being taken. The MoE model's hooks are in
    train/moe_step_hooks.py.
    """

    def before_forward(self, step: int, last_micro_batch: bool) -> None:
        """Before each micro-batch's forward."""

    def after_forward(self, step: int, last_micro_batch: bool) -> None:
        """After each micro-batch's forward, before its backward."""

    def after_step(self, step: int) -> dict | None:
        """After an applied optimizer step (every rank); may return a report for the logger."""
        return None

    def after_skipped_step(self, step: int) -> None:
        """After a step that every rank skipped: drop what the step's forwards gathered."""


@dataclass
class StepOutcome:
    """What one step did, the same on every rank except `losses`."""

    losses: dict[str, torch.Tensor]
    """Each loss part ('flow' and the router losses, unweighted) as this rank's mean over the step's
    micro-batches: 0-dim fp32 tensors, not yet reduced over ranks."""
    skipped: bool
    """Every rank skipped the update: a non-finite loss or gradient norm on some rank."""
    stop: bool
    """A stop signal (preemption) reached some rank: checkpoint and leave after this step."""
    report: dict | None = None
    """What the hooks returned after an applied step (MoE: a diagnostics report), else None."""


def train_step(
    engine,
    cfg: Config,
    step: int,
    micro_batches: Iterator[MicroBatch],
    agreement: StepAgreement,
    hooks: StepHooks | None = None,
    ema=None,
) -> StepOutcome:
    """Take optimizer step `step` (1-based) from `cfg.train.grad_accum` micro-batches. Collective.

    engine: the DeepSpeed engine (its `.module` is the WanDiT); it steps the optimizer, clips and
    advances the LR schedule at the last micro-batch. agreement: the run's StepAgreement, which
    raises AgreedStop on every rank when some rank held bad input during the step, and
    NonFiniteError after train.max_nonfinite_steps skipped steps in a row. hooks: the model's
    StepHooks (None: none). ema: an EMA updated after an applied step, or None. Whether this rank
    received a stop signal (SIGTERM, SIGUSR1) is read from the process's flag,
    stop_signals.STOP_REQUEST, at the end of the step.
    """
    module, accum = engine.module, cfg.train.grad_accum
    hooks = hooks if hooks is not None else StepHooks()
    sums: dict[str, torch.Tensor] = {}
    grads_bad = False
    for micro in range(accum):
        last = micro == accum - 1
        latents, text, generator = next(micro_batches)
        hooks.before_forward(step, last)
        loss, parts = training_loss(engine, module, latents, text, cfg, generator)
        hooks.after_forward(step, last)
        engine.backward(poison_if_nonfinite(loss))
        if last and cfg.optim.zero_stage == 0:  # gradients are all-reduced by now
            grads_bad = any_rank(not local_grads_finite(module), agreement.device)
        if grads_bad:
            # Without ZeRO, DeepSpeed runs the plain optimizer, which never checks gradients:
            # leave the optimizer (and LR schedule, as ZeRO does) out of this step, and count the
            # micro-step as step() would, so the next accumulation boundary stays in place.
            engine.zero_grad()
            skip_micro_step(engine)
        else:
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        for name, value in parts.items():
            sums[name] = sums[name] + value if name in sums else value.float()
    # ZeRO-1/2 skip the update themselves when the global gradient norm is not finite (see
    # resilience.poison_if_nonfinite); one all-reduce per step makes every rank agree on that
    # and on a preemption signal that may have reached only some ranks so far.
    stop, skipped = agreement.end_of_step(step, STOP_REQUEST.requested, grads_bad or not engine.was_step_applied())
    report = None
    if skipped:
        hooks.after_skipped_step(step)  # what the forwards gathered would carry the NaNs forward
    else:
        report = hooks.after_step(step)
        if ema is not None:
            ema.update(module)
    return StepOutcome({name: total / accum for name, total in sums.items()}, skipped, stop, report)
