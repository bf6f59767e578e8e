"""ProMoE two-step router: conditional/unconditional split, then prototypical routing.

Wei et al. 2025, "Routing Matters in MoE: Scaling Diffusion Transformers with Explicit
Routing Guidance" (ProMoE, ICLR 2026, arXiv:2510.24711).

Step 1, conditional routing. Under classifier-free guidance a sample whose text was dropped
(ctx.is_null[b]) plays a different role (the unconditional prediction) from a conditioned
one. All tokens of such a sample go to one dedicated unconditional expert, with weight 1 and
to no other expert. That expert is the LAST routed expert, index num_experts - 1.

Step 2, prototypical routing of the conditional tokens over experts 0 .. num_experts - 2.
Each of them owns `num_prototypes_per_expert` learnable prototypes in token space:

    cos[t, e] = max_p cos(token_t, prototype_{e,p})          [N, E - 1]
    scores    = softmax_e(scale * cos)
    top_k experts by score; weight = their scores, renormalised to sum 1 if cfg.renormalize

Cosine similarity makes routing depend on the token's direction (its semantic content), not
its norm, which adaLN modulation changes with the timestep. The reference code applies the
softmax to the raw cosine (scale 1), which leaves weights nearly uniform; we learn the scale
(`log_scale`, initialised to 10, capped at 100 as CLIP does) so the router can sharpen.
Like the released code we route the tokens themselves, without a learned projection.

Routing contrastive loss (aux 'contrastive', when model.moe.contrastive_loss > 0): InfoNCE
between each used prototype and the centroid of the conditional tokens it won (a token's
prototype is the best-matching prototype of its top-1 expert), temperature 0.1 as in the
reference code; see router_losses.routing_contrastive_loss.

Under sequence sharding the centroids are those of the conditional tokens of every shard
(their sums and counts are all-reduced, see router_losses.routing_contrastive_loss).

If ctx.is_null is None every sample is treated as conditional: the training loop must pass
it, or the unconditional expert never trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.model.init import Init
from megamoe.moe.router_losses import routing_contrastive_loss
from megamoe.moe.routers.base import Router, RouterOutput, RoutingContext, register_router, require


@register_router("promoe")
class ProMoERouter(Router):
    contrastive_temperature = 0.1
    max_scale = 100.0

    # Not read: num_null_experts, bias_balancing, score_func (scores are a softmax of scaled
    # cosines), balance_loss and z_loss (the cosine logits are bounded by the learned scale).
    config_keys = Router.config_keys | {"num_prototypes_per_expert", "renormalize", "contrastive_loss"}

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        require(
            cfg.num_experts >= 2,
            f"router 'promoe' needs model.moe.num_experts >= 2 (the last one is the "
            f"unconditional expert), got {cfg.num_experts}",
        )
        super().check_config(cfg)
        require(
            cfg.top_k <= cfg.num_experts - 1,
            f"model.moe.top_k={cfg.top_k} must be in [1, num_experts - 1 = "
            f"{cfg.num_experts - 1}] for router 'promoe' (the last expert is reserved for unconditional tokens)",
        )
        require(
            cfg.num_prototypes_per_expert >= 1,
            f"model.moe.num_prototypes_per_expert must be >= 1, got {cfg.num_prototypes_per_expert}",
        )

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.num_conditional = cfg.num_experts - 1
        self.unconditional_expert = cfg.num_experts - 1
        self.num_prototypes = cfg.num_prototypes_per_expert
        # Expert-major: rows e*P .. (e+1)*P - 1 belong to conditional expert e.
        self.prototypes = nn.Parameter(torch.empty(self.num_conditional * self.num_prototypes, dim))
        # Shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors refuse.
        self.log_scale = nn.Parameter(torch.empty(1))
        self.register_buffer(
            "prototype_expert",
            torch.empty(self.num_conditional * self.num_prototypes, dtype=torch.long),
            persistent=False,
        )
        for name, init in self.parameter_inits().items():
            init.fill_(getattr(self, name))
        self.reset_buffers()

    def parameter_inits(self) -> dict[str, Init]:
        """Prototypes N(0, 0.02^2) (small random directions: cosine routing ignores their norm);
        scale 10 (see the module docstring)."""
        return {"prototypes": Init.normal(0.02), "log_scale": Init.constant(math.log(10.0))}

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """prototype_expert[row]: the conditional expert that prototype row belongs to (expert-major)."""
        if self.prototype_expert.is_meta:  # computed when materialised (meta arange would load torch's compiler)
            return
        self.prototype_expert.copy_(
            torch.arange(self.num_conditional, device=self.prototype_expert.device).repeat_interleave(
                self.num_prototypes
            )
        )

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        n, e, p, k = tokens.shape[0], self.num_experts, self.num_prototypes, self.cfg.top_k
        b, l = ctx.batch_size, ctx.seq_len
        if b * l != n:
            raise ValueError(f"promoe router got {n} tokens but batch_size*seq_len = {b}*{l}")
        if ctx.is_null is None:
            null_token = torch.zeros(n, dtype=torch.bool, device=tokens.device)
        else:
            if ctx.is_null.shape != (b,):
                raise ValueError(f"promoe router needs ctx.is_null of shape [{b}], got {tuple(ctx.is_null.shape)}")
            null_token = ctx.is_null.to(device=tokens.device, dtype=torch.bool).repeat_interleave(l)

        prototypes = self.prototypes.float()
        cos_all = F.normalize(tokens, dim=-1) @ F.normalize(prototypes, dim=-1).t()  # [N, (E-1)*P]
        cos = cos_all.view(n, self.num_conditional, p).amax(dim=-1)  # an expert is as close as its best prototype
        scale = self.log_scale.float().clamp(max=math.log(self.max_scale)).exp()
        scores = F.softmax(scale * cos, dim=-1)
        with torch.no_grad():
            top_idx = self.replay(scores.topk(k, dim=-1).indices)
        weights = scores.gather(1, top_idx)
        if self.cfg.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        cond_probs = torch.zeros(n, e, dtype=torch.float32, device=tokens.device).scatter(1, top_idx, weights)
        cond_map = torch.zeros(n, e, dtype=torch.bool, device=tokens.device).scatter(1, top_idx, True)

        uncond = torch.zeros(n, e, dtype=torch.bool, device=tokens.device)
        uncond[:, self.unconditional_expert] = True
        routing_map = torch.where(null_token.unsqueeze(1), uncond, cond_map)
        probs = torch.where(null_token.unsqueeze(1), uncond.float(), cond_probs)

        aux = {}
        if self.cfg.contrastive_loss > 0:
            cond = ~null_token
            with torch.no_grad():
                top1 = top_idx[:, 0]
                best = cos_all.view(n, self.num_conditional, p)[torch.arange(n, device=tokens.device), top1].argmax(-1)
                assignment = top1 * p + best
            aux["contrastive"] = routing_contrastive_loss(
                tokens[cond],
                prototypes,
                assignment[cond],
                self.contrastive_temperature,
                groups=self.prototype_expert,
                shards=self.token_shards,
            )
        return RouterOutput(probs=probs, routing_map=routing_map, aux=aux)
