"""Auxiliary losses of the diffusion-specific routers (Expert Race, ProMoE).

Pure functions of tensors; the routers call them and put the unweighted value in their
aux dict, the training loop multiplies by the config weight. Generic token-choice losses
(switch balance, z-loss) live in `megamoe.moe.losses`.

- `router_similarity_loss`   Race-DiT (Yuan et al. 2025, arXiv:2503.16057), Sec. 5
- `layer_reg_loss`           Race-DiT, Sec. 6 / App. 9 (per-layer regularization)
- `routing_contrastive_loss` ProMoE (Wei et al. 2025, arXiv:2510.24711), routing contrastive loss
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.moe.token_shards import ONE_PROCESS, TokenShards


def router_similarity_loss(
    logits: torch.Tensor, routing_map: torch.Tensor, shards: TokenShards = ONE_PROCESS
) -> torch.Tensor:
    """Race-DiT router similarity loss: the switch balance loss extended to pairs of experts.

        P    = softmax_e(logits)                 [N, E]  soft assignment (carries the gradient)
        M    = routing_map as 0/1                [N, E]  hard selection (constant weights)
        P'   = P^T P,  M' = M^T M                [E, E]  soft / hard co-activation of expert pairs
        W_ii = E      * M'_ii / sum_k M'_kk               how often expert i is picked, mean 1
        W_ij = E(E-1) * M'_ij / sum_{k!=l} M'_kl (i != j) how often the pair (i, j) is picked, mean 1
        L    = (1/N) sum_ij W_ij P'_ij

    The diagonal is the balance loss (load fraction times soft affinity, as in Switch); the
    off-diagonal pushes down the soft co-activation of expert pairs that are often selected
    together, so tokens spread over many expert combinations instead of collapsing onto a few
    (Race-DiT, Sec. 5, Eqs. 9-11). Closed forms: sharp, evenly balanced routing with one
    expert per token gives 1; every token sharply on one same expert gives E; uniform soft
    routing gives 1 whenever some token has two or more experts. A part (diagonal or
    off-diagonal) with no selections gets weight 0.

    Under sequence sharding P', M' and N are summed over the shards (one all-reduce of 2 E^2
    floats), so every rank gets the unsharded loss.

    We could not read the equations in the paper itself; this follows the description there
    and agrees with independent public re-implementations (normalised by the token count N).
    """
    if logits.dim() != 2 or logits.shape != routing_map.shape:
        raise ValueError(
            f"router_similarity_loss expects logits and routing_map of one shape [tokens, experts], "
            f"got {tuple(logits.shape)} and {tuple(routing_map.shape)}"
        )
    n, e = logits.shape
    p = F.softmax(logits.float(), dim=-1)
    m = routing_map.to(p.dtype)
    pairs = shards.sum(torch.stack([p.t() @ p, m.t() @ m]))  # [2, E, E]: soft, hard; one collective
    soft = pairs[0]
    with torch.no_grad():
        hard = pairs[1]
        eye = torch.eye(e, dtype=torch.bool, device=hard.device)
        diag, off = hard * eye, hard * ~eye
        weights = diag / diag.sum().clamp_min(1.0) * e + off / off.sum().clamp_min(1.0) * (e * e - e)
    return (weights * soft).sum() / max(n * shards.num, 1)


def layer_reg_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Race-DiT per-layer regularization: mean squared error of a layer's auxiliary head.

        L_reg = mean_{t, c} (prediction[t, c] - target[t, c])^2

    `prediction` is the router's aux['layer_reg_prediction'] [N, out_dim] and `target` the
    diffusion target (the velocity for flow matching) patchified to the same token order,
    [N, out_dim] with out_dim = prod(patch_size) * out_channels. Shallow layers of a pre-norm
    adaLN DiT contribute little to the output and learn slowly; asking every MoE layer's tokens
    to predict the target directly gives them a strong, short gradient path.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"layer_reg_loss: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} "
            "differ; patchify the target to [tokens, prod(patch_size) * out_channels]"
        )
    return F.mse_loss(prediction.float(), target.float())


def routing_contrastive_loss(
    tokens: torch.Tensor,
    prototypes: torch.Tensor,
    assignment: torch.Tensor,
    temperature: float,
    groups: torch.Tensor | None = None,
    shards: TokenShards = ONE_PROCESS,
) -> torch.Tensor:
    """ProMoE routing contrastive loss (InfoNCE between prototypes and their tokens' centroids).

        A    = prototypes that received at least one token
        mu_j = mean of the tokens assigned to prototype j                  (j in A)
        s_jk = cos(prototype_j, mu_k) / temperature
        L    = -1/|A| sum_{j in A} log( exp(s_jj) / sum_{k in A, k ~ j} exp(s_jk) )

    Each prototype is pulled toward the centroid of its own tokens (intra-expert coherence)
    and pushed away from the other prototypes' centroids (inter-expert diversity); the
    gradient reaches both the prototypes and the tokens. `k ~ j` is every k when `groups` is
    None; with `groups` (the expert of each prototype, [Q]) the other prototypes of j's own
    expert are left out of the denominator, so several prototypes of one expert are not
    pushed apart. With fewer than two active prototypes there is no negative: the loss is a
    zero that still carries a (zero) gradient.

    Under sequence sharding the per-prototype token sums and counts are summed over the shards
    (one all-reduce of Q * (D + 1) floats) and the prototypes' gradient is shared among the
    shards' identical copies of the loss, so every rank gets the unsharded loss.

    tokens [M, D], prototypes [Q, D], assignment [M] long in [0, Q).
    """
    if tokens.shape[0] != assignment.shape[0]:
        raise ValueError(f"routing_contrastive_loss: {tokens.shape[0]} tokens but {assignment.shape[0]} assignments")
    q, d = prototypes.shape
    zero = tokens.sum() * 0.0 + prototypes.sum() * 0.0
    prototypes = shards.replicated(prototypes)
    counts = torch.bincount(assignment, minlength=q).to(tokens.dtype)
    sums = torch.zeros(q, d, dtype=tokens.dtype, device=tokens.device).index_add(0, assignment, tokens)
    stats = shards.sum(torch.cat([sums, counts[:, None]], dim=1))  # [Q, D + 1]; one collective
    sums, counts = stats[:, :d], stats[:, d].detach()
    active = torch.nonzero(counts > 0).squeeze(1)
    if active.numel() < 2:
        return zero
    centroids = sums[active] / counts[active].unsqueeze(1)
    logits = F.normalize(prototypes[active], dim=1) @ F.normalize(centroids, dim=1).t() / temperature
    if groups is not None:
        g = groups[active]
        same_expert = (g.unsqueeze(1) == g.unsqueeze(0)) & ~torch.eye(
            active.numel(), dtype=torch.bool, device=logits.device
        )
        logits = logits.masked_fill(same_expert, float("-inf"))
    target = torch.arange(active.numel(), device=logits.device)
    return F.cross_entropy(logits, target) + zero
