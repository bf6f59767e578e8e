"""MC-SMoE expert merging (Li et al., ICLR 2024, "Merge, then Compress"), per MoE layer:

1. dominant experts: the K most frequently routed on calibration data (RoutingStats.counts);
2. grouping: every other expert joins the dominant expert whose router-logit column
   (RoutingStats.router_logits[:, e]) is most similar (cosine);
3. alignment: each member's hidden units are permuted onto its dominant expert's by a linear
   assignment on weight similarity ([w1 column, b1, w2 row] per hidden unit); a permutation of
   hidden units does not change an expert's function;
4. merging: each group becomes the frequency-weighted average of its aligned members.

The router is kept as trained: it still scores every original expert, and the layer folds its
columns onto the merged experts (`model.moe.merged_from`, the layer's `expert_map` buffer), so a
token that chose any member of a group is computed once by the group's expert with the members'
summed weight. With identical members, the merged model therefore computes exactly what the
original did.

Timestep-band experts are refused (UNMERGEABLE_ROUTERS): band j owns the experts [j P, (j + 1) P),
and a group of members from several bands would serve every one of those noise bands with one
averaged expert.

    plan = plan_merge(stats, experts_per_layer=4)             # {block: LayerMerge}
    merged = merge_model(model, plan)                         # a new model, num_experts=4, merged_from=8
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from megamoe.posttrain.routing_stats import RoutingStats
from megamoe.posttrain.trained_model import PostTrainError

UNMERGEABLE_ROUTERS = {
    "timestep_band": "each noise band owns its own experts, and merging groups experts across bands "
    "(one averaged expert would serve several noise levels); merging is not built for it",
}
"""Routers whose experts must not be merged as MC-SMoE groups them, and why: the tool refuses them."""


@dataclass
class LayerMerge:
    """The merge of one MoE layer's E experts into K."""

    dominant: list[int]
    """[K] the dominant expert of each merged expert, ascending."""
    expert_map: torch.Tensor
    """[E] int64: the merged expert (0..K-1) of each original expert (router column)."""
    weights: torch.Tensor
    """[E] float64: each expert's share in its merged expert (its group's weights sum to 1)."""

    def groups(self) -> list[list[int]]:
        return [torch.nonzero(self.expert_map == k).flatten().tolist() for k in range(len(self.dominant))]


def check_budget(num_experts: int, top_k: int, k: int, ep_size: int = 1) -> None:
    """PostTrainError unless `k` experts per layer are a merge this model can hold."""
    if k >= num_experts:
        raise PostTrainError(
            f"--experts-per-layer {k} must be below the model's {num_experts} experts per layer (nothing would "
            f"merge); choose between {max(top_k, 1)} and {num_experts - 1}"
        )
    if k < max(top_k, 1):
        raise PostTrainError(
            f"--experts-per-layer {k} is below the router's top_k={top_k}: a token picks {top_k} experts; "
            f"choose between {max(top_k, 1)} and {num_experts - 1}"
        )
    if k % ep_size:
        raise PostTrainError(
            f"--experts-per-layer {k} is not divisible by the run's parallel.expert_parallel_size={ep_size}; "
            f"choose a multiple of {ep_size} (or train the merged model at another expert parallelism)"
        )


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E_a, E_b] cosine similarity of the columns of a [T, E_a] and b [T, E_b]."""
    a = a.double() / a.double().norm(dim=0, keepdim=True).clamp_min(1e-30)
    b = b.double() / b.double().norm(dim=0, keepdim=True).clamp_min(1e-30)
    return a.T @ b


def plan_layer(counts: torch.Tensor, router_logits: torch.Tensor, k: int) -> LayerMerge:
    """Dominant experts by frequency (ties: lower id first), the others grouped by router-logit cosine."""
    e = counts.shape[0]
    order = sorted(range(e), key=lambda i: (-float(counts[i]), i))
    dominant = sorted(order[:k])
    similarity = _cosine(router_logits, router_logits[:, dominant])  # [E, K]
    expert_map = similarity.argmax(1)
    expert_map[dominant] = torch.arange(k)  # a dominant expert is its own group
    weights = torch.zeros(e, dtype=torch.float64)
    for g in range(k):
        members = expert_map == g
        c = counts.double()[members]
        # Frequency-weighted; a group nobody chose on the calibration data averages uniformly.
        weights[members] = c / c.sum() if c.sum() > 0 else torch.full_like(c, 1.0 / len(c))
    return LayerMerge(dominant, expert_map.long(), weights)


def plan_merge(stats: RoutingStats, experts_per_layer: int) -> dict[int, LayerMerge]:
    return {
        block: plan_layer(s.counts, s.router_logits, experts_per_layer) for block, s in sorted(stats.layers.items())
    }


def unit_features(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """[hidden, 2 dim + 1]: one expert's hidden unit j as [w1[:, j], b1[j], w2[j, :]]."""
    return torch.cat([w1.T, b1[:, None], w2], dim=1).double()


def align_permutation(reference: tuple, expert: tuple) -> torch.Tensor:
    """perm [hidden]: the order of `expert`'s hidden units that best matches `reference`'s
    (each (w1 [dim, h], b1 [h], w2 [h, dim])): the linear assignment maximising the summed inner
    product of matched units' features, i.e. minimising their summed squared distance."""
    score = unit_features(*reference) @ unit_features(*expert).T  # [h_ref, h_expert]
    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    return torch.from_numpy(cols[np.argsort(rows)]).long()


def permute_units(w1, b1, w2, perm):
    """The same expert with its hidden units in order `perm`: it computes the same function."""
    return w1[:, perm], b1[perm], w2[perm, :]


@torch.no_grad()
def merge_layer_experts(experts, plan: LayerMerge) -> dict[str, torch.Tensor]:
    """{w1, b1, w2, b2} of the K merged experts of one layer's GroupedExperts (fp32 math)."""
    w1, b1, w2, b2 = (p.detach().float() for p in (experts.w1, experts.b1, experts.w2, experts.b2))
    out = {name: [] for name in ("w1", "b1", "w2", "b2")}
    for g, members in enumerate(plan.groups()):
        d = plan.dominant[g]
        ref = (w1[d], b1[d], w2[d])
        acc = [torch.zeros_like(t) for t in (w1[d], b1[d], w2[d], b2[d])]
        for e in members:
            aligned = (
                ref if e == d else permute_units(w1[e], b1[e], w2[e], align_permutation(ref, (w1[e], b1[e], w2[e])))
            )
            share = float(plan.weights[e])
            for a, t in zip(acc, (*aligned, b2[e]), strict=True):
                a.add_(t, alpha=share)
        for name, a in zip(("w1", "b1", "w2", "b2"), acc, strict=True):
            out[name].append(a)
    return {name: torch.stack(ts) for name, ts in out.items()}


def merged_config(cfg, experts_per_layer: int):
    """The ModelConfig of the merged model: K experts, the router still over the original columns."""
    moe = dataclasses.replace(cfg.moe, num_experts=experts_per_layer, merged_from=cfg.moe.num_experts)
    return dataclasses.replace(cfg, moe=moe)


@torch.no_grad()
def merge_model(model: torch.nn.Module, plan: dict[int, LayerMerge]) -> torch.nn.Module:
    """A new fp32 model (eval) holding the merged experts of `model` as `plan` says; everything else,
    routers included, copied unchanged."""
    from megamoe.model.dit import build_model
    from megamoe.moe.layer import MoEFeedForward

    if model.cfg.moe.merged_from:
        raise PostTrainError(
            f"the model is already merged (model.moe.merged_from={model.cfg.moe.merged_from}); "
            f"merge the checkpoint it was merged from instead"
        )
    k = len(next(iter(plan.values())).dominant)
    merged = build_model(merged_config(model.cfg, k), initialize=False)
    state = model.state_dict()
    layers = {int(n.split(".")[1]): n for n, m in model.named_modules() if isinstance(m, MoEFeedForward)}
    if sorted(layers) != sorted(plan):
        raise PostTrainError(
            f"the merge plan covers blocks {sorted(plan)}, the model's MoE layers are {sorted(layers)}"
        )
    for block, name in layers.items():
        for key, tensor in merge_layer_experts(model.get_submodule(name).experts, plan[block]).items():
            state[f"{name}.experts.{key}"] = tensor
        state[f"{name}.expert_map"] = plan[block].expert_map.clone()
    merged.load_state_dict(state, strict=True)
    return merged.float().eval()
