"""Sinkhorn routing: balance the assignment first, then pick top-k per token.

BASE layers (Lewis et al. 2021, arXiv:2103.16716) route through a balanced assignment;
S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models",
arXiv:2202.01169) approximates it with a few Sinkhorn iterations (Cuturi 2013):

    logits = tokens @ W_gate^T                                       [N, E]
    A = exp(logits); repeat `sinkhorn_iterations` times:
        scale columns so every expert holds N / E   (column normalisation)
        scale rows so every token holds 1           (row normalisation)
    selected = top_k of A in each row                                (no gradient)
    probs    = softmax(logits) (or sigmoid, per score_func) at the selected experts,
               renormalised to sum 1 if cfg.renormalize

Row scalings never change a row's ranking, so Sinkhorn amounts to learning one offset per
expert, log of its column scaling, that cancels the experts' popularity inside this batch:
an expert every token prefers is pushed down until the load evens out, without any loss
term. The iterations run in log space in fp32 (exp of router logits overflows otherwise).
The combine weights stay the plain router probabilities, so the gate gets its gradient as in
token choice; only the selection is balanced. `sinkhorn_iterations: 0` is plain top-k.

Inference applies the same rule, so a token's experts depend on the other tokens of the
micro-batch (BASE layers instead route greedily at test time; we keep train and test
routing identical).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.moe.routers.base import SCORE_FUNCS, Router, RouterOutput, RoutingContext, register_router, require
from megamoe.moe.token_shards import ONE_PROCESS, TokenShards


@torch.no_grad()
def sinkhorn_log(logits: torch.Tensor, iterations: int, shards: TokenShards = ONE_PROCESS) -> torch.Tensor:
    """Log of the Sinkhorn-balanced assignment of exp(logits) [N, E]: rows sum to 1, columns to N / E.

    Under sequence sharding the columns span the tokens of every shard: each column
    normalisation combines the shards' column log-sums (an all-gather of E floats per iteration).
    """
    log_a = logits.float()
    n, e = log_a.shape
    log_col_mass = math.log(n * shards.num / e)
    for _ in range(iterations):
        log_a = log_a - shards.logsumexp(log_a, dim=0) + log_col_mass
        log_a = log_a - torch.logsumexp(log_a, dim=1, keepdim=True)
    return log_a


@register_router("sinkhorn")
class SinkhornRouter(Router):
    # Not read: num_null_experts (Sinkhorn would balance them like real experts), bias_balancing
    # (Sinkhorn already balances), balance_loss and z_loss (no loss is computed here).
    config_keys = Router.config_keys | {"sinkhorn_iterations", "score_func", "renormalize"}

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        super().check_config(cfg)
        require(
            cfg.sinkhorn_iterations >= 0,
            f"model.moe.sinkhorn_iterations must be >= 0 (0 = plain top-k), got {cfg.sinkhorn_iterations}",
        )
        require(
            cfg.score_func in SCORE_FUNCS,
            f"model.moe.score_func must be one of {', '.join(SCORE_FUNCS)}, got '{cfg.score_func}'",
        )

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        n, e, k = tokens.shape[0], self.num_experts, self.cfg.top_k
        logits = F.linear(tokens, self.gate.weight.float())
        top_idx = sinkhorn_log(logits.detach(), self.cfg.sinkhorn_iterations, self.token_shards).topk(k, dim=-1).indices
        top_idx = self.replay(top_idx)

        scores = torch.sigmoid(logits) if self.cfg.score_func == "sigmoid" else F.softmax(logits, dim=-1)
        weights = scores.gather(1, top_idx)
        if self.cfg.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        probs = torch.zeros(n, e, dtype=torch.float32, device=tokens.device).scatter(1, top_idx, weights)
        routing_map = torch.zeros(n, e, dtype=torch.bool, device=tokens.device).scatter(1, top_idx, True)
        return RouterOutput(probs=probs, routing_map=routing_map, aux={}, topk_indices=top_idx)
