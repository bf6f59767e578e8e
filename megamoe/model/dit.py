"""The Wan2.x video diffusion transformer (DiT), numerically equal to diffusers' `WanTransformer3DModel`.

latents [B, C, F, H, W] --Conv3d patchify--> tokens [B, L, dim], L = F'H'W'
timestep [B] (0..1000) --sinusoid--> MLP --> temb [B, dim] --SiLU, Linear--> 6 x dim modulation
text [B, L_text, text_dim] --GELU-tanh MLP--> [B, L_text, dim]
blocks: adaLN-modulated self-attention (3D RoPE), plain cross-attention, adaLN-modulated FFN
head: LayerNorm modulated by temb, Linear, unpatchify --> [B, C_out, F, H, W]

Attribute names equal diffusers' so `state_dict()` keys are identical (see weights.py). The
LayerNorms and the modulation arithmetic run in float32 whatever the weights' dtype, as in
diffusers, because bf16 modulation of the residual stream visibly degrades samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import ModelConfig
from megamoe.model.attention import WanAttention
from megamoe.model.block_routing import BlockPaths
from megamoe.model.feed_forward import FeedForward
from megamoe.model.init import ZEROS, Init, inits_of, materialize
from megamoe.model.init import reset_parameters as reset_with_torch_rng
from megamoe.model.lora_mixer import freeze_base
from megamoe.model.mixture_of_depths import MixtureOfDepths, mod_layer_indices
from megamoe.model.rope import WanRotaryEmbedding
from megamoe.moe.layer import MoEFeedForward, moe_layer_indices
from megamoe.moe.routers.base import RoutingContext


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class MLP(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection keys)."""

    def __init__(self, in_dim: int, dim: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = act
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] -> [N, dim] as [cos | sin] (diffusers: flip_sin_to_cos=True, downscale_freq_shift=0).

    Frequencies in float32, laid out exactly like diffusers' so that pretrained Wan weights
    see the features they were trained on.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb, 6-way block modulation); text -> model width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLP(cfg.freq_dim, cfg.dim, nn.SiLU())
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = MLP(cfg.text_dim, cfg.dim, nn.GELU(approximate="tanh"))

    def forward(self, timestep: torch.Tensor, text: torch.Tensor):
        """timestep [B, T] (T = 1, or one per token) -> temb [B, T, dim], modulation [B, T, 6, dim]."""
        b, t = timestep.shape
        freq = timestep_sinusoid(timestep.flatten(), self.freq_dim).unflatten(0, (b, t))
        temb = self.time_embedder(freq.to(self.time_embedder.linear_1.weight.dtype)).type_as(text)
        modulation = self.time_proj(self.act_fn(temb)).unflatten(-1, (6, -1))
        return temb, modulation, self.text_embedder(text)


def _modulate(norm_x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (norm_x * (1 + scale) + shift).to(dtype)


class WanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, cfg.num_heads, cfg.eps, cfg.lora)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.attn2 = WanAttention(dim, cfg.num_heads, cfg.eps, cfg.lora)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        if layer_index in moe_layer_indices(cfg):
            self.ffn = MoEFeedForward(
                dim, cfg.ffn_dim, cfg.moe, target_dim=cfg.out_channels * math.prod(cfg.patch_size)
            )
        else:
            self.ffn = FeedForward(dim, cfg.ffn_dim)
        # Mixture-of-depths: a token router picks the tokens that run this block (model/mixture_of_depths.py).
        self.mod = MixtureOfDepths(dim, cfg.mod) if layer_index in mod_layer_indices(cfg) else None
        # Per-block offset added to the shared time projection: each block gets its own
        # shift/scale/gate while the timestep MLP is shared (Wan's cheap adaLN).
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, dim))

    def parameter_inits(self) -> dict[str, Init]:
        """N(0, 1/dim) modulation offsets, as Wan (WanDiT.parameter_inits says why)."""
        return {"scale_shift_table": Init.normal(self.scale_shift_table.shape[-1] ** -0.5)}

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, modulation: torch.Tensor, rope, ctx: RoutingContext | None = None
    ) -> torch.Tensor:
        """x [B, L, dim]; text [B, L_text, dim]; modulation [B, T, 6, dim] with T in {1, L};
        ctx: what an MoE FFN's router may condition on."""
        if self.mod is not None:  # only the tokens the router picks run the block; the rest skip it
            return self.mod(self.run, x, text, modulation, rope, ctx)
        return self.run(x, text, modulation, rope, ctx)

    def run(self, x, text, modulation, rope, ctx=None) -> torch.Tensor:
        """The block on every token of x; rope [L, head_dim/2], or [B, L, head_dim/2] per sample."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + modulation.float()
        ).unbind(2)
        dtype = x.dtype

        h = self.attn1(_modulate(self.norm1(x.float()), shift_msa, scale_msa, dtype), rope=rope)
        x = (x.float() + h * gate_msa).to(dtype)

        x = x + self.attn2(self.norm2(x.float()).to(dtype), context=text)

        h = self.ffn(_modulate(self.norm3(x.float()), shift_mlp, scale_mlp, dtype), ctx)
        return (x.float() + h.float() * gate_mlp).to(dtype)


class NoSequenceSharding:
    """`WanDiT.sequence_sharding` in one process: the whole sequence is here.

    Context and sequence parallelism replace it (megamoe/parallel/context.py) with an object that
    keeps this rank's chunk of the tokens and gathers the prediction back, so the model file
    stays rank-agnostic, like WanAttention's `attend` hook.
    """

    num_shards = 1
    """Disjoint pieces of the sequence across ranks."""
    index = 0
    """Which of them this rank holds."""

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def shard_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos, sin

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x


class WanDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads or (cfg.dim // cfg.num_heads) % 2 or cfg.dim // cfg.num_heads < 6:
            raise ValueError(f"model.dim={cfg.dim} / model.num_heads={cfg.num_heads} must be an even head dim >= 6")
        if len(cfg.patch_size) != 3:
            raise ValueError(f"model.patch_size must be (frames, height, width), got {cfg.patch_size}")
        self.cfg = cfg
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        dim = cfg.dim
        self.rope = WanRotaryEmbedding(dim // cfg.num_heads, cfg.rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList(WanBlock(cfg, i) for i in range(cfg.num_layers))
        self.block_paths = BlockPaths(cfg) if cfg.block_router.enabled else None
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(self.patch_size))
        # The head is modulated by temb itself (not the 6-way projection): shift, scale.
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim))
        self.sequence_sharding = NoSequenceSharding()
        self.reset_parameters()
        if cfg.lora.num_experts > 0:  # LoRA-Mixer fine-tuning: only the adapters train
            freeze_base(self)

    def parameter_inits(self) -> dict[str, Init]:
        """Wan's from-scratch initialisation, where it differs from megamoe.model.init's defaults
        (Xavier-uniform linears with zero bias, which keep activations O(1) through the residual
        stream; norms at one; routed experts as dense FFNs, see GroupedExperts).

        The timestep and text MLPs get N(0, 0.02) as in the original Wan code, which keeps the
        conditioning signals small while the trunk is still random. proj_out is zero so the untrained
        model predicts exactly 0 (the mean velocity for zero-mean data) instead of a random field
        that the first steps would have to unlearn, as in DiT's zero-initialised final layer. The
        modulation tables get N(0, 1/dim) (as Wan) rather than DiT's zero gates: the trunk then gets
        gradient as soon as proj_out leaves zero (after the first step) instead of also waiting for
        its gates to grow. The patch embedding is Xavier over its flattened [dim, C * prod(patch)]
        kernel (fan_out = dim, not dim * prod(patch) as torch counts a convolution's).
        """
        embed = self.patch_embedding
        inits = {
            "scale_shift_table": Init.normal(self.cfg.dim**-0.5),
            "proj_out.weight": ZEROS,
            "proj_out.bias": ZEROS,
            "patch_embedding.weight": Init.xavier_uniform(embed.weight[0].numel(), embed.out_channels),
            "patch_embedding.bias": ZEROS,
        }
        for mlp in ("time_embedder", "text_embedder"):
            for linear in ("linear_1", "linear_2"):
                inits[f"condition_embedder.{mlp}.{linear}.weight"] = Init.normal(0.02)
        return inits

    def reset_parameters(self) -> None:
        """Draw every parameter from `parameter_inits` (and the defaults) with torch's global RNG.
        `build_model` draws the same distributions as a function of a seed instead."""
        reset_with_torch_rng(self)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """latents [B, C_in, F, H, W]; timestep [B] in 0..1000 (or [B, L] per token, Wan2.2 TI2V style);
        text [B, L_text, text_dim] -> prediction [B, C_out, F, H, W]."""
        grid = self._grid(latents)
        b = latents.shape[0]
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()  # [B, L, dim]
        if timestep.ndim == 1:
            timestep = timestep[:, None]
        if timestep.shape not in ((b, 1), (b, x.shape[1])):
            raise ValueError(
                f"timestep has shape {tuple(timestep.shape)}; expected [{b}] or [{b}, {x.shape[1]}] "
                f"(one per sample, or one per token)"
            )
        # The CFG-null text is the all-zero embedding (text dropout and the sampler use zeros, as
        # Wan pads with zeros), so an all-zero raw input marks an unconditional sample;
        # after the text MLP it would no longer be zero.
        is_null = (text == 0).flatten(1).all(1)
        # Under context/sequence parallelism this rank keeps its chunk of the tokens (and of
        # per-token timesteps) from here to the head; identities in one process.
        shards = self.sequence_sharding
        x = shards.shard(x)
        if timestep.shape[1] != 1:
            timestep = shards.shard(timestep)
        temb, modulation, text = self.condition_embedder(timestep, text)
        ctx = RoutingContext(
            batch_size=b,
            seq_len=x.shape[1],
            temb=temb[:, 0] if temb.shape[1] == 1 else temb,
            text=text,
            is_null=is_null,
            timestep=timestep[:, 0] if timestep.shape[1] == 1 else timestep,
            grid=grid,
            token_offset=shards.index * x.shape[1],
        )
        rope = shards.shard_rope(*self.rope(grid, x.device))
        if self.block_paths is not None:  # Dr.LLM routers pick each sample's path (model/block_routing.py)
            x = self.block_paths(self.blocks, x, text, modulation, rope, ctx, shards)
        else:
            for block in self.blocks:
                x = block(x, text, modulation, rope, ctx)
        shift, scale = (self.scale_shift_table[None] + temb[:, :, None]).unbind(2)
        x = _modulate(self.norm_out(x.float()), shift, scale, x.dtype)
        return self._unpatchify(shards.gather(self.proj_out(x)), grid)

    def _grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        if latents.ndim != 5 or latents.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"latents must be [B, {self.cfg.in_channels}, F, H, W] (model.in_channels), got {tuple(latents.shape)}"
            )
        fhw = latents.shape[2:]
        if any(n % p for n, p in zip(fhw, self.patch_size)):
            raise ValueError(
                f"latent size (F, H, W)={tuple(fhw)} is not divisible by model.patch_size="
                f"{list(self.patch_size)}; crop or pad the latents to a multiple of it"
            )
        return tuple(n // p for n, p in zip(fhw, self.patch_size))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, L, pt*ph*pw*C] in the token order and patch layout of the output
        head: the inverse of `_unpatchify` (for losses on per-token predictions of the target)."""
        (f, h, w), (pt, ph, pw) = self._grid_of(x.shape[2:]), self.patch_size
        x = x.reshape(x.shape[0], x.shape[1], f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(x.shape[0], f * h * w, -1)

    def _grid_of(self, fhw) -> tuple[int, int, int]:
        return tuple(n // p for n, p in zip(fhw, self.patch_size))

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        # Each token holds its patch as (pt, ph, pw, C), C fastest, as in diffusers.
        (f, h, w), (pt, ph, pw) = grid, self.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones once); works on the meta device."""
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0, initialize: bool = True) -> WanDiT:
    """Build and initialise a WanDiT in one process.

    Built on the meta device, then each parameter is allocated on `device` and drawn as a pure
    function of (seed, its name, each value's position): see megamoe/model/init.py. The model
    sharded over ranks by `megamoe.parallel.parallelize.build_sharded_model` holds exactly these
    values. initialize=False leaves the parameters uninitialised (buffers are computed), for a
    caller that loads every weight next. device="meta" allocates nothing (for counting, or to
    materialise later).
    """
    with torch.device("meta"):
        model = WanDiT(cfg)
    if torch.device(device).type == "meta":
        return model
    return materialize(model, inits_of(model), device, seed, initialize=initialize)
