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
from megamoe.data.loader import ShardLoader, build_loader
from megamoe.data.video_latents import VideoToLatents
from megamoe.device import rng_states, set_rng_states
from megamoe.model.activation_checkpointing import apply_activation_checkpointing
from megamoe.model.dit import build_model, count_parameters
from megamoe.model.weights import load_diffusers_weights, write_diffusers_weights
from megamoe.moe.diagnostics import RoutingDiagnostics
from megamoe.moe.layer import moe_layers, routers_after_step
from megamoe.parallel.parallelize import build_sharded_model, parallelize
from megamoe.parallel.topology import Topology
from megamoe.train.checkpoint import load_checkpoint, save_checkpoint
from megamoe.train.engine import EMA, build_engine, resync_lr
from megamoe.train.logging import RunLogger
from megamoe.train.objective import loss_weights, training_loss
from megamoe.train.resilience import (STOP_REQUEST, StepAgreement, inject_nan, local_grads_finite,
                                      poison_if_nonfinite, slow_save)


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
    """The ranks that hold different tokens of the global batch: data x context parallel, and the
    tensor-parallel ranks too under sequence parallelism (every rank then, as pipeline size is 1).
    Without SP the TP ranks of a group hold the same tokens and must be counted once."""
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_parallel_size > 1:
        return dist.group.WORLD
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


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

    The flow loss is the same on the ranks of one TP/CP group (the prediction is gathered), so
    this is its data-parallel mean. Router losses are per shard; their mean over shards is what
    the objective optimizes (see train/objective.py), and the total is rebuilt from the means as
    flow + sum of weight x part, which is each rank's `loss` when nothing is sharded.
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
    if cfg.train.init_from:
        # Loading reads whole tensors: build the whole model, load it, then keep this rank's shard.
        model = build_model(cfg.model, topology.device, initialize=False)
        load_diffusers_weights(model, cfg.train.init_from)
        if max(layout.tensor_parallel_size, layout.context_parallel_size, layout.expert_parallel_size) > 1:
            parallelize(model, layout)
    else:  # each rank allocates and draws only its shard of the weights
        model = build_sharded_model(cfg, topology.device)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    log.info(f"model: {count_parameters(build_model(cfg.model, 'meta')) / 1e6:.2f}M parameters, "
             f"{topology.world_size} rank(s) as {topology.describe()}"
             f"{', sequence parallel' if layout.sequence_parallel and layout.tensor_parallel_size > 1 else ''}, "
             f"device {topology.device.type}")
    engine = build_engine(model, cfg)
    ema = EMA(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    loader, to_latents = build_data(cfg, topology)

    start_step = 0
    agreement = StepAgreement(topology.device, cfg.train.max_nonfinite_steps)
    if resume_from is not None:
        rank_state = load_checkpoint(engine, resume_from, topology, ema)
        agreement.load_state_dict(rank_state)
        resync_lr(engine)
        start_step = rank_state["step"]
        loader.load_state_dict(rank_state["data"], restart=cfg.data.restart_stream_on_resume)
        set_rng_states(rank_state["rng"], topology.device)
        log.info(f"resumed from {resume_from} at step {start_step}")

    def checkpoint(step):
        def export(state_dict, directory):
            write_diffusers_weights(state_dict, cfg.model, directory)
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
            batch = next(loader)
            if to_latents is not None:
                batch = to_latents(batch)
            latents = batch["latents"].to(topology.device, non_blocking=True)
            latents = inject_nan(latents, done, topology.dp_rank)  # test hook; a no-op unless its variable is set
            text = batch["text"].to(topology.device, non_blocking=True)
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
        else:  # routing statistics and EMA of a skipped step would carry its NaNs forward
            routers_after_step(engine.module, sum_over_token_shards(cfg))
            if ema is not None:
                ema.update(engine.module)
        if diagnose:
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

