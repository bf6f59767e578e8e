"""Router auxiliary losses, unweighted.

Routers put these in their `aux` dict under the names in `LOSS_NAMES`; the training loop
multiplies each by its `model.moe.<name>_loss` weight (`balance_loss`, `z_loss`, ...). Keeping
the weights out of the routers lets the loop log raw values that are comparable across runs.
"""

from __future__ import annotations

import torch

LOSS_NAMES = ("balance", "z", "similarity", "layer_reg", "contrastive")
BALANCE_SCOPES = ("micro_batch", "sequence")  # model.moe.balance_scope: over what the balance loss counts loads


# ---------------------------------------------------------------------------------------------
# Load balance and logit size (token-choice routers)

def switch_balance_loss(probs_full: torch.Tensor, routing_map: torch.Tensor, num_experts: int,
                        batch_size: int, seq_len: int, scope: str = "micro_batch") -> torch.Tensor:
    """Switch/GShard load balance: E * sum_i f_i * P_i over the real experts.

    probs_full [N, E_total]: each token's full score distribution (before top-k);
    routing_map [N, E_total]: the selection. f_i = share of the real-expert assignments that
    went to expert i (non-differentiable), P_i = mean probability of expert i (carries the
    gradient). Equals 1 under uniform routing; null-expert columns (>= num_experts) are
    ignored because they cost nothing to overload. scope 'sequence' computes the loss per
    sample and averages (DeepSeek-V3's sequence-wise variant): it also balances within
    each video, not just across the micro-batch.
    """
    if scope not in BALANCE_SCOPES:
        raise ValueError(f"model.moe.balance_scope must be one of {', '.join(BALANCE_SCOPES)}, got '{scope}'")
    if probs_full.shape[0] != batch_size * seq_len:
        raise ValueError(f"balance loss got {probs_full.shape[0]} tokens for batch {batch_size} x seq_len {seq_len}")
    groups, per_group = (batch_size, seq_len) if scope == "sequence" else (1, batch_size * seq_len)
    probs = probs_full[:, :num_experts].float().reshape(groups, per_group, num_experts)
    chosen = routing_map[:, :num_experts].float().reshape(groups, per_group, num_experts)
    f = chosen.sum(1) / chosen.sum((1, 2)).clamp_min(1.0)[:, None]  # [groups, E]
    p = probs.mean(1)
    return (num_experts * (f * p).sum(-1)).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small so
    the softmax stays out of its saturated, round-off-prone range."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
