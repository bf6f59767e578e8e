"""DeepSpeed engine: AdamW, ZeRO optimizer-state sharding, mixed precision, clipping.

megamoe hands DeepSpeed a plain module and its data-parallel groups (through the
megatron-core adapter) and lets it own the optimizer step: gradient all-reduce or
reduce-scatter, ZeRO-1/2 partitioning of fp32 master weights and Adam moments, bf16
mixed precision, gradient accumulation and global-norm clipping. Torch's AdamW is used
(`torch_adam`) because DeepSpeed's fused CPU Adam needs a compiled extension.
"""

from __future__ import annotations

import logging
import math

import torch

from megamoe.config import Config
from megamoe.deepspeed_adapter import build_expert_aware_engine
from megamoe.parallel.topology import DeepSpeedMPU


def deepspeed_config(cfg: Config) -> dict:
    o, t = cfg.optim, cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "zero_optimization": {"stage": o.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "gradient_clipping": o.grad_clip,
        "steps_per_print": 10**12,  # megamoe prints its own progress line
        "wall_clock_breakdown": False,
    }


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_expert_parameter(param: torch.nn.Parameter) -> bool:
    """Tagged by `apply_expert_parallel` the way DeepSpeed tags its own experts."""
    return getattr(param, "allreduce", True) is False


def build_engine(model: torch.nn.Module, cfg: Config):
    """Wrap `model` in a DeepSpeed engine; returns the engine (its `.module` is `model`)."""
    import deepspeed

    from megamoe.deepspeed_adapter import import_muon_with_compile_deferred

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    import_muon_with_compile_deferred()

    def schedule(optimizer):
        o = cfg.optim
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, o.warmup_steps, cfg.train.steps, o.min_lr_ratio)
        )

    params = [p for p in model.parameters() if p.requires_grad]
    if any(is_expert_parameter(p) for p in params):
        return _expert_aware_engine(model, params, schedule, cfg)
    if any(is_expert_parameter(p) for p in model.parameters()):
        # Frozen experts (a LoRA-Mixer fine-tune of an MoE model): nothing to reduce over their groups,
        # but DeepSpeed still broadcasts every parameter at start-up, experts over their own group.
        from megamoe.parallel.topology import share_expert_groups_with_deepspeed

        share_expert_groups_with_deepspeed(cfg.parallel.expert_parallel_size)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, lr_scheduler=schedule, mpu=DeepSpeedMPU(), config=deepspeed_config(cfg)
    )
    return engine


def _expert_aware_engine(model, params, schedule, cfg: Config):
    """A DeepSpeed engine that reduces and shards expert parameters over the expert-data-parallel group.

    DeepSpeed switches on its expert handling (MoE parameter groups, ZeRO partitions over the
    expert-data-parallel group, expert-aware gradient norms) only when it finds its own MoE
    module classes in the model. megamoe's experts carry DeepSpeed's own tags instead, and the
    engine is told it has experts (`deepspeed_adapter.build_expert_aware_engine`); everything after
    that is DeepSpeed's code. (Its MoE checkpoint files are bypassed: megamoe saves each rank's
    experts itself, see train/checkpoint.py.) Tested against the same run with replicated experts in
    tests/distributed/test_expert_parallel_training.py.
    """
    from megamoe.parallel.topology import share_expert_groups_with_deepspeed

    share_expert_groups_with_deepspeed(cfg.parallel.expert_parallel_size)
    # ZeRO-1/2 counts a parameter in the gradient norm on tensor-parallel rank 0 only unless it
    # is marked model-parallel. Experts are not split by TP but folded over TP ranks: the
    # experts on TP rank 1 are other experts than on TP rank 0, so each rank must count its
    # own (summing over DP x CP, then TP, visits every expert exactly once).
    for param in params:
        if is_expert_parameter(param):
            param.model_parallel = True
    return build_expert_aware_engine(
        model, params, schedule, DeepSpeedMPU(), deepspeed_config(cfg), cfg.model.moe.num_experts
    )


def resync_lr(engine) -> None:
    """Set the optimizer's LR from the schedule at the restored step, after a resume.

    The checkpoint stores the LR the old run computed; if the new run changed
    `train.steps` (to extend training, say) the schedule changed with it, and the first
    resumed step must already use the new schedule's value.
    """
    scheduler = engine.lr_scheduler
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


class EMA:
    """Exponential moving average of the weights, in fp32, of what this rank holds.

    After parallelize() a rank's module holds its TP blocks, its EP experts and the replicated
    rest, and after each ZeRO-1/2 step it holds those whole (ZeRO partitions only the optimizer
    state). So each rank averages exactly its own parameters without communication, and the
    shadow tensors are sharded like the parameters they follow: `shadow[name]` has the shape of
    the rank's `name`, and split_of(param) says which block of the full tensor it is. The
    checkpoint stores them that way (train/sharded_state.py, kind `ema`), so the EMA is resharded
    like the weights, and `parallelize.full_state_dict(model, ema.state_dict())` is the
    one-process EMA.

    decay: shadow <- decay * shadow + (1 - decay) * weight after each applied optimizer step.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
