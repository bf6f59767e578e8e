"""The training loop: one step reads top to bottom.

batch (latents, text; raw video is encoded first) -> noise level, noise, text dropout -> model -> velocity loss ->
DeepSpeed backward/step -> EMA -> metrics -> checkpoint.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megamoe.config import Config
from megamoe.data.loader import DataError, ShardLoader, StreamStateError, build_loader
from megamoe.data.video_latents import VideoToLatents
from megamoe.device import rng_states, set_rng_states
from megamoe.model.activation_checkpointing import apply_activation_checkpointing
from megamoe.model.dit import build_model, count_parameters
from megamoe.model.weights import WeightsError
from megamoe.moe.diagnostics import RoutingDiagnostics
from megamoe.moe.layer import moe_layers, routers_after_step, routers_discard_step
from megamoe.parallel.parallelize import build_sharded_model, token_batch_group
from megamoe.parallel.sharded_weights import export_weights, init_from
from megamoe.parallel.topology import Topology
from megamoe.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megamoe.train.engine import EMA, build_engine, resync_lr
from megamoe.train.logging import RunLogger
from megamoe.train.objective import loss_weights, training_loss
from megamoe.train.resilience import (STOP_REQUEST, StepAgreement, inject_nan, local_grads_finite,
                                      poison_if_nonfinite, slow_save, stop_together)
from megamoe.train.run_dir import RunDirError

BAD_INPUT = (CheckpointError, DataError, StreamStateError, RunDirError, WeightsError)
"""Errors that mean the user's input (data, checkpoint, output directory) is bad: one line and exit 2."""


def step_generator(seed: int, dp_rank: int, step: int) -> torch.Generator:
    """The RNG of one step on one data-parallel rank, a pure function of its coordinates.

    Noise, noise levels and text dropout of step k never depend on what ran before, so a
    resumed run draws exactly what the uninterrupted run drew. Keyed by data-parallel rank
    (not global rank) so that ranks sharing a batch in a model-parallel group agree.
    """
    state = np.random.SeedSequence([seed, dp_rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def build_data(cfg: Config, topology: Topology) -> tuple[ShardLoader, VideoToLatents | None]:
    """The rank's batch loader and, for raw video shards, the frozen encoders that turn pixels into latents.

    Shards are split by data-parallel rank (see megamoe/data/worker.py): ranks of one tensor or
    context parallel group read the same samples.
    """
    to_latents = None
    if cfg.data.path is not None and cfg.data.format == "video":
        to_latents = VideoToLatents.from_config(cfg, topology.device)
    compression = to_latents.compression if to_latents is not None else (4, 16)
    return build_loader(cfg, topology.dp_rank, topology.dp_size, compression), to_latents


def token_shard_group(cfg: Config):
    """The ranks that hold different tokens of the global batch (see parallelize.token_batch_group)."""
    return token_batch_group(cfg.parallel)


def sum_over_token_shards(cfg: Config):
    """`reduce` for statistics additive over tokens (expert loads, routing diagnostics): each rank's
    routers see only its shard of the sequence under CP / SP, so the sum runs over every shard."""
    group = token_shard_group(cfg)

    def reduce(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, group=group)
        return value

    return reduce


def mean_loss_parts(cfg: Config, parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged losses of a step: each part averaged over every token shard and data-parallel rank.

    Every part is the same on the ranks of one TP/CP group (the prediction is gathered, router
    losses reduce their statistics over the shards; see train/objective.py), so this is its
    data-parallel mean; the total is rebuilt from the means as flow + sum of weight x part.
    """
    group = token_shard_group(cfg)
    names = sorted(parts)
    stacked = torch.stack([parts[n].float() for n in names])
    dist.all_reduce(stacked, group=group)
    means = {n: v.item() for n, v in zip(names, stacked.cpu() / dist.get_world_size(group))}
    weights = loss_weights(cfg)
    total = means["flow"] + sum(weights[n] * means[n] for n in names if n != "flow" and weights.get(n, 0.0) > 0)
    return {"loss": total, **means}


def data_counts_over_data_parallel(loader: ShardLoader) -> dict[str, int]:
    """Samples read and failures by cause ('bad_<cause>'), summed over data-parallel ranks."""
    mine = {"samples_seen": loader.samples_seen(), **{f"bad_{c}": n for c, n in loader.bad_data_counts().items()}}
    everyone = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(everyone, mine, group=parallel_state.get_data_parallel_group())
    return dict(sum((Counter(c) for c in everyone), Counter()))


class Batches:
    """This rank's (latents, text) for each micro-step, with bad input held for the step's agreement.

    A rank that finds bad input in the middle of a step (too many bad samples) must still go
    through the step's collectives, or the other ranks would wait in them: it feeds zeros shaped
    like its last batch, holds the error in `agreement`, and every rank stops with it at the end of
    the step, without saving (so that step's update is never kept). The first batch is read at
    start-up, where the ranks agree on it (`stop_together`), so a stand-in always has a shape.
    """

    def __init__(self, loader: ShardLoader, to_latents: VideoToLatents | None, device: torch.device,
                 agreement: StepAgreement):
        self.loader, self.to_latents, self.device, self.agreement = loader, to_latents, device, agreement
        self._first = self._read()
        self._last = self._first

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.loader)
        if self.to_latents is not None:
            batch = self.to_latents(batch)
        return (batch["latents"].to(self.device, non_blocking=True), batch["text"].to(self.device, non_blocking=True))

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._first is not None:
            batch, self._first = self._first, None
            return batch
        if self.agreement.problem is None:
            try:
                self._last = self._read()
                return self._last
            except BAD_INPUT as exc:
                self.agreement.hold(exc)
        return tuple(torch.zeros_like(t) for t in self._last)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (collective)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def build_diagnostics(cfg: Config, module) -> RoutingDiagnostics | None:
    if not moe_layers(module) or cfg.model.moe.diagnostics_every == 0:
        return None
    return RoutingDiagnostics(module, cfg.model.moe, reduce=sum_over_token_shards(cfg))


def fp32_master_getter(cfg: Config):
    """Under bf16, router updates must be measured on DeepSpeed's fp32 master copies."""
    if cfg.train.precision != "bf16":
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return lambda name, param: safe_get_full_fp32_param(param)


def train(cfg: Config, topology: Topology, resume_from=None) -> list[dict]:
    """Run (or continue) training; returns the logged scalars of rank 0 (empty elsewhere)."""
    log = RunLogger(cfg.train.output_dir, cfg.train.steps, cfg.logging.tensorboard, enabled=topology.is_main)

    torch.manual_seed(cfg.train.seed)  # the global RNG a run checkpoints; the weights do not draw from it
    layout = cfg.parallel
    loading = bool(cfg.train.init_from) and resume_from is None
    # Each rank allocates only its shard of the weights, and draws it from the seed unless something
    # fills it next: train.init_from (each rank reads only its blocks; dense into MoE upcycles, drawing
    # the gates and shared-expert noise by coordinate) or the checkpoint it resumes from.
    model = build_sharded_model(cfg, topology.device, initialize=not loading and resume_from is None)
    if loading:
        log.info(init_from(model, cfg.train.init_from, cfg.train.seed))
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    log.info(f"model: {count_parameters(build_model(cfg.model, 'meta')) / 1e6:.2f}M parameters, "
             f"{topology.world_size} rank(s) as {topology.describe()}"
             f"{', sequence parallel' if layout.sequence_parallel and layout.tensor_parallel_size > 1 else ''}, "
             f"device {topology.device.type}")
    engine = build_engine(model, cfg)
    ema = EMA(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    # Start-up work a rank may fail alone ends in an agreement: every rank stops, or none (see resilience.py).
    with stop_together(topology.device, BAD_INPUT):
        loader, to_latents = build_data(cfg, topology)

    start_step = 0
    agreement = StepAgreement(topology.device, cfg.train.max_nonfinite_steps)
    with stop_together(topology.device, BAD_INPUT):
        if resume_from is not None:
            rank_state = load_checkpoint(engine, resume_from, topology, ema)
            agreement.load_state_dict(rank_state)
            resync_lr(engine)
            start_step = rank_state["step"]
            log.resume_at(start_step)  # the steps after it are redone: log each once
            loader.load_state_dict(rank_state["data"], restart=cfg.data.restart_stream_on_resume)
            set_rng_states(rank_state["rng"], topology.device)
        batches = Batches(loader, to_latents, topology.device, agreement)
    if resume_from is not None:
        log.info(f"resumed from {resume_from} at step {start_step}")

    def checkpoint(step):
        def export(module, directory, tensors=None):  # collective: each rank writes what it holds
            export_weights(module, directory, tensors)
            slow_save(step)  # test hook (a save killed mid-write); does nothing unless its variable is set

        state = {"step": step, "data": loader.state_dict(), "rng": rng_states(topology.device),
                 **agreement.state_dict()}
        path = save_checkpoint(engine, cfg, step, state, topology, export, ema)
        log.info(f"saved checkpoint {path}")
        return path

    # Nominal: with data.tokens_per_batch > 0 the batch size varies by bucket.
    samples_per_step = cfg.data.micro_batch_size * cfg.train.grad_accum * topology.dp_size
    diagnostics = build_diagnostics(cfg, engine.module)
    master_weights = fp32_master_getter(cfg)
    history = []
    stop_signals = STOP_REQUEST.install()  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit 0
    engine.train()
    for step in range(start_step, cfg.train.steps):
        done = step + 1
        generator = step_generator(cfg.train.seed, topology.dp_rank, step)
        diagnose = diagnostics is not None and done % cfg.model.moe.diagnostics_every == 0
        sums: dict[str, torch.Tensor] = {}
        grads_bad = False
        for micro in range(cfg.train.grad_accum):
            last_micro = micro == cfg.train.grad_accum - 1
            latents, text = next(batches)
            latents = inject_nan(latents, done, topology.dp_rank)  # test hook; a no-op unless its variable is set
            if diagnose and last_micro:
                diagnostics.enable_recording(True)
            loss, parts = training_loss(engine, engine.module, latents, text, cfg, generator)
            if diagnose and last_micro:
                diagnostics.enable_recording(False)
                diagnostics.snapshot_router_params(master_weights)
            engine.backward(poison_if_nonfinite(loss))
            if last_micro and cfg.optim.zero_stage == 0:  # gradients are all-reduced by now
                grads_bad = any_rank(not local_grads_finite(engine.module), topology.device)
            if grads_bad:
                # Without ZeRO, DeepSpeed runs the plain optimizer, which never checks gradients:
                # leave the optimizer (and LR schedule, as ZeRO does) out of this step, and count the
                # micro-step as step() would, so the next accumulation boundary stays in place.
                engine.zero_grad()
                engine.micro_steps += 1
            else:
                engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            for name, value in {"loss": loss.detach(), **parts}.items():
                sums[name] = sums[name] + value if name in sums else value.float()
        # ZeRO-1/2 skip the update themselves when the global gradient norm is not finite (see
        # resilience.poison_if_nonfinite); one all-reduce per step makes every rank agree on that
        # and on a preemption signal that may have reached only some ranks so far.
        stop, skipped = agreement.end_of_step(done, stop_signals.requested,
                                              grads_bad or not engine.was_step_applied())
        if skipped:
            log.info(f"warning: step {done}: non-finite loss or gradient norm; step skipped, weights unchanged "
                     f"({agreement.streak} in a row, {agreement.skipped_steps} in all)")
            # Whatever the step's forwards gathered (router statistics, diagnostics recordings) is
            # dropped, not kept for the next step: it would carry the NaNs forward.
            routers_discard_step(engine.module)
            if diagnostics is not None:
                diagnostics.discard_step()
        else:
            routers_after_step(engine.module, sum_over_token_shards(cfg))
            if ema is not None:
                ema.update(engine.module)
        if diagnose and not skipped:
            diagnostics.measure_bf16_loss(master_weights)
            log.log_diagnostics(diagnostics.compute(done), done)

        if done % cfg.logging.every_steps == 0 or done == cfg.train.steps:
            means = mean_loss_parts(cfg, {k: v / cfg.train.grad_accum for k, v in sums.items() if k != "loss"})
            grad_norm = engine.get_global_grad_norm()
            scalars = {
                "loss": means.pop("loss"),
                "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped_steps": agreement.skipped_steps,
                **{f"loss_{name}": value for name, value in means.items()},
            }
            log.log_step(done, scalars, samples_per_step, data_counts_over_data_parallel(loader))
            history.append({"step": done, **scalars})
        every, exit_interval = cfg.checkpoint.every_steps, cfg.train.exit_interval
        leaving = bool(exit_interval) and done % exit_interval == 0
        if (every and done % every == 0) or done == cfg.train.steps or leaving or stop:
            path = checkpoint(done)
        if stop and done < cfg.train.steps:
            log.info(f"preempted: saved checkpoint {path} at step {done}; continue with --resume auto")
            break
        if leaving and done < cfg.train.steps:
            log.info(f"exit interval: stopping after step {done}; continue with --resume latest")
            break
    loader.close()
    log.close()
    return history

