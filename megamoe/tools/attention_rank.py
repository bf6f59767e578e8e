"""ARank (gamma-MoD): the blocks whose self-attention maps have the lowest rank, to convert to
mixture-of-depths blocks (`model.mod.layers`, megamoe/model/mixture_of_depths.py).

Luo et al. 2024, "gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language
Models" (arXiv:2410.13859): a block whose attention maps have low rank mixes its tokens in few
distinct ways, so many of its tokens are redundant there and can skip it. ARank is that rank,
averaged over heads and calibration samples; the blocks of lowest ARank are converted.

    python -m megamoe.tools.attention_rank CHECKPOINT [--convert N] [--batches 4] [--noise-level 0.5]
        [--rtol 0.01] [--max-queries 256] [--weights model|ema]

CHECKPOINT: a `checkpoints/step_*` directory written by launcher/pretrain.py (dense or MoE). The
calibration batches are the run's first training batches (posttrain/trained_model.data_batches),
noised to `--noise-level` (0 = data, 1 = noise) with a fixed seed, text kept. Printed: each block's
ARank, and the `model.mod.layers=...` override naming the N blocks of lowest ARank among the dense
ones (an MoE block cannot route tokens; default N: half of them). Convert with
`launcher/pretrain.py ... model.mod.layers=... train.init_from=CHECKPOINT/weights`: the routers are
drawn from train.seed, every other weight loads.

Rank of one map A = softmax(q k^T / sqrt(head_dim)) [Lq, L] (one head of one sample): the number of
its singular values above rtol times the largest. For long sequences A is restricted to
`--max-queries` evenly spaced query rows (the rank of a set of rows is at most the whole map's),
which keeps the SVD at O(Lq^2 L). Bad input prints one line `error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from megamoe.config import ModelConfig
from megamoe.diffusion.flow import TIMESTEP_SCALE, interpolate
from megamoe.moe.layer import moe_layer_indices


def attention_map_rank(q: torch.Tensor, k: torch.Tensor, rtol: float, max_queries: int) -> torch.Tensor:
    """q, k [B, heads, L, head_dim] -> [B, heads] numerical rank of each softmax attention map (fp32)."""
    rows = torch.linspace(0, q.shape[2] - 1, min(max_queries, q.shape[2])).round().long()
    logits = q[:, :, rows].float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
    singular = torch.linalg.svdvals(logits.softmax(-1))  # [B, heads, min(Lq, L)], descending
    return (singular > rtol * singular[..., :1]).sum(-1)


class _RankProbe:
    """Stands in for a self-attention's `attend`: records the maps' ranks, then attends as before."""

    def __init__(self, inner, rtol: float, max_queries: int):
        self.inner, self.rtol, self.max_queries = inner, rtol, max_queries
        self.ranks: list[torch.Tensor] = []

    def __call__(self, q, k, v):
        self.ranks.append(attention_map_rank(q, k, self.rtol, self.max_queries).flatten().float())
        return self.inner(q, k, v)


@torch.no_grad()
def attention_ranks(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    noise_level: float = 0.5,
    rtol: float = 0.01,
    max_queries: int = 256,
    seed: int = 0,
) -> list[float]:
    """ARank of each block of a WanDiT: the mean rank of its self-attention maps over every head and
    sample of `batches` ((latents [B, C, F, H, W], text [B, L, text_dim]) pairs), the latents noised to
    `noise_level` with noise drawn from `seed`. One process; the model is left as it was."""
    probes = []
    for block in model.blocks:
        probes.append(_RankProbe(block.attn1.attend, rtol, max_queries))
        block.attn1.attend = probes[-1]
    generator = torch.Generator().manual_seed(seed)
    try:
        for latents, text in batches:
            s = torch.full((latents.shape[0],), float(noise_level))
            noisy = interpolate(latents, torch.randn(latents.shape, generator=generator), s)
            model(noisy, s * TIMESTEP_SCALE, text)
    finally:
        for block, probe in zip(model.blocks, probes):
            block.attn1.attend = probe.inner
    return [torch.cat(p.ranks).mean().item() for p in probes]


def blocks_to_convert(ranks: list[float], count: int, candidates: set[int] | None = None) -> list[int]:
    """The `count` blocks of lowest ARank among `candidates` (default: every block), in block order
    (ties: the earlier block first)."""
    blocks = range(len(ranks)) if candidates is None else sorted(candidates)
    order = sorted(blocks, key=lambda i: (ranks[i], i))
    return sorted(order[:count])


def convertible_blocks(cfg: ModelConfig) -> set[int]:
    """The blocks a mixture-of-depths router may go in: the dense ones (config_checks refuses MoD in
    an MoE block, whose router statistics would count tokens the block never saw)."""
    moe = moe_layer_indices(cfg) if cfg.moe.num_experts > 0 else set()
    return set(range(cfg.num_layers)) - moe


FLAG_RULES = (
    ("batches", lambda v: v >= 1, "must be >= 1"),
    ("max_queries", lambda v: v >= 1, "must be >= 1"),
    ("rtol", lambda v: 0 < v < 1, "must be in (0, 1) (a fraction of the largest singular value)"),
    ("noise_level", lambda v: 0 <= v <= 1, "must be in [0, 1] (0 = data, 1 = noise)"),
)


def load_checkpoint_model(checkpoint: str, weights: str):
    """(fp32 eval model, Config) of a training checkpoint, dense or MoE."""
    from pathlib import Path

    from megamoe.config import from_yaml_text
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights
    from megamoe.posttrain.trained_model import PostTrainError, check_not_model_folder
    from megamoe.train.checkpoint import CheckpointError, inspect_checkpoint

    path = Path(checkpoint)
    if path.exists() and not path.is_dir():
        raise PostTrainError(
            f"'{path}' is a file, not a checkpoint; pass a checkpoints/step_* directory of launcher/pretrain.py"
        )
    check_not_model_folder(path)
    try:
        cfg = from_yaml_text(inspect_checkpoint(path)["config"])
    except CheckpointError as exc:
        raise PostTrainError(str(exc)) from None
    folder = path / ("ema_weights" if weights == "ema" else "weights")
    if not folder.is_dir():
        raise PostTrainError(f"checkpoint '{path}' has no {folder.name}/ folder; use --weights model")
    model = build_model(cfg.model, initialize=False)
    load_diffusers_weights(model, folder)
    return model.float().eval(), cfg


def main(argv: list[str] | None = None) -> int:
    from megamoe.posttrain.trained_model import PostTrainError, data_batches

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoints/step_* directory of launcher/pretrain.py")
    parser.add_argument("--convert", type=int, default=None, help="blocks to name (default: half of them)")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches of the run's training data")
    parser.add_argument("--noise-level", type=float, default=0.5, help="noise level s of the calibration inputs")
    parser.add_argument("--rtol", type=float, default=0.01, help="singular values above rtol x the largest count")
    parser.add_argument("--max-queries", type=int, default=256, help="query rows of each map whose rank is taken")
    parser.add_argument("--weights", choices=("model", "ema"), default="model")
    args = parser.parse_args(argv)
    try:
        for name, holds, rule in FLAG_RULES:  # `not holds` also refuses a NaN
            if not holds(getattr(args, name)):
                raise PostTrainError(f"--{name.replace('_', '-')} {rule}, got {getattr(args, name)}")
        model, cfg = load_checkpoint_model(args.checkpoint, args.weights)
        dense = convertible_blocks(model.cfg)
        moe = f"model.moe.layers={model.cfg.moe.layers}"
        if not dense:
            raise PostTrainError(
                f"every block of '{args.checkpoint}' is an MoE block ({moe}), and mixture-of-depths routes tokens "
                f"only in dense blocks: nothing to convert; rank a checkpoint with dense blocks"
            )
        count = max(1, len(dense) // 2) if args.convert is None else args.convert
        if not 1 <= count <= len(dense):
            what = "the model's blocks" if len(dense) == len(model.blocks) else f"its dense blocks; {moe} are MoE"
            raise PostTrainError(f"--convert must be in 1..{len(dense)} ({what}), got {count}")
        batches = data_batches(cfg, args.batches)
    except PostTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ranks = attention_ranks(model, batches, args.noise_level, args.rtol, args.max_queries)
    for i, rank in enumerate(ranks):
        print(f"block {i:3d}  ARank {rank:8.2f}" + ("" if i in dense else "  (MoE: not convertible)"))
    print("model.mod.layers=" + ",".join(str(i) for i in blocks_to_convert(ranks, count, dense)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
