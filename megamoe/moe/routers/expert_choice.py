"""Expert-choice routing: every expert picks its top-C tokens.

Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing" (NeurIPS 2022,
arXiv:2202.09368); used for diffusion by EC-DiT (Sun et al. 2024, arXiv:2410.02098).

    scores = softmax_e(tokens @ W_gate^T)                      [N, E]
    C      = round(capacity_factor * T * top_k / E), in [1, T]
    expert e takes the C tokens with the largest scores[:, e] (all tokens tied at the C-th score)
    probs[t, e] = scores[t, e] where chosen, 0 elsewhere

T is the number of tokens one selection sees: L with `expert_choice_scope: sample`
(each expert picks C tokens inside every sample) or N = B * L with `batch` (C over the
whole micro-batch). Every expert is exactly full, so no balance loss is needed; a token
gets anything from 0 to E experts (tokens nobody picks pass through the residual only).

Under sequence sharding a sample's tokens are spread over the ranks: T and the C-th score are
those of the whole sample (or micro-batch), found by exchanging each rank's top-C scores per
expert, so every rank selects what one process would.

Inference applies the same rule. With scope `sample` a sample's routing depends only on
its own tokens; with scope `batch` it depends on the other samples of the micro-batch
(e.g. the CFG-null copy batched next to it), so outputs change with the batch make-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.moe.routers.base import Router, RouterOutput, RoutingContext, register_router, require

# model.moe.expert_choice_scope: the tokens one expert's top-C selection ranks against each other.
SCOPES = ("sample", "batch")


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    """C = round(capacity_factor * tokens * top_k / num_experts), rounded half up, clamped to [1, tokens]."""
    c = int(capacity_factor * tokens * top_k / num_experts + 0.5)
    return max(1, min(tokens, c))


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    # Balanced by construction: no balance loss or bias; scores are always a softmax, never
    # renormalised; no z-loss is computed here.
    config_keys = Router.config_keys | {"expert_choice_scope", "capacity_factor"}

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        super().check_config(cfg)
        require(
            cfg.expert_choice_scope in SCOPES,
            f"model.moe.expert_choice_scope must be one of {', '.join(SCOPES)}, got '{cfg.expert_choice_scope}'",
        )
        require(cfg.capacity_factor > 0, f"model.moe.capacity_factor must be > 0, got {cfg.capacity_factor}")

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        n, e = tokens.shape[0], self.num_experts
        b, l = ctx.batch_size, ctx.seq_len
        if b * l != n:
            raise ValueError(f"expert_choice router got {n} tokens but batch_size*seq_len = {b}*{l}")
        # fp32 weights even when the module was cast to bf16: small score gaps decide the pick.
        scores = F.softmax(F.linear(tokens, self.gate.weight.float()), dim=-1)

        if self.cfg.expert_choice_scope == "sample":
            per_group = scores.view(b, l, e)  # select within each sample: groups = samples
        else:
            per_group = scores.view(1, n, e)  # one group: the whole micro-batch
        # Under sequence sharding a group's tokens are spread over the shards: C counts them all,
        # and each expert takes every token whose score reaches the C-th largest of its group.
        shards = self.token_shards
        c = expert_capacity(self.cfg.capacity_factor, per_group.shape[1] * shards.num, self.cfg.top_k, e)

        # Selection is a discrete decision: no gradient through it, only through the selected
        # scores (the combine weights).
        mask = self.replay(per_group.detach() >= shards.kth_largest(per_group.detach(), c, dim=1))  # [groups, T, E]
        probs = per_group * mask

        routing_map = mask.view(n, e)
        aux = {"unrouted_fraction": (~routing_map.any(dim=1)).float().mean().detach()}
        return RouterOutput(probs=probs.view(n, e), routing_map=routing_map, aux=aux)
