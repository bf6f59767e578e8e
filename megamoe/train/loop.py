"""The training loop: build, restore, then one `train_step` per step with logging and checkpoints.

    record the resolved config -> build the rank's shard of the model -> DeepSpeed engine -> data
    -> restore a checkpoint -> each step: train_step (train/step.py) -> every N steps: validation
    loss, sample grid (train/validation.py) -> progress line -> checkpoint -> stop when asked

Everything specific to a model or a layout lives elsewhere: what the rank holds is applied by
`build_sharded_model` (parallel/parallelize.py), the MoE bookkeeping around each step is a
`StepHooks` object (train/moe_step_hooks.py), the reductions over ranks are in
parallel/reductions.py, and what a checkpoint holds besides the engine is the `TrainState`.
"""

from __future__ import annotations

import math
import time

import torch

from megamoe.config import Config, sample_interval, val_interval
from megamoe.data.loader import DataError, ShardLoader, StreamStateError, build_loader
from megamoe.data.video_latents import VideoToLatents
from megamoe.model.activation_checkpointing import apply_activation_checkpointing
from megamoe.model.dit import build_model, count_parameters
from megamoe.model.weights import WeightsError
from megamoe.parallel.parallelize import build_sharded_model
from megamoe.parallel.reductions import mean_over_token_shards, sum_counts_over_data_parallel
from megamoe.parallel.sharded_weights import export_weights, init_from
from megamoe.parallel.topology import Topology
from megamoe.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megamoe.train.engine import EMA, build_engine
from megamoe.train.logging import RunLogger
from megamoe.train.moe_step_hooks import step_hooks_for
from megamoe.train.objective import weighted_total
from megamoe.train.resilience import StepAgreement, stop_together
from megamoe.train.run_dir import RunDirError
from megamoe.train.state import TrainState
from megamoe.train.step import StepOutcome, step_generator, train_step
from megamoe.train.stop_signals import STOP_REQUEST
from megamoe.train.throughput import peak_flops, train_flops_per_token
from megamoe.train.validation import caption_embeddings, clip_grid, read_held_out, sample_clips, validation_loss


def data_parallel_group():
    """The process group of this rank's data-parallel peers (same tensor and context parallel coordinate)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


BAD_INPUT = (CheckpointError, DataError, StreamStateError, RunDirError, WeightsError)
"""Errors that mean the user's input (data, checkpoint, output directory) is bad: one line and exit 2."""


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


class Batches:
    """This rank's (latents, text) for each micro-step, with bad input held for the step's agreement.

    A rank that finds bad input in the middle of a step (too many bad samples) must still go
    through the step's collectives, or the other ranks would wait in them: it feeds zeros shaped
    like its last batch, holds the error in `agreement`, and every rank stops with it at the end of
    the step, without saving (so that step's update is never kept). The first batch is read at
    start-up, where the ranks agree on it (`stop_together`), so a stand-in always has a shape.
    """

    def __init__(
        self,
        loader: ShardLoader,
        to_latents: VideoToLatents | None,
        device: torch.device,
        agreement: StepAgreement,
        patch_size=(1, 2, 2),
    ):
        self.loader, self.to_latents, self.device, self.agreement = loader, to_latents, device, agreement
        self.patch_size = tuple(patch_size)
        self.video_tokens = 0
        """Patch tokens of the batches read so far (the progress line's tokens/s)."""
        self._first = self._read()
        self._last = self._first
        self.sample_shape = tuple(self._first[0].shape[1:])
        """One latent sample's (C, F, H, W) in the first batch: the shape of the sample grid's clips."""

    def tokens_per_sample(self) -> int:
        """Patch tokens of one sample of the first batch's shape."""
        c, *grid = self.sample_shape
        return math.prod(n // p for n, p in zip(grid, self.patch_size))

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.loader)
        if self.to_latents is not None:
            batch = self.to_latents(batch)
        latents = batch["latents"]
        self.video_tokens += latents.shape[0] * math.prod(n // p for n, p in zip(latents.shape[2:], self.patch_size))
        return (latents.to(self.device, non_blocking=True), batch["text"].to(self.device, non_blocking=True))

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


def describe_run(cfg: Config, topology: Topology) -> str:
    """The start-up line: model size, ranks and how they split the work, device."""
    layout = cfg.parallel
    sequence_parallel = layout.sequence_parallel and layout.tensor_parallel_size > 1
    return (
        f"model: {count_parameters(build_model(cfg.model, 'meta')) / 1e6:.2f}M parameters, "
        f"{topology.world_size} rank(s) as {topology.describe()}{', sequence parallel' if sequence_parallel else ''}, "
        f"device {topology.device.type}"
    )


def progress_scalars(cfg: Config, engine, outcome: StepOutcome, state: TrainState) -> dict[str, float]:
    """The logged scalars of a step (collective): the loss and its parts averaged over ranks, LR,
    gradient norm and skipped steps. The total is rebuilt from the averaged parts."""
    means = mean_over_token_shards(outcome.losses, cfg.parallel)
    grad_norm = engine.get_global_grad_norm()
    return {
        "loss": weighted_total(cfg, means),
        "lr": engine.get_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "skipped_steps": state.agreement.skipped_steps,
        **{f"loss_{name}": v for name, v in means.items()},
    }


def data_counts(loader: ShardLoader, batches: Batches) -> dict[str, int]:
    """Samples and video tokens read, and failures by cause ('bad_<cause>'), summed over data-parallel
    ranks (collective)."""
    mine = {
        "samples_seen": loader.samples_seen(),
        "video_tokens": batches.video_tokens,
        **{f"bad_{c}": n for c, n in loader.bad_data_counts().items()},
    }
    return sum_counts_over_data_parallel(mine)


def train(cfg: Config, topology: Topology, resume_from=None) -> list[dict]:
    """Run (or continue) training; returns the logged scalars of rank 0 (empty elsewhere)."""
    log = RunLogger(cfg.train.output_dir, cfg.train.steps, cfg.logging.tensorboard, enabled=topology.is_main)

    torch.manual_seed(cfg.train.seed)  # the global RNG a run checkpoints; the weights do not draw from it
    loading = bool(cfg.train.init_from) and resume_from is None
    # Each rank allocates only its shard of the weights, and draws it from the seed unless something
    # fills it next: train.init_from (each rank reads only its blocks; dense into MoE upcycles, drawing
    # the gates and shared-expert noise by coordinate) or the checkpoint it resumes from.
    model = build_sharded_model(cfg, topology.device, initialize=not loading and resume_from is None)
    if loading:
        log.info(f"train.init_from: {init_from(model, cfg.train.init_from, cfg.train.seed)}")
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    log.info(describe_run(cfg, topology))
    engine = build_engine(model, cfg)
    ema = EMA(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    # Start-up work a rank may fail alone ends in an agreement: every rank stops, or none (see resilience.py).
    with stop_together(topology.device, BAD_INPUT):
        loader, to_latents = build_data(cfg, topology)
        # Read only by a run that reaches an evaluation step (the intervals are 0 past train.steps);
        # every rank reads the same list.
        val_every, sample_every = val_interval(cfg), sample_interval(cfg)
        held_out = read_held_out(cfg, to_latents) if val_every else None
        prompts = caption_embeddings(cfg, to_latents) if sample_every else None
    agreement = StepAgreement(topology.device, cfg.train.max_nonfinite_steps)
    state = TrainState(loader, agreement, ema, topology.device, restart_stream=cfg.data.restart_stream_on_resume)
    with stop_together(topology.device, BAD_INPUT):
        if resume_from is not None:
            load_checkpoint(engine, resume_from, topology, state)
            log.resume_at(state.step)  # the steps after it are redone: log each once
        batches = Batches(loader, to_latents, topology.device, agreement, cfg.model.patch_size)
    if resume_from is not None:
        log.info(f"resumed from {resume_from} at step {state.step}")
    if topology.is_main:
        log.info(log.record_config(cfg, state.step))
    if topology.device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(topology.device))
        flops = train_flops_per_token(cfg.model, batches.tokens_per_sample(), cfg.data.text_len)
        log.count_flops(flops, peak[0] if peak else None)
        log.info(
            f"throughput: {flops / 1e9:.3f} GFLOP per video token and step (train/throughput.py); MFU against "
            f"{peak[1] if peak else 'no peak: this GPU is not in the table, so no MFU'}"
        )

    hooks = step_hooks_for(cfg, engine.module)
    # Nominal: with data.tokens_per_batch > 0 the batch size varies by bucket.
    samples_per_step = cfg.data.micro_batch_size * cfg.train.grad_accum * topology.dp_size
    every, exit_interval = cfg.checkpoint.every_steps, cfg.train.exit_interval
    history = []
    STOP_REQUEST.install()  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit 0
    engine.train()
    while state.step < cfg.train.steps:
        step = state.step + 1  # the step being taken, 1-based as logged and checkpointed
        generator = step_generator(cfg.train.seed, topology.dp_rank, state.step)  # keyed by steps completed
        micro_batches = ((*next(batches), generator) for _ in range(cfg.train.grad_accum))
        outcome = train_step(engine, cfg, step, micro_batches, agreement, hooks, ema)
        state.step = step
        if outcome.skipped:
            log.info(
                f"warning: step {step}: non-finite loss or gradient norm; step skipped, weights unchanged "
                f"({agreement.streak} in a row, {agreement.skipped_steps} in all)"
            )
        if outcome.report is not None:
            log.log_diagnostics(outcome.report, step)
            log.info(f"step {step}: {outcome.report.depth_line()}")

        started, last = time.perf_counter(), step == cfg.train.steps
        val = None
        if val_every and step % val_every == 0:
            val = validation_loss(
                engine.module, held_out, dp_rank=topology.dp_rank, dp_size=topology.dp_size, group=data_parallel_group()
            )
        if sample_every and step % sample_every == 0:
            clips = sample_clips(engine.module, cfg, prompts, batches.sample_shape, to_latents)
            log.log_samples(step, clip_grid(clips), list(cfg.logging.sample_captions))
        log.exclude_time(time.perf_counter() - started)

        if step % cfg.logging.every_steps == 0 or last or val is not None:
            scalars = progress_scalars(cfg, engine, outcome, state)
            if topology.device.type == "cuda":
                scalars["max_memory_gib"] = torch.cuda.max_memory_allocated(topology.device) / 2**30
            log.log_step(step, scalars, samples_per_step, data_counts(loader, batches), val)
            history.append({"step": step, **scalars, **({"val": val} if val else {})})
        leaving = bool(exit_interval) and step % exit_interval == 0
        if (every and step % every == 0) or step == cfg.train.steps or leaving or outcome.stop:
            path = save_checkpoint(engine, cfg, state, topology, export_weights)
            log.info(f"saved checkpoint {path}")
        if outcome.stop and step < cfg.train.steps:
            log.info(f"preempted: saved checkpoint {path} at step {step}; continue with --resume auto")
            break
        if leaving and step < cfg.train.steps:
            log.info(f"exit interval: stopping after step {step}; continue with --resume latest")
            break
    loader.close()
    log.close()
    return history
