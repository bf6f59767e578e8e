"""DynMoLE hybrid routing: uncertain tokens route softly, confident ones take a top-p set.

Li, Wang, Zhang, Yin, Duan, Xiao and Tang 2025, "DynMoLE: Boosting Mixture of LoRA Experts
Fine-Tuning with a Hybrid Routing Mechanism" (arXiv:2504.00661). The router's uncertainty about
a token, the Tsallis entropy of its expert distribution, decides how it is routed:

    p      = softmax(tokens @ W_gate^T)                              [N, E]
    S_q(p) = (1 - sum_i p_i^q) / (q - 1)     q = dynmole_q (q -> 1: Shannon entropy -sum p log p)
    S_q > tau (dynmole_entropy_threshold):   soft routing, every expert
    otherwise:                               top-p routing, the fewest experts (by descending p)
                                             whose mass reaches dynmole_top_p, at least
                                             k_min = dynmole_min_experts
    weights = p renormalised over the token's selected experts

Compute bound (our addition; the paper's LoRA experts are cheap enough to run all): a token
never computes more than `top_k` experts. A soft token takes its top_k most probable experts
(all of them when top_k = num_experts, which is the paper's soft routing exactly), a top-p token
at most top_k of its set. Because every token's weights are p renormalised over what it selected,
a capped soft token is routed exactly as a plain top_k token; the weights follow from the routing
map alone, which is what routing replay hands back.

Losses (unweighted, in aux; the loop multiplies by the config weights):
    'tsallis'  mean S_q over the tokens of every shard (`tsallis_loss`): pushes the router
               toward confident distributions, hence toward top-p routing.
    'balance'  the Switch load-balance loss (`balance_loss`) on p and the selection, as in the
               MixLoRA-style MoLE training the paper builds on (off by default).
Statistics (detached): 'experts_per_token', the mean number of experts a token computes
(the routing diagnostics report it per layer as `experts_per_token`, from the routing map), and 'soft_fraction', the share of soft tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.moe.losses import switch_balance_loss
from megamoe.moe.routers.base import Router, RouterOutput, RoutingContext, register_router, require


def tsallis_entropy(p: torch.Tensor, q: float) -> torch.Tensor:
    """S_q of each row of the distributions p [..., E] -> [...]; q = 1 is the Shannon entropy (nats).

    Uniform over E: (1 - E^(1-q)) / (q - 1). Zero for a one-hot row; largest for the uniform one.
    """
    if q == 1.0:
        return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)
    return (1.0 - p.pow(q).sum(-1)) / (q - 1.0)


def top_p_counts(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """[N] int64: for each row of p [N, E], the fewest experts, taken by descending p, whose
    summed probability reaches top_p (all E if rounding keeps the total just under it). The sums
    run in float64: in fp32 the tail of a confident token rounds away and top_p near 1 stops early."""
    sorted_p = p.sort(dim=-1, descending=True).values.double()
    mass_before = F.pad(sorted_p.cumsum(-1)[..., :-1], (1, 0))  # mass of the experts ranked above each one
    return (mass_before < top_p).sum(-1)


def hybrid_routing_map(
    p: torch.Tensor, q: float, threshold: float, top_p: float, min_experts: int, cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing_map [N, E] bool, soft [N] bool) of DynMoLE's hybrid rule for the distributions p
    [N, E]: soft tokens (S_q > threshold) take their `cap` most probable experts; the others the
    top-p count clamped to [min_experts, cap], by descending p. No gradient."""
    soft = tsallis_entropy(p, q) > threshold
    count = torch.where(soft, cap, top_p_counts(p, top_p).clamp(min_experts, cap))
    order = p.topk(cap, dim=-1).indices  # [N, cap], most probable first
    keep = torch.arange(cap, device=p.device) < count[:, None]
    return torch.zeros_like(p, dtype=torch.bool).scatter(1, order, keep), soft


@register_router("dynmole")
class DynMoLERouter(Router):
    # Not read: num_null_experts, score_func (p is a softmax: the entropy needs a distribution),
    # renormalize (the weights are always p renormalised over the selection), bias_balancing,
    # z_loss, and balance_scope (the balance loss runs per micro-batch).
    config_keys = Router.config_keys | {
        "dynmole_q",
        "dynmole_entropy_threshold",
        "dynmole_top_p",
        "dynmole_min_experts",
        "tsallis_loss",
        "balance_loss",
    }

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        super().check_config(cfg)
        require(cfg.dynmole_q > 0, f"model.moe.dynmole_q must be > 0 (1 = Shannon entropy), got {cfg.dynmole_q}")
        require(0.0 < cfg.dynmole_top_p <= 1.0, f"model.moe.dynmole_top_p must be in (0, 1], got {cfg.dynmole_top_p}")
        # S_q >= 0, so a negative threshold is a mistake; one at or above S_q(uniform) is top-p routing
        # alone (no token is ever soft), a mode of its own.
        require(
            cfg.dynmole_entropy_threshold >= 0,
            f"model.moe.dynmole_entropy_threshold must be >= 0 (Tsallis entropy is never negative), "
            f"got {cfg.dynmole_entropy_threshold}",
        )
        require(
            1 <= cfg.dynmole_min_experts <= cfg.top_k,
            f"model.moe.dynmole_min_experts={cfg.dynmole_min_experts} must be between 1 and top_k={cfg.top_k} "
            f"(the most experts a token may compute); lower it or raise top_k",
        )

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        cfg = self.cfg
        p = F.linear(tokens, self.gate.weight.float()).softmax(dim=-1)
        with torch.no_grad():
            routing_map, soft = hybrid_routing_map(
                p, cfg.dynmole_q, cfg.dynmole_entropy_threshold, cfg.dynmole_top_p, cfg.dynmole_min_experts, cfg.top_k
            )
        routing_map = self.replay(routing_map)
        probs = p * routing_map
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)

        aux = {
            "experts_per_token": routing_map.sum(-1).float().mean().detach(),
            "soft_fraction": soft.float().mean(),
        }
        shards = self.token_shards
        if cfg.tsallis_loss > 0:
            aux["tsallis"] = shards.mean(tsallis_entropy(p, cfg.dynmole_q).mean())
        if cfg.balance_loss > 0:
            aux["balance"] = switch_balance_loss(
                p, routing_map, self.num_experts, ctx.batch_size, ctx.seq_len, "micro_batch", shards
            )
        return RouterOutput(probs=probs, routing_map=routing_map, aux=aux)
