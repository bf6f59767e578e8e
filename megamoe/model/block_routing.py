"""Dr.LLM block routers for the WanDiT: per sample, each block runs 0 (skip), 1 (execute) or 2 (repeat) times.

Dr.LLM (Heakl et al., "Dr.LLM: Dynamic Layer Routing in LLMs", 2025) puts a small router in front of
every block of a frozen model. The router mean-pools the sample's hidden states over W windows of
consecutive tokens, runs a two-layer MLP on each window and averages the logits over the windows,
which pick skip, execute or repeat. Here the router also sees the noise level, as the frozen model's
own timestep embedding (temb): how much of the network a denoising step can spare depends on it.

    paths = BlockPaths(cfg)                        # WanDiT.block_paths when model.block_router.enabled
    x = paths(blocks, x, text, modulation, rope, ctx, shards)     # instead of `for block in blocks`
    paths.last_counts                              # int64 [B, num_layers]: runs of each block per sample
    with fixed_paths(model, counts): model(...)    # run given paths [B, num_layers] instead (path search)
    with recorded_inputs(model) as inputs: ...     # each block's router inputs, for router training

A block's pass runs on only the samples that take it (their rows of the micro-batch), so a skipped
block costs that sample nothing; a repeat runs the block again on its own output. With every count 1
each pass is the plain call on the whole micro-batch: the model is the plain one, bit for bit.

Sequence sharding (context / sequence parallelism): a rank holds a chunk of each sample's tokens, so
the window sums are all-reduced over the shard group before dividing. Every rank of a sample then
holds the same means, takes the same decision, and runs the same passes (Ulysses' all-to-all needs
that). The all-reduce is not differentiable: the routers train in one process (posttrain/block_routers.py).

Expert parallelism: an MoE block's all-to-all spans ranks that hold other samples, whose paths
differ. Before each pass of an MoE block the ranks agree (one all-reduce MAX of two flags over the
world) whether any of them runs it; a rank with none of its samples in that pass runs the block on
one sample and discards the result, so every rank joins each collective the same number of times.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamoe.config import ModelConfig
from megamoe.model.init import ZEROS, Init
from megamoe.moe.layer import MoEFeedForward
from megamoe.moe.routers.base import RoutingContext

SKIP, EXECUTE, REPEAT = 0, 1, 2
"""The router's classes, numbered by how many times the block runs."""
ACTIONS = ("skip", "execute", "repeat")


def block_flops(cfg: ModelConfig, tokens: int, text_tokens: int) -> int:
    """Forward FLOPs (2 per multiply-add) of one dense WanBlock run on one sample of `tokens` video and
    `text_tokens` text tokens: the matrix products and the two attentions, which is what a skip saves
    (the norms and modulation are O(tokens * dim) and left out, as torch's FlopCounterMode leaves them).

    self-attention: q, k, v, o projections 8 L d^2, scores and values 4 L^2 d; cross-attention: q, o
    4 L d^2, k, v over the text 4 L_text d^2, scores and values 4 L L_text d; FFN 4 L d ffn_dim.
    Raises ValueError for MoE models (their blocks' cost depends on the routing)."""
    if cfg.moe.num_experts:
        raise ValueError("block_flops counts dense blocks; count an MoE model's FLOPs with FlopCounterMode")
    d, n, t = cfg.dim, tokens, text_tokens
    return 8 * n * d * d + 4 * n * n * d + 4 * n * d * d + 4 * t * d * d + 4 * n * t * d + 4 * n * d * cfg.ffn_dim


def router_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of one block's router on one sample: its MLP on each window (the pooling is O(L d))."""
    r = cfg.block_router
    windows = r.windows
    return windows * (2 * 2 * cfg.dim * r.hidden_dim + 2 * r.hidden_dim * len(ACTIONS))


def window_means(x: torch.Tensor, offset: int, total: int, windows: int, group=None) -> torch.Tensor:
    """Means of each sample's hidden states over `windows` windows of consecutive tokens: fp32 [B, W, dim].

    x [B, Lc, dim] holds tokens offset .. offset + Lc - 1 of a sequence of `total`; token p falls in
    window p * W // total (W = min(windows, total), so no window is empty). `group`: the ranks holding
    the other chunks of the sequence, whose sums are added (None in one process).
    """
    b, length, dim = x.shape
    w = min(windows, total)
    window_of = torch.arange(offset, offset + length, device=x.device) * w // total
    sums = torch.zeros(b, w, dim, dtype=torch.float32, device=x.device).index_add_(1, window_of, x.float())
    if group is not None:
        dist.all_reduce(sums, group=group)
    counts = torch.bincount(torch.arange(total, device=x.device) * w // total, minlength=w)
    return sums / counts[:, None].float()


def decide(logits: torch.Tensor) -> torch.Tensor:
    """Router logits [B, 3] -> runs int64 [B]: the highest logit's class, execute winning ties, so a
    router whose output is still zero (untrained, see BlockPaths.parameter_inits) executes every block."""
    best = logits.argmax(-1)
    return torch.where(logits[:, EXECUTE] >= logits.max(-1).values, EXECUTE, best)


class BlockRouter(nn.Module):
    """One block's router: windowed means [B, W, dim] and noise feature [B, dim] -> logits [B, 3]
    (skip, execute, repeat). Both inputs are layer-normalised (no affine): the residual stream's scale
    grows with depth, and the router should see its direction. Linear - GELU - Linear on each window,
    logits averaged over the windows, as Dr.LLM."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, len(ACTIONS))

    def forward(self, windows: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        dim = windows.shape[-1]
        h = F.layer_norm(windows.float(), (dim,))
        t = F.layer_norm(noise.float(), (dim,))[:, None].expand_as(h)
        features = torch.cat([h, t], dim=-1).to(self.fc1.weight.dtype)
        return self.fc2(F.gelu(self.fc1(features))).float().mean(1)


class BlockPaths(nn.Module):
    """The block loop with one router per block (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r = cfg.block_router
        self.windows = r.windows
        self.routers = nn.ModuleList(BlockRouter(cfg.dim, r.hidden_dim) for _ in range(cfg.num_layers))
        self.forced: torch.Tensor | None = None
        """Runs [B, num_layers] to take instead of the routers' (set by `fixed_paths`)."""
        self.record: list | None = None
        """When a list, each block's router inputs (windows, noise) are appended (set by `recorded_inputs`)."""
        self.last_counts: torch.Tensor | None = None
        """Runs int64 [B, num_layers] of the last forward."""

    def parameter_inits(self) -> dict[str, Init]:
        """Zero output layers: an untrained router's logits are all zero, which `decide` reads as execute,
        so turning the routers on before training them leaves the model as it was."""
        inits = {}
        for i in range(len(self.routers)):
            inits[f"routers.{i}.fc2.weight"] = ZEROS
            inits[f"routers.{i}.fc2.bias"] = ZEROS
        return inits

    def forward(self, blocks, x, text, modulation, rope, ctx: RoutingContext, shards) -> torch.Tensor:
        """x [B, Lc, dim] (this rank's chunk of each sample's tokens) through `blocks` along each sample's
        path; the other arguments are the blocks' own (WanBlock.forward). Returns x [B, Lc, dim]."""
        b = x.shape[0]
        total = ctx.seq_len * shards.num_shards
        group = shards.group if shards.num_shards > 1 else None
        forced = self.forced
        if forced is not None and forced.shape == (len(blocks),):
            forced = forced.expand(b, -1)
        if forced is not None and tuple(forced.shape) != (b, len(blocks)):
            raise ValueError(
                f"fixed paths have shape {tuple(forced.shape)}; expected [{len(blocks)}] or [{b}, {len(blocks)}]"
            )
        noise = None
        if forced is None or self.record is not None:
            noise = ctx.temb if ctx.temb.ndim == 2 else window_means(ctx.temb, ctx.token_offset, total, 1, group)[:, 0]
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        runs = []
        for i, block in enumerate(blocks):
            if noise is not None:
                with torch.no_grad():
                    windows = window_means(x.detach(), ctx.token_offset, total, self.windows, group)
                    if self.record is not None:
                        self.record.append((windows, noise.detach().float()))
                    counts = decide(self.routers[i](windows, noise)) if forced is None else None
            if forced is not None:
                counts = forced[:, i].to(x.device, torch.long)
            runs.append(counts)
            needed = torch.stack([(counts >= 1).any(), (counts >= 2).any()]).int()
            if synced and isinstance(block.ffn, MoEFeedForward):  # every rank joins the experts' all-to-all
                dist.all_reduce(needed, op=dist.ReduceOp.MAX)
            for p, run in zip((1, 2), needed.tolist()):
                if run:
                    x = _run_rows(block, (counts >= p).nonzero()[:, 0], x, text, modulation, rope, ctx)
        self.last_counts = torch.stack(runs, dim=1)
        return x


def _run_rows(block, rows: torch.Tensor, x, text, modulation, rope, ctx: RoutingContext) -> torch.Tensor:
    """x with `block` applied to the samples `rows` (every sample: the plain call; none: one sample's
    result computed and discarded, for the collectives)."""
    b = x.shape[0]
    if len(rows) == b:
        return block(x, text, modulation, rope, ctx)
    dummy = len(rows) == 0
    picked = torch.zeros(1, dtype=torch.long, device=x.device) if dummy else rows

    def take(t):
        return None if t is None else t.index_select(0, picked)

    sub = dataclasses.replace(
        ctx,
        batch_size=len(picked),
        temb=take(ctx.temb),
        text=take(ctx.text),
        is_null=take(ctx.is_null),
        timestep=take(ctx.timestep),
    )
    y = block(take(x), take(text), take(modulation), rope, sub)
    return x if dummy else x.index_copy(0, rows, y)


@contextlib.contextmanager
def fixed_paths(model: nn.Module, counts: torch.Tensor):
    """Within the block, `model` (a WanDiT with block routers) runs the paths `counts` [B, num_layers]
    (0 skip, 1 execute, 2 repeat; or [num_layers], one path for every sample) instead of its routers' choice."""
    paths = _block_paths(model)
    paths.forced = counts
    try:
        yield
    finally:
        paths.forced = None


@contextlib.contextmanager
def recorded_inputs(model: nn.Module):
    """Yields a list that each forward within the block extends by every block's router inputs, in
    block order: (windows fp32 [B, W, dim], noise fp32 [B, dim])."""
    paths = _block_paths(model)
    paths.record = []
    try:
        yield paths.record
    finally:
        paths.record = None


def _block_paths(model: nn.Module) -> BlockPaths:
    paths = getattr(model, "block_paths", None)
    if paths is None:
        raise ValueError("the model has no block routers; build it with model.block_router.enabled=true")
    return paths
