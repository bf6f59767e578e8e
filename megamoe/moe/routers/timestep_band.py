"""Timestep-band experts: every token goes to the experts of its noise-level band.

As in Wan2.2-A14B (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models",
arXiv:2503.20314; the Wan2.2 release): a high-noise expert denoises the early steps (layout,
motion) and a low-noise expert the late ones (detail), switched at a fixed timestep boundary
(Wan2.2-A14B: 0.875 * 1000 for text-to-video, 0.9 * 1000 for image-to-video, with the high-noise
expert taken iff t >= boundary).

Bands. `timestep_band_boundaries` b_0 < b_1 < ... < b_{B-1}, in timesteps 0..1000, cut the noise
levels into B + 1 bands; a token with timestep t is in band

    band(t) = #{i : t >= b_i}        (0 = the lowest noise, B = the highest)

so a timestep equal to a boundary belongs to the band above it (Wan2.2 picks the high-noise
expert iff t >= boundary). Each token is banded by its OWN timestep: RoutingContext.timestep is
[B] (one per sample, broadcast over its tokens) or [B, L] per token (Wan2.2 TI2V, whose clean
first-frame tokens have t = 0 and so sit in band 0 while the rest of the sample is noisier).

Experts. The num_experts experts are split evenly into the B + 1 bands: band j owns experts
[j * P, (j + 1) * P), P = num_experts / (B + 1). The second stage, `timestep_band_router`:
    none   P = 1: the token goes to its band's expert with weight 1 (Wan2.2-A14B), top_k = 1.
    linear, mlp, cross_attention
           that token-choice router, built from the registry with this MoEConfig, scores all
           num_experts columns; the columns outside the token's band are set to -inf before its
           softmax / sigmoid and top-k, so it picks top_k of its band's P experts exactly as it
           would if only those existed. Its balance and z losses are computed as usual.
Other routers do not compose: their selections span tokens (expert choice, race, Sinkhorn) or
own an expert (ProMoE), which a per-token column mask would not restrict exactly. Aux-free
bias balancing and null experts are refused: a bias or an unmasked null column could out-bid
the band's experts.

The band index passes through `Router.replay` (routing replay); the inner router replays its own
top-k. At sampling the experts switch with the noise level by themselves (the timestep decides);
`megamoe/diffusion/sampler.py` can also give each band its own CFG scale.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from megamoe.config import MoEConfig
from megamoe.moe.routers.base import ROUTERS, Reduce, Router, RouterOutput, RoutingContext, register_router, require
from megamoe.moe.routers.token_choice import CrossAttentionRouter, LinearRouter, MLPRouter
from megamoe.moe.token_shards import ONE_PROCESS, TokenShards

TIMESTEP_RANGE = 1000.0
# model.moe.timestep_band_router: the second stage within a band.
INNER_ROUTERS = ("linear", "mlp", "cross_attention")
INNER_CHOICES = ("none", *INNER_ROUTERS)
_OWN_KEYS = frozenset({"timestep_band_boundaries", "timestep_band_router"})


def band_index(timestep: torch.Tensor, boundaries: list[float]) -> torch.Tensor:
    """Timesteps (any shape, 0..1000) -> int64 band of each, same shape: how many boundaries are <= t."""
    edges = torch.tensor(boundaries, dtype=torch.float32, device=timestep.device)
    return torch.bucketize(timestep.float().contiguous(), edges, right=True)


@dataclasses.dataclass
class BandContext(RoutingContext):
    """The routing context plus the columns each token may take (its band's experts)."""

    allowed: torch.Tensor | None = None
    """bool [N, E]: True on the experts of the token's band."""


class _BandRestricted:
    """Mixed into a token-choice router: its logits outside the token's band become -inf."""

    def logits(self, tokens: torch.Tensor, ctx: BandContext) -> torch.Tensor:
        return super().logits(tokens, ctx).masked_fill(~ctx.allowed, float("-inf"))


class BandLinearRouter(_BandRestricted, LinearRouter):
    pass


class BandMLPRouter(_BandRestricted, MLPRouter):
    pass


class BandCrossAttentionRouter(_BandRestricted, CrossAttentionRouter):
    pass


RESTRICTED = {"linear": BandLinearRouter, "mlp": BandMLPRouter, "cross_attention": BandCrossAttentionRouter}
# The inner routers' keys but aux-free balancing and null experts (refused: a bias or an unmasked null
# column could out-bid the band's experts).
_INNER_KEYS = frozenset(
    key
    for key in frozenset().union(*(ROUTERS[name].config_keys for name in INNER_ROUTERS)) - Router.config_keys
    if not key.startswith("bias_") and key != "num_null_experts"
)


def inner_config(cfg: MoEConfig) -> MoEConfig:
    """The config the inner router is built and checked with: its own name, this router's keys at their
    defaults, no per-layer regularization head (this router adds it once)."""
    default = MoEConfig()
    return dataclasses.replace(
        cfg,
        router=cfg.timestep_band_router,
        timestep_band_boundaries=list(default.timestep_band_boundaries),
        timestep_band_router=default.timestep_band_router,
        layer_reg_loss=0.0,
    )


@register_router("timestep_band")
class TimestepBandRouter(Router):
    # Every key an inner router may read; check_config refuses those the chosen one does not.
    config_keys = Router.config_keys | _OWN_KEYS | _INNER_KEYS

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        require(
            cfg.num_null_experts == 0,
            f"model.moe.num_null_experts={cfg.num_null_experts} is not supported with router=timestep_band; set it to 0",
        )
        require(
            not cfg.bias_balancing,
            "model.moe.bias_balancing=true is not supported with router=timestep_band (the bias could pick an "
            "expert outside the token's band); set it to false",
        )
        super().check_config(cfg)
        bounds = list(cfg.timestep_band_boundaries)
        require(
            len(bounds) >= 1 and all(0 < b < TIMESTEP_RANGE for b in bounds) and bounds == sorted(set(bounds)),
            f"model.moe.timestep_band_boundaries must be a non-empty, strictly increasing list of timesteps in "
            f"(0, 1000), e.g. [875.0]; got {bounds}",
        )
        inner, bands = cfg.timestep_band_router, len(bounds) + 1
        require(
            inner in INNER_CHOICES,
            f"model.moe.timestep_band_router must be one of {', '.join(INNER_CHOICES)} (other routers select "
            f"across tokens and cannot be restricted to a band), got '{inner}'",
        )
        readers = Router.config_keys | _OWN_KEYS | (ROUTERS[inner].config_keys if inner != "none" else frozenset())
        default = MoEConfig()
        for key in sorted(_INNER_KEYS - readers):
            require(
                getattr(cfg, key) == getattr(default, key),
                f"model.moe.{key}={getattr(cfg, key)} has no effect with model.moe.timestep_band_router={inner}; "
                f"remove it or set it back to {getattr(default, key)}",
            )
        if inner == "none":
            require(
                cfg.num_experts == bands,
                f"model.moe.num_experts={cfg.num_experts} must equal the number of bands ({bands}) with "
                f"timestep_band_router=none (one expert per band); change num_experts or choose an inner router",
            )
            require(
                cfg.top_k == 1,
                f"model.moe.top_k={cfg.top_k} must be 1 with timestep_band_router=none (each token takes its "
                f"band's one expert); set top_k=1",
            )
        else:
            require(
                cfg.num_experts % bands == 0 and cfg.top_k <= cfg.num_experts // bands,
                f"model.moe.num_experts={cfg.num_experts} must split evenly into {bands} bands with at least "
                f"top_k={cfg.top_k} experts each; change num_experts, top_k or timestep_band_boundaries",
            )
            require(
                cfg.balance_loss == 0 or cfg.top_k < cfg.num_experts // bands,
                f"model.moe.balance_loss={cfg.balance_loss} has no effect with top_k={cfg.top_k} experts of "
                f"{cfg.num_experts // bands} per band (every token takes its whole band, so the load is fixed); "
                f"set balance_loss=0 or lower top_k",
            )
            ROUTERS[inner].check_config(inner_config(cfg))

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.boundaries = [float(b) for b in cfg.timestep_band_boundaries]
        self.num_bands = len(self.boundaries) + 1
        self.experts_per_band = cfg.num_experts // self.num_bands
        inner = cfg.timestep_band_router
        self.inner: Router | None = None if inner == "none" else RESTRICTED[inner](dim, inner_config(cfg))

    # parallelize() sets the router's token shards; the inner router's losses need them too.
    @property
    def token_shards(self) -> TokenShards:
        return self.__dict__.get("_token_shards", ONE_PROCESS)

    @token_shards.setter
    def token_shards(self, shards: TokenShards) -> None:
        self.__dict__["_token_shards"] = shards
        if self.__dict__.get("_modules", {}).get("inner") is not None:
            self.inner.token_shards = shards

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        n = tokens.shape[0]
        b, l = ctx.batch_size, ctx.seq_len
        if ctx.timestep is None:
            raise ValueError("the timestep_band router needs RoutingContext.timestep")
        t = ctx.timestep.to(tokens.device)
        if t.shape not in ((b,), (b, l)) or b * l != n:
            raise ValueError(f"timestep_band router got timestep {tuple(t.shape)} for {b} x {l} tokens ({n} given)")
        t = t[:, None].expand(b, l) if t.ndim == 1 else t
        band = self.replay(band_index(t.reshape(n), self.boundaries))  # [N] int64
        if self.inner is None:
            picked = band[:, None]  # expert j is band j
            routing_map = F.one_hot(band, self.num_experts).bool()
            return RouterOutput(routing_map.float(), routing_map, {}, topk_indices=picked)
        columns = torch.arange(self.num_experts, device=tokens.device)
        allowed = (columns[None, :] // self.experts_per_band) == band[:, None]  # [N, E]
        fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(RoutingContext)}
        return self.inner(tokens, BandContext(**fields, allowed=allowed))

    def expert_groups(self) -> list[list[int]]:
        """Each band's experts: tokens of band j can only reach them (see Router.expert_groups)."""
        per = self.experts_per_band
        return [list(range(j * per, (j + 1) * per)) for j in range(self.num_bands)]

    @torch.no_grad()
    def after_step(self, reduce: Reduce) -> None:
        if self.inner is not None:
            self.inner.after_step(reduce)

    def discard_step(self) -> None:
        if self.inner is not None:
            self.inner.discard_step()
