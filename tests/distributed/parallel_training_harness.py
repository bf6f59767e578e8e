"""Train a few steps through the real DeepSpeed engine at any parallel layout, on a global batch
that a single process can reproduce, so the two runs can be compared number for number.

The real data loader splits its streams by data-parallel rank, so a 1-process run never sees the
global batch of a 4-rank run. Here every step's global batch is a pure function of (seed, step),
cut into `slices` micro-batches; slice i is trained with the noise generator of
`step_generator(seed, i, step)`. A run with data-parallel size D takes slices D at a time:
rank d trains slices d*A .. d*A+A-1 as A = slices / D accumulation micro-batches. The
single-process reference (D = 1) trains all of them as accumulation micro-batches, and DeepSpeed
averages accumulated gradients exactly as it averages data-parallel ones, so both runs take the
same optimizer steps (the same clipping included) if the parallel layout is correct.

Everything else is the production path: config validation, `parallelize`, `build_engine` (ZeRO,
expert-aware groups, clipping, LR schedule), and the training loop's own `train_step` (loss,
backward, step, step agreement, the MoE step hooks' router updates, the EMA when
train.ema_decay > 0) and metric reductions.

A token whose k-th and (k+1)-th best expert (score plus aux-free bias) are within fp32 rounding of
each other may pick different experts in two layouts that sum in a different order; from then on
the runs legitimately part. Each run therefore also reports the smallest such top-k margin it saw
(`min_top_k_margin`), so a test can tell such a tie from a parallelism bug.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from megamoe.config import Config, DataConfig, DiffusionConfig, ModelConfig, MoEConfig, OptimConfig, ParallelConfig

SMALL_MOE = ModelConfig(
    dim=32,
    num_layers=2,
    num_heads=4,
    ffn_dim=64,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=16,
    rope_max_seq_len=32,
    moe=MoEConfig(
        num_experts=4, layers="all", router="linear", top_k=2, num_shared_experts=1, z_loss=0.01, diagnostics_every=0
    ),
)
"""Two MoE blocks of 4 experts (top-2) and a shared expert. Only per-token router losses (z): a
sharded run computes router losses per sequence shard, and only token means are unchanged by that."""
FRAMES, SIZE, TEXT_LEN = 2, 8, 5  # 2 x 4 x 4 = 32 tokens per sample with patch (1, 2, 2)


def make_config(
    parallel: dict,
    model: ModelConfig = SMALL_MOE,
    steps: int = 4,
    zero_stage: int = 2,
    grad_clip: float = 0.05,
    micro_batch_size: int = 2,
    seed: int = 0,
    ema_decay: float = 0.0,
) -> Config:
    """A run config; grad_clip is small enough that clipping acts on most steps."""
    return Config(
        model=model,
        parallel=ParallelConfig(**parallel),
        data=DataConfig(micro_batch_size=micro_batch_size, text_len=TEXT_LEN),
        diffusion=DiffusionConfig(text_dropout=0.25),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, grad_clip=grad_clip, zero_stage=zero_stage, weight_decay=0.01),
        train=dataclasses.replace(Config().train, steps=steps, seed=seed, ema_decay=ema_decay),
    )


def global_batch(cfg: Config, step: int, slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole step's batch: [slices * micro_batch_size, ...] latents and text, from (seed, step)."""
    g = torch.Generator().manual_seed(1_000_003 * (cfg.train.seed + 1) + step)
    n, m = slices * cfg.data.micro_batch_size, cfg.model
    latents = torch.randn(n, m.in_channels, FRAMES, SIZE, SIZE, generator=g)
    text = torch.randn(n, TEXT_LEN, m.text_dim, generator=g)
    return latents, text


def build_reference_model(cfg: Config):
    """The single-process model every layout starts from (same seed on every rank)."""
    from megamoe.model.dit import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # proj_out starts at zero, which would leave the trunk without gradient at step 1
        torch.nn.init.normal_(model.proj_out.weight, std=0.1)
        torch.nn.init.normal_(model.proj_out.bias, std=0.1)
    from megamoe.model.activation_checkpointing import apply_activation_checkpointing

    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)  # as the training loop does
    return model


def record_top_k_margins() -> list[float]:
    """From now on in this process, append the smallest top-k margin of every token-choice routing:
    min over tokens of (k-th - (k+1)-th highest of scores + expert_bias), the selection's distance
    from a tie. Wraps `select_top_k`, so it sees the very tensors the router selects from."""
    from megamoe.moe.routers import token_choice

    margins, select = [], token_choice.select_top_k

    def recording(logits, cfg, expert_bias=None, replay=lambda picked: picked):
        probs, routing_map, scores, picked = select(logits, cfg, expert_bias, replay)
        choice = scores if expert_bias is None else scores + expert_bias
        if 0 < cfg.top_k < choice.shape[-1] and choice.shape[0]:  # else nothing to choose
            ranked = choice.detach().topk(cfg.top_k + 1, dim=-1).values
            margins.append((ranked[:, -2] - ranked[:, -1]).min().item())
        return probs, routing_map, scores, picked

    token_choice.select_top_k = recording
    return margins


def train_worker(rank: int, world: int, cfg: Config, slices: int, out_file: str) -> None:
    """One rank of a harness run; rank 0 saves losses, grad norms, the full weights and EMA, and the
    smallest top-k margin over all ranks. Leaves the process as it found it (see `run`)."""
    from megamoe.moe.routers import token_choice

    environ, threads, select = dict(os.environ), torch.get_num_threads(), token_choice.select_top_k
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        _train(rank, world, cfg, slices, out_file)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        token_choice.select_top_k = select


def _train(rank: int, world: int, cfg: Config, slices: int, out_file: str) -> None:
    from megamoe.config_checks import validate
    from megamoe.parallel.parallelize import full_state_dict, parallelize
    from megamoe.parallel.reductions import mean_over_token_shards
    from megamoe.parallel.topology import destroy_distributed, init_distributed
    from megamoe.train.engine import EMA, build_engine
    from megamoe.train.moe_step_hooks import step_hooks_for
    from megamoe.train.objective import weighted_total
    from megamoe.train.resilience import StepAgreement
    from megamoe.train.step import step_generator, train_step

    validate(cfg, world_size=world)  # only layouts a user can launch
    margins = record_top_k_margins()
    topology = init_distributed(cfg.parallel, torch.device("cpu"))
    if slices % topology.dp_size:
        raise ValueError(f"{slices} slices cannot be split over data-parallel size {topology.dp_size}")
    accum = slices // topology.dp_size
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
    model = build_reference_model(cfg)
    parallelize(model, cfg.parallel)
    engine = build_engine(model, cfg)
    ema = EMA(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    agreement = StepAgreement(topology.device, cfg.train.max_nonfinite_steps)
    hooks = step_hooks_for(cfg, engine.module)
    engine.train()
    mb = cfg.data.micro_batch_size

    def micro_batches(step: int):
        """This rank's slices of the step's global batch, each with the generator of its slice."""
        latents, text = global_batch(cfg, step, slices)
        for a in range(accum):
            index = topology.dp_rank * accum + a
            rows = slice(index * mb, (index + 1) * mb)
            yield latents[rows], text[rows], step_generator(cfg.train.seed, index, step)

    history = {"loss": [], "grad_norm": [], "flow": []}
    for step in range(cfg.train.steps):
        outcome = train_step(engine, cfg, step + 1, micro_batches(step), agreement, hooks, ema)
        assert not outcome.skipped and not outcome.stop
        means = mean_over_token_shards(outcome.losses, cfg.parallel)
        history["loss"].append(weighted_total(cfg, means))
        history["flow"].append(means["flow"])
        norm = engine.get_global_grad_norm()  # None under ZeRO-0, which does not report it
        history["grad_norm"].append(float("nan") if norm is None else float(norm))
    weights = full_state_dict(engine.module)  # collective
    averaged = full_state_dict(engine.module, ema.state_dict()) if ema is not None else {}
    min_margin = torch.tensor(min(margins, default=float("inf")))
    torch.distributed.all_reduce(min_margin, op=torch.distributed.ReduceOp.MIN)  # every rank's tokens
    if rank == 0:
        torch.save(
            {
                **history,
                "weights": {k: v.clone() for k, v in weights.items()},
                "ema": {k: v.clone() for k, v in averaged.items()},
                "min_top_k_margin": min_margin.item(),
            },
            out_file,
        )
    destroy_distributed()


def run(cfg: Config, world: int, slices: int, out_file) -> dict:
    """Train `cfg` on `world` spawned gloo ranks; returns rank 0's results: per-step "loss", "flow",
    "grad_norm"; the full "weights" and "ema"; "min_top_k_margin" over every rank and step.
    A world of one runs in this process: the same code, without a new process's imports."""
    from tests.distributed.launch_helpers import spawn

    if world == 1:
        train_worker(0, 1, cfg, slices, str(out_file))
    else:
        spawn(train_worker, world, cfg, slices, str(out_file))
    return torch.load(out_file, weights_only=True)


def compare_with_single_process(cfg: Config, world: int, slices: int, tmp_path) -> tuple[dict, dict]:
    """(parallel run, single-process reference) on the same global batches."""
    parallel = run(cfg, world, slices, tmp_path / "parallel.pt")
    reference = run(dataclasses.replace(cfg, parallel=ParallelConfig()), 1, slices, tmp_path / "reference.pt")
    return parallel, reference
