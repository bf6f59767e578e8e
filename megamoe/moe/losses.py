"""Router auxiliary losses, unweighted.

Routers put these in their `aux` dict under the names in `LOSS_NAMES`; the training loop
multiplies each by its `model.moe.<name>_loss` weight (`balance_loss`, `z_loss`, ...). Keeping
the weights out of the routers lets the loop log raw values that are comparable across runs.
"""

from __future__ import annotations

import torch

from megamoe.moe.token_shards import ONE_PROCESS, TokenShards

LOSS_NAMES = ("balance", "z", "similarity", "layer_reg", "contrastive", "capacity", "tsallis")
BALANCE_SCOPES = ("micro_batch", "sequence", "global")  # model.moe.balance_scope: over what loads are counted


# ---------------------------------------------------------------------------------------------
# Load balance and logit size (token-choice routers)


def switch_balance_loss(
    probs_full: torch.Tensor,
    routing_map: torch.Tensor,
    num_experts: int,
    batch_size: int,
    seq_len: int,
    scope: str = "micro_batch",
    shards: TokenShards = ONE_PROCESS,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/GShard load balance: E * sum_i f_i * P_i over the real experts.

    probs_full [N, E_total]: each token's full score distribution (before top-k);
    routing_map [N, E_total]: the selection; N = batch_size * seq_len tokens, sample-major.
    f_i = share of the real-expert assignments that went to expert i (non-differentiable),
    P_i = mean probability of expert i (carries the gradient). Equals 1 under uniform routing;
    null-expert columns (>= num_experts) are ignored because they cost nothing to overload.

    scope 'micro_batch': f and P over every token of the micro-batch. 'sequence': computed per
    sample and averaged (DeepSeek-V3's sequence-wise variant): it also balances within each
    video. 'global': P over the micro-batch, f from `counts` [E] (assignments per real expert
    gathered by the caller over a wider set of tokens, see TokenChoiceRouter).

    Under sequence sharding (`shards`, this rank holds one chunk of every sample) the per-expert
    assignment counts and probability sums are summed over the shards before f and P are
    formed (one all-reduce of 2 * E floats per group), so every rank gets the unsharded loss.
    """
    if scope not in BALANCE_SCOPES:
        raise ValueError(f"model.moe.balance_scope must be one of {', '.join(BALANCE_SCOPES)}, got '{scope}'")
    if probs_full.shape[0] != batch_size * seq_len:
        raise ValueError(f"balance loss got {probs_full.shape[0]} tokens for batch {batch_size} x seq_len {seq_len}")
    groups = batch_size if scope == "sequence" else 1
    probs = probs_full[:, :num_experts].float().reshape(groups, -1, num_experts)
    chosen = routing_map[:, :num_experts].float().reshape(groups, -1, num_experts)
    stats = shards.sum(torch.cat([chosen.sum(1), probs.sum(1)], dim=-1))  # [groups, 2E]; one collective
    assigned = stats[:, :num_experts].detach() if counts is None else counts.float().reshape(1, num_experts)
    f = assigned / assigned.sum(-1, keepdim=True).clamp_min(1.0)  # [groups, E]
    p = stats[:, num_experts:] / (probs.shape[1] * shards.num)
    return (num_experts * (f * p).sum(-1)).mean()


def z_loss(logits: torch.Tensor, shards: TokenShards = ONE_PROCESS) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small so
    the softmax stays out of its saturated, round-off-prone range. The mean runs over the tokens
    of every shard."""
    return shards.mean(torch.logsumexp(logits.float(), dim=-1).square().mean())
