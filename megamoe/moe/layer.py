"""The MoE feed-forward layer that replaces a block's dense FFN, and model-level helpers.

    x [B, L, dim] -> tokens [N, dim] -> router (fp32) -> probs, routing_map [N, E_total]
      -> merged models (MC-SMoE): router columns folded onto the merged experts (expert_map)
      -> assignments of the real experts (null-expert columns dropped) -> dispatch
      -> grouped experts (gather, FFN, weighted scatter-add) -> combine -> + probs @ b2
      -> + shared experts -> [B, L, dim]

The layer never looks at which router it holds: any routing_map is executed exactly.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from megamoe.config import ConfigError, ModelConfig, MoEConfig
from megamoe.model.activation_checkpointing import is_recomputing
from megamoe.model.feed_forward import FeedForward
from megamoe.moe.diagnostics import sample_expert_inputs
from megamoe.moe.dispatch import LocalDispatcher, expert_assignments
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.losses import LOSS_NAMES
from megamoe.moe.routers import RoutingContext, build_router  # the package import registers every router
from megamoe.moe.routers.base import Reduce


def moe_layer_indices(cfg: ModelConfig) -> set[int]:
    """Block indices that get an MoE FFN under `cfg.moe.layers`; empty for a dense model.

    'all', 'every_other' (odd blocks 1, 3, 5, ...: the first block stays dense, as in
    GShard-style interleaving) or a comma list such as '0,4,8'. The spec is checked even
    when the model is dense, so a typo fails before it matters. The one parser of
    `model.moe.layers` (config validation calls it too); raises ConfigError (a ValueError)
    naming the key, also when an MoE model's spec selects no block.
    """
    spec, n = str(cfg.moe.layers).strip(), cfg.num_layers
    if spec == "all":
        indices = set(range(n))
    elif spec == "every_other":
        indices = set(range(1, n, 2))
    else:
        try:
            indices = {int(part) for part in spec.split(",")}
        except ValueError:
            indices = None
        if not indices or any(not 0 <= i < n for i in indices):
            raise ConfigError(
                f"model.moe.layers='{cfg.moe.layers}' is not 'all', 'every_other' or a comma list of "
                f"block indices in [0, {n}) like '0,4,8'; fix model.moe.layers"
            )
    if cfg.moe.num_experts > 0 and not indices:
        raise ConfigError(
            f"model.moe.layers='{cfg.moe.layers}' selects no block of model.num_layers={n}, so the "
            f"model would be dense; choose blocks that exist or set model.moe.num_experts=0"
        )
    return indices if cfg.moe.num_experts > 0 else set()


def router_config(cfg: MoEConfig) -> MoEConfig:
    """The config the router is built and checked with: a merged layer's router (MC-SMoE) keeps
    scoring the `merged_from` experts it was trained with, so it sees merged_from as num_experts."""
    return dataclasses.replace(cfg, num_experts=cfg.merged_from, merged_from=0) if cfg.merged_from else cfg


def fold_routing(
    probs: torch.Tensor, routing_map: torch.Tensor, expert_map: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router columns [N, merged_from] -> merged experts [N, num_experts]: the weights of the columns
    that share a merged expert are summed (differentiably), their selections OR-ed, so a token that
    chose two members of one group is computed once, with their summed weight."""
    n = probs.shape[0]
    folded = probs.new_zeros(n, num_experts).index_add(1, expert_map, probs)
    chosen = probs.new_zeros(n, num_experts).index_add_(1, expert_map, routing_map.to(probs.dtype)) > 0
    return folded, chosen


class MoEFeedForward(nn.Module):
    """Drop-in for `FeedForward`: forward(x [B, L, dim], ctx) -> [B, L, dim].

    After each forward, `aux` holds the router's aux dict (unweighted losses named in
    LOSS_NAMES, plus statistics) for the training loop; with `record = True`,
    `last_routing = (probs, routing_map, ctx)` (detached) is kept for diagnostics (a merged
    layer's after folding: over the experts it computes), and `last_expert_inputs`, a capped
    sample of each expert's tokens (diagnostics.sample_expert_inputs).
    """

    def __init__(self, dim: int, ffn_dim: int, cfg: MoEConfig, target_dim: int | None = None):
        super().__init__()
        if cfg.num_experts < 1:
            raise ValueError(f"model.moe.num_experts must be >= 1 for an MoE layer, got {cfg.num_experts}")
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        # target_dim (prod(patch_size) * out_channels) sizes the optional layer-regularization head.
        self.router = build_router(dim, router_config(cfg), layer_reg_out_dim=target_dim)
        if cfg.merged_from:
            # Router column -> merged expert (MC-SMoE). Persistent: it is part of the model, saved
            # with the weights; every rank holds all of it (expert parallelism shards the experts).
            self.register_buffer("expert_map", torch.empty(cfg.merged_from, dtype=torch.int64))
            self.reset_buffers()
        expert_width = cfg.expert_ffn_dim or ffn_dim
        self.experts = GroupedExperts(cfg.num_experts, dim, expert_width)
        # One FFN of width n * w computes exactly the sum of n shared experts of width w (their
        # hidden units concatenated, second linears stacked, biases summed): one GEMM, not n.
        self.shared: FeedForward | None = None
        if cfg.num_shared_experts > 0:
            self.shared = FeedForward(dim, cfg.num_shared_experts * (cfg.shared_ffn_dim or expert_width))
        self.dispatcher = LocalDispatcher()
        self.aux: dict[str, torch.Tensor] = {}
        self.record = False
        self.last_routing: tuple | None = None
        self.last_output_norms: tuple | None = None
        self.last_expert_inputs: tuple | None = None

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """A merged layer built without weights to load maps column c to expert c % num_experts."""
        if self.cfg.merged_from:
            self.expert_map.copy_(torch.arange(self.cfg.merged_from) % self.num_experts)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        b, l, d = x.shape
        if ctx is None:
            ctx = RoutingContext(batch_size=b, seq_len=l)
        if ctx.batch_size * ctx.seq_len != b * l:
            raise ValueError(f"RoutingContext is for {ctx.batch_size} x {ctx.seq_len} tokens, input is {b} x {l}")
        tokens = x.reshape(b * l, d)
        routed = self.router(tokens, ctx)
        if self.cfg.merged_from:  # no null experts here (config rule): every column is a real one
            probs, routing_map = fold_routing(routed.probs, routed.routing_map, self.expert_map, self.num_experts)
            routed = dataclasses.replace(routed, probs=probs, routing_map=routing_map, topk_indices=None)
        # Under activation checkpointing this forward runs again in backward: the loss already
        # took the first forward's aux, and diagnostics recorded it; keep both untouched.
        recomputing = is_recomputing()
        if not recomputing:
            self.aux = dict(routed.aux)
        if self.record and not recomputing:
            self.last_routing = (routed.probs.detach(), routed.routing_map.detach(), ctx)
            self.last_expert_inputs = sample_expert_inputs(tokens, routed.routing_map, self.num_experts)
        # Null experts (columns >= num_experts) output zero: dropping them here means they
        # cost neither dispatch nor compute, and their share of the weight simply vanishes.
        real = slice(0, self.num_experts)
        assignments = expert_assignments(routed.probs, routed.routing_map, self.num_experts, routed.topk_indices)
        pending = self.dispatcher.dispatch(tokens, assignments)
        # The shared experts need no routed token: they run while the dispatch is in flight.
        # ([B, L, dim] in: tensor parallelism shards them like the dense FFN.)
        shared = self.shared(x).reshape(b * l, d) if self.shared is not None else None
        rows, index, tokens_per_expert, weights, state = pending.wait()
        y = self.dispatcher.combine(self.experts(rows, index, tokens_per_expert, weights), state)  # fp32 sum
        # The second bias's weighted share, sum_e probs[t, e] * b2[e] (probs are 0 off the routing
        # map): one [N, E] x [E, dim] product instead of a bias row per assignment.
        b2 = self.dispatcher.gather_experts(self.experts.b2)
        y = torch.addmm(y, routed.probs[:, real], b2.to(y.dtype))
        if shared is not None:
            if self.record and not recomputing:  # shared-vs-routed balance, for diagnostics
                self.last_output_norms = (shared.detach().float().norm().item(), y.detach().norm().item())
            y = y + shared
        return y.to(x.dtype).view(b, l, d)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def collect_aux(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each aux loss summed over the MoE layers of the last forward, e.g. {'balance': ..., 'z': ...};
    statistics (keys outside LOSS_NAMES) are left out. Weights are the caller's."""
    totals: dict[str, torch.Tensor] = {}
    for layer in moe_layers(model):
        for name, value in layer.aux.items():
            if name in LOSS_NAMES:
                totals[name] = totals[name] + value if name in totals else value
    return totals


def routers_after_step(model: nn.Module, reduce: Reduce) -> None:
    """Once per applied optimizer step on every rank, after the step: the routers' non-gradient updates."""
    for layer in moe_layers(model):
        layer.router.after_step(reduce)


def routers_discard_step(model: nn.Module) -> None:
    """Instead of `routers_after_step` when the step was skipped: every MoE layer drops the aux
    losses of its last forward and its router drops the statistics it gathered for the update
    (Router.discard_step), so the skipped batches leave no trace. Local: no collective."""
    for layer in moe_layers(model):
        layer.aux = {}
        layer.router.discard_step()
