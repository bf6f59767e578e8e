"""The one interface every router implements, and the registry that builds them by name.

A router sees the tokens of one MoE layer, flattened to [N, dim] with N = B * L, and the
block's conditioning, and decides which experts each token visits and with what weight:

    probs        [N, E_total] fp32  combine weight of each (token, expert); zero where not routed
    routing_map  [N, E_total] bool  which experts each token visits (any number, also zero)
    aux          dict[str, Tensor]  unweighted auxiliary losses (keys from losses.LOSS_NAMES,
                                    scalars with gradient) and statistics (detached)
    topk_indices [N, k] int64       optional: the same selection as k expert ids per token

E_total = num_experts + num_null_experts; columns >= num_experts are null experts that
cost no compute and contribute zero output. The MoE layer, the dispatcher and the experts
never look at which router produced this: any routing_map is executed exactly (dropless).
Routing math runs in fp32 whatever the model dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import ConfigError, MoEConfig
from megamoe.model.activation_checkpointing import current_routing_record
from megamoe.moe.token_shards import ONE_PROCESS, TokenShards

# Token scores from gate logits, for the routers that read `model.moe.score_func`.
SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class RoutingContext:
    """What a router may condition on besides the tokens, for one micro-batch."""

    batch_size: int
    """B: the tokens are [B * L, dim], sample-major."""
    seq_len: int
    """L: tokens per sample (local part under context parallelism)."""
    temb: torch.Tensor | None = None
    """Timestep embedding [B, dim] or per token [B, L, dim]."""
    text: torch.Tensor | None = None
    """Projected text embeddings [B, L_text, dim]."""
    is_null: torch.Tensor | None = None
    """bool [B]: the sample's text is the CFG-null (all-zero) embedding."""
    timestep: torch.Tensor | None = None
    """Raw timesteps [B] in 0..1000, or [B, L] per token (Wan2.2 TI2V); for load-by-timestep diagnostics."""
    grid: tuple[int, int, int] | None = None
    """(F', H', W'): the patch grid of the whole sequence; token p sits at (p // (H'W'), p // W' % H', p % W')."""
    token_offset: int = 0
    """Position in the whole sequence of this rank's first token (its chunk under context/sequence parallelism)."""


@dataclass
class RouterOutput:
    probs: torch.Tensor
    routing_map: torch.Tensor
    aux: dict = field(default_factory=dict)
    topk_indices: torch.Tensor | None = None
    """[N, k] int64, from routers that select exactly k experts per token (null ids included):
    the routing map's True columns of each row, so the dispatcher sorts N * k ids instead of
    scanning the [N, E_total] map. Routers with any other selection leave it None."""


# A function that sums a tensor over the data-parallel ranks (identity in one process).
Reduce = Callable[[torch.Tensor], torch.Tensor]


class Router(nn.Module):
    """Base class: subclasses implement `route`; `forward` enforces fp32 and output shapes.

    Each router class lists in `config_keys` the `model.moe` fields it reads and checks their
    values in `check_config`, which both `config_checks.validate()` and the constructor call: a
    field that only other routers read must keep its default, so no setting is accepted and
    then ignored. Fields outside every router's `config_keys` belong to the MoE layer.
    """

    name = "?"  # set by register_router
    config_keys: frozenset = frozenset({"top_k", "layer_reg_loss"})
    fp32_buffers: tuple[str, ...] = ()
    """Buffers that module-wide casts (`model.bfloat16()`, DeepSpeed bf16) must leave fp32, following
    only the device: router state updated outside the optimizer in small steps (aux-free bias,
    learned thresholds), which bf16 rounding would silently stop."""

    token_shards: TokenShards = ONE_PROCESS
    """Where the other tokens of the batch are (set by parallelize()): losses and selections that
    span tokens reduce their statistics through it, so they equal the unsharded computation."""

    def __init__(self, dim: int, cfg: MoEConfig, layer_reg_out_dim: int | None = None):
        super().__init__()
        self.check_config(cfg)
        self.dim = dim
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.num_total = cfg.num_experts + cfg.num_null_experts
        # What a rebuild (e.g. upcycling's fresh routers) must pass besides (dim, cfg).
        self.init_kwargs = {"layer_reg_out_dim": layer_reg_out_dim}
        # Race-DiT's per-layer regularization, for any router: a linear head on the router's
        # input predicts the diffusion target (patchified velocity, [N, out_dim]) so that
        # intermediate tokens stay informative; the training loop takes the MSE.
        self.layer_reg_head: nn.Linear | None = None
        if cfg.layer_reg_loss > 0:
            if layer_reg_out_dim is None:
                raise ValueError(
                    "model.moe.layer_reg_loss > 0 needs the target width: build the router with "
                    "layer_reg_out_dim=prod(model.patch_size) * model.out_channels"
                )
            self.layer_reg_head = nn.Linear(dim, layer_reg_out_dim)

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        """Raise ConfigError, one line naming the key and the fix, unless `cfg` is a setting
        this router runs as written. Subclasses extend it (call super() first)."""
        _refuse_unread_keys(cls, cfg)
        require(cfg.num_experts >= 1, f"model.moe.num_experts must be >= 1 for an MoE layer, got {cfg.num_experts}")
        total = cfg.num_experts + cfg.num_null_experts
        require(
            1 <= cfg.top_k <= total,
            f"model.moe.top_k={cfg.top_k} must be between 1 and the number of experts "
            f"({cfg.num_experts} routed + {cfg.num_null_experts} null); lower top_k or add experts",
        )
        for key in sorted(k for k in cls.config_keys if k.endswith("_loss")):
            require(getattr(cfg, key) >= 0, f"model.moe.{key} must be >= 0 (0 = off), got {getattr(cfg, key)}")

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self.fp32_buffers if self._buffers.get(name) is not None}
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            now = self._buffers[name]
            if now.dtype != torch.float32:
                self._buffers[name] = before.to(device=now.device, dtype=torch.float32)
        return out

    def forward(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            out = self.route(tokens.float(), ctx)
            if self.layer_reg_head is not None:
                head = self.layer_reg_head
                out.aux["layer_reg_prediction"] = F.linear(tokens.float(), head.weight.float(), head.bias.float())
        n = tokens.shape[0]
        assert out.probs.shape == (n, self.num_total) and out.probs.dtype == torch.float32, out.probs.shape
        assert out.routing_map.shape == (n, self.num_total) and out.routing_map.dtype == torch.bool
        assert out.topk_indices is None or (out.topk_indices.ndim == 2 and out.topk_indices.shape[0] == n)
        return out

    def replay(self, selection: torch.Tensor) -> torch.Tensor:
        """Every router passes its selection (the tensor that fixes which experts each token visits:
        a routing map, top-k indices, a coin) through here once per forward, at the point where it
        is made, and routes with what comes back. Routing replay: a recomputed forward under
        activation checkpointing gets the first forward's selection back instead of a new one.

        In training, inside a checkpointed block (model/activation_checkpointing.py): the first
        forward records a detached copy, the recomputation returns the recorded tensors in call
        order (RuntimeError if its calls do not match). Elsewhere, and in eval, the identity,
        recording nothing. The record belongs to one checkpoint call's autograd graph, so there
        is no per-step state to clear in after_step or discard_step.
        """
        record = current_routing_record() if self.training else None
        return selection if record is None else record.replay(self, selection)

    @torch.no_grad()
    def after_step(self, reduce: Reduce) -> None:
        """Called once per applied optimizer step on every rank: non-gradient state updates
        (aux-free bias, Expert Race threshold). Statistics gathered during forward must go
        through `reduce` first so every data-parallel rank applies the same update, and are
        then cleared: they belong to one step."""

    def expert_groups(self) -> list[list[int]] | None:
        """Experts that by design compete only among themselves (a timestep band's experts), or None:
        all of them compete. Routing diagnostics judge dead experts and selective deadlock within
        each group, so a band that no token of the recorded micro-batch fell in is not 'dead'."""
        return None

    def discard_step(self) -> None:
        """Called instead of `after_step` when the step was skipped (non-finite loss or gradient
        norm): drop whatever the step's forwards gathered for `after_step`, so that the next
        step updates from its own forwards only, exactly as if the skipped batches had never
        been seen. Local (no collective). A router that gathers statistics in forward must
        override it; one that keeps no per-step state has nothing to drop."""


@torch.no_grad()
def update_threshold_ema(
    threshold: torch.Tensor,
    initialized: torch.Tensor,
    kth_sum: torch.Tensor | None,
    kth_count: int,
    decay: float,
    reduce: Reduce,
) -> None:
    """The learned inference threshold of Expert Race and DiffMoE, once per applied step, in place.

    threshold [...] fp32: EMA (`decay`) of the K-th training score, per expert or one for all;
    initialized bool []: whether an update has happened (the first copies the step's value);
    kth_sum, kth_count: this rank's sum of the step's K-th scores (shape of threshold) over its
    kth_count forwards (None, 0 when it ran none). The sums and counts are reduced over the
    data-parallel ranks in one call that every rank makes, also one that saw no batch, so the
    collective cannot hang and every rank applies the same value; no update when no rank did.
    """
    stats = torch.zeros(threshold.numel() + 1, dtype=torch.float32, device=threshold.device)
    if kth_sum is not None:
        stats[:-1] = kth_sum.reshape(-1).to(stats.device)
        stats[-1] = float(kth_count)
    stats = reduce(stats)
    if stats[-1] <= 0:
        return
    value = (stats[:-1] / stats[-1]).reshape(threshold.shape)
    if bool(initialized):
        value = decay * threshold.float() + (1.0 - decay) * value
    threshold.copy_(value)
    initialized.fill_(True)


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    def wrap(cls):
        if name in ROUTERS:
            raise ValueError(f"router '{name}' registered twice")
        ROUTERS[name] = cls
        cls.name = name
        return cls

    return wrap


def router_class(cfg: MoEConfig) -> type[Router]:
    """The registered class of `cfg.router`; ConfigError naming the choices if there is none."""
    require(
        cfg.router in ROUTERS, f"model.moe.router '{cfg.router}' is unknown; choose one of {', '.join(sorted(ROUTERS))}"
    )
    return ROUTERS[cfg.router]


def check_router_config(cfg: MoEConfig) -> None:
    """What `config_checks.validate()` runs for an MoE model: the chosen router's `check_config`."""
    router_class(cfg).check_config(cfg)


def build_router(dim: int, cfg: MoEConfig, **kwargs) -> Router:
    return router_class(cfg)(dim, cfg, **kwargs)


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition`: how `check_config` states a rule."""
    if not condition:
        raise ConfigError(message)


def _refuse_unread_keys(cls: type[Router], cfg: MoEConfig) -> None:
    """A field that other registered routers read but `cls` does not must keep its default."""
    defaults = MoEConfig()
    for f in dataclasses.fields(MoEConfig):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if f.name in cls.config_keys or value == default:
            continue
        readers = sorted(name for name, other in ROUTERS.items() if f.name in other.config_keys)
        if readers:
            raise ConfigError(
                f"model.moe.{f.name}={value} has no effect with model.moe.router={cls.name} (only "
                f"{', '.join(readers)} read it); remove it or set it back to {default}"
            )
