"""Token-choice routers: every token picks its top-k of the E_total experts.

The three routers differ only in how they score (`logits`): a linear gate, an MLP gate, or
a gate on top of a cross-attention from each token to the text tokens and the timestep
embedding (so the routing can depend on what the sample is about and on the noise level,
which a per-token linear gate on visual features cannot see). Selection, aux-loss-free
balancing and the balance / z losses are shared (`TokenChoiceRouter`, `select_top_k`).

All gate maths runs with fp32 copies of the weights (`_linear32`), so a module cast to bf16
still routes in fp32; keeping fp32 master weights that the optimizer updates is the
engine's job, not the router's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.model.activation_checkpointing import is_recomputing
from megamoe.moe.losses import BALANCE_SCOPES, switch_balance_loss, z_loss
from megamoe.moe.routers.base import SCORE_FUNCS, Reduce, Router, RouterOutput, RoutingContext, register_router, require


def _linear32(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x, layer.weight.float(), bias)


BIAS_SCHEDULES = ("constant", "inverse_time", "frozen")
BIAS_FORMS = ("sign", "proportional")
# The aux-free keys besides bias_update_rate; each must keep its default without bias_balancing.
BIAS_UPDATE_KEYS = ("bias_update_schedule", "bias_freeze_step", "bias_update_centered", "bias_update_form")


def bias_step_size(cfg: MoEConfig, t: torch.Tensor) -> torch.Tensor:
    """Step size eta_t (fp32, 0-dim) of the aux-free bias update at applied step t >= 1 (a 0-dim tensor).

        constant      eta_t = rate                                 (DeepSeek-V3; Wang et al. 2024, arXiv:2408.15664)
        inverse_time  eta_t = rate / t
        frozen        eta_t = rate for t <= bias_freeze_step, then 0

    ALF-LB (Han et al. 2025, arXiv:2512.03915) reads the bias as the dual variable of a
    load-balanced assignment problem and the update as one dual (sub)gradient step per training
    step; their online analysis gets a logarithmic expected regret from the objective's strong
    convexity, with step sizes that decay like 1/t, the classic rate of online gradient descent on
    strongly convex losses. `inverse_time` is that decay with the constant `rate` (the first step
    moves by rate); `frozen` fixes the routing once balanced, so late training sees a stationary
    selection.
    """
    rate = torch.tensor(cfg.bias_update_rate, dtype=torch.float32, device=t.device)
    if cfg.bias_update_schedule == "inverse_time":
        return rate / t.float()
    if cfg.bias_update_schedule == "frozen":
        return torch.where(t <= cfg.bias_freeze_step, rate, torch.zeros_like(rate))
    return rate


def select_top_k(
    logits: torch.Tensor,
    cfg: MoEConfig,
    expert_bias: torch.Tensor | None = None,
    replay: Callable[[torch.Tensor], torch.Tensor] = lambda picked: picked,
):
    """logits [N, E_total] -> (probs [N, E_total], routing_map [N, E_total] bool, scores [N, E_total],
    indices [N, top_k] int64: the selected columns).

    scores = softmax or sigmoid of the logits (`cfg.score_func`); each token selects its
    `cfg.top_k` highest scores over all E_total experts, null ones included. `expert_bias`
    (aux-loss-free balancing) shifts the scores for the selection only: the combine weights
    are the unbiased scores of the selected experts, optionally rescaled to sum to one
    (`cfg.renormalize`; with top_k=1 and softmax that makes every weight 1, so the gate then
    learns only from aux losses). The picked indices pass through `replay` (Router.replay)
    before anything is derived from them.
    """
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    choice = scores if expert_bias is None else scores + expert_bias
    picked = replay(choice.topk(cfg.top_k, dim=-1).indices)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, picked, True)
    probs = scores * routing_map
    if cfg.renormalize:
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return probs, routing_map, scores, picked


class TokenChoiceRouter(Router):
    """Shared part of the token-choice routers; subclasses implement `logits`."""

    # The aux-free bias: its 1e-3 updates vanish next to biases of ~0.1 in bf16.
    fp32_buffers = ("expert_bias",)
    config_keys = Router.config_keys | {
        "score_func",
        "renormalize",
        "num_null_experts",
        "bias_balancing",
        "bias_update_rate",
        "bias_update_schedule",
        "bias_freeze_step",
        "bias_update_centered",
        "bias_update_form",
        "balance_loss",
        "balance_scope",
        "z_loss",
    }

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        require(cfg.num_null_experts >= 0, f"model.moe.num_null_experts must be >= 0, got {cfg.num_null_experts}")
        super().check_config(cfg)
        require(
            cfg.score_func in SCORE_FUNCS,
            f"model.moe.score_func must be one of {', '.join(SCORE_FUNCS)}, got '{cfg.score_func}'",
        )
        require(
            cfg.balance_scope in BALANCE_SCOPES,
            f"model.moe.balance_scope must be one of {', '.join(BALANCE_SCOPES)}, got '{cfg.balance_scope}'",
        )
        default = MoEConfig()
        require(
            cfg.balance_loss > 0 or cfg.balance_scope == default.balance_scope,
            f"model.moe.balance_scope={cfg.balance_scope} has no effect while model.moe.balance_loss=0; "
            f"set balance_loss > 0 or remove balance_scope",
        )
        if cfg.bias_balancing:
            require(
                cfg.bias_update_rate > 0,
                f"model.moe.bias_update_rate must be > 0 with "
                f"model.moe.bias_balancing=true, got {cfg.bias_update_rate}",
            )
            require(
                cfg.bias_update_schedule in BIAS_SCHEDULES,
                f"model.moe.bias_update_schedule must be one of {', '.join(BIAS_SCHEDULES)}, "
                f"got '{cfg.bias_update_schedule}'",
            )
            require(
                cfg.bias_update_form in BIAS_FORMS,
                f"model.moe.bias_update_form must be one of {', '.join(BIAS_FORMS)}, got '{cfg.bias_update_form}'",
            )
            require(
                not (cfg.bias_update_centered and cfg.bias_update_form == "proportional"),
                "model.moe.bias_update_centered=true has no effect with model.moe.bias_update_form=proportional "
                "(its steps already sum to zero over the real experts); use the sign form or remove it",
            )
            if cfg.bias_update_schedule == "frozen":
                require(
                    cfg.bias_freeze_step >= 1,
                    f"model.moe.bias_update_schedule=frozen needs model.moe.bias_freeze_step >= 1 (the last "
                    f"step that updates the bias), got {cfg.bias_freeze_step}",
                )
            else:
                require(
                    cfg.bias_freeze_step == default.bias_freeze_step,
                    f"model.moe.bias_freeze_step={cfg.bias_freeze_step} has no effect with "
                    f"model.moe.bias_update_schedule={cfg.bias_update_schedule}; set the schedule to frozen "
                    f"or remove bias_freeze_step",
                )
        else:
            for key in ("bias_update_rate", *BIAS_UPDATE_KEYS):
                require(
                    getattr(cfg, key) == getattr(default, key),
                    f"model.moe.{key}={getattr(cfg, key)} has no effect while "
                    f"model.moe.bias_balancing=false; set bias_balancing=true or remove {key}",
                )

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        if cfg.bias_balancing:
            # Persistent: the bias is training state that an exact resume must restore, and so is
            # the count t of applied updates that the step-size schedule reads.
            self.register_buffer("expert_bias", torch.empty(self.num_total, dtype=torch.float32))
            self.register_buffer("bias_update_count", torch.empty((), dtype=torch.long))
            # [max load / mean load, step size] of the last update (real experts, global batch):
            # the balance the dual update sees and how far it moves, for the training log.
            self.last_bias_update: torch.Tensor | None = None
            # Selections accumulated over the micro-batches of one optimizer step. A plain
            # attribute rather than a non-persistent buffer: a model built on the meta device and
            # materialised with `to_empty` would hold garbage there (see model/rope.py).
            # Activation recomputation re-runs this forward in backward; it must not count again.
            self.load_counts: torch.Tensor | None = None
        # `global` balance scope: the step's assignments per expert so far, over the global batch.
        self.balance_counts: torch.Tensor | None = None
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The aux-free bias and its update count start at zero (also after a meta-device build, see
        megamoe/model/init.py)."""
        if self.cfg.bias_balancing:
            self.expert_bias.zero_()
            self.bias_update_count.zero_()

    def logits(self, tokens: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        raise NotImplementedError

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        logits = self.logits(tokens, ctx)
        bias = self.expert_bias if self.cfg.bias_balancing else None
        probs, routing_map, scores, picked = select_top_k(logits, self.cfg, bias, self.replay)
        if self.cfg.bias_balancing and self.training and not is_recomputing():
            with torch.no_grad():
                counts = routing_map.sum(0)
                self.load_counts = counts if self.load_counts is None else self.load_counts + counts
        aux = {}
        shards = self.token_shards
        if self.cfg.balance_loss > 0:
            # Sigmoid scores do not sum to one; normalise them so P_i is a distribution (DeepSeek-V3).
            dist = (
                scores
                if self.cfg.score_func == "softmax"
                else scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
            )
            # (in eval, where no step accumulates, `global` falls back to this micro-batch's counts)
            counts = self._global_counts(routing_map) if self.cfg.balance_scope == "global" and self.training else None
            aux["balance"] = switch_balance_loss(
                dist, routing_map, self.num_experts, ctx.batch_size, ctx.seq_len, self.cfg.balance_scope, shards, counts
            )
        if self.cfg.z_loss > 0:
            aux["z"] = z_loss(logits, shards)
        return RouterOutput(probs, routing_map, aux, topk_indices=picked)

    @torch.no_grad()
    def _global_counts(self, routing_map: torch.Tensor) -> torch.Tensor:
        """`global` balance scope: assignments per real expert over every token of the global batch
        seen so far in this optimizer step, i.e. over all data-parallel ranks and shards and the
        micro-batches up to this one (megatron-core's global-batch aux loss). Reset by after_step."""
        if is_recomputing() and self.balance_counts is not None:
            return self.balance_counts  # recomputed in backward: counted already, its aux unused; no collective
        counts = self.token_shards.sum_over_batch(routing_map[:, : self.num_experts].sum(0).float())
        self.balance_counts = counts if self.balance_counts is None else self.balance_counts + counts
        return self.balance_counts

    @torch.no_grad()
    def after_step(self, reduce: Reduce) -> None:
        """Aux-loss-free update of the real experts' selection bias from the step's global loads.

        t = 1, 2, ... counts applied optimizer steps (a persistent buffer, so an exact resume
        continues the schedule); eta_t = bias_step_size(cfg, t); c_i = load_i over every token of
        the global batch:

            sign          b_i += eta_t * sign(mean(c) - c_i)              (DeepSeek-V3)
            proportional  b_i += eta_t * (mean(c) - c_i) / mean(c)        (a dual gradient step)
            centred       then b -= mean(b) over the real experts (torchtitan)

        Real experts only: null experts cost nothing, and balancing them toward the mean load
        would pin the share of skipped compute instead of letting tokens choose it (AdaMoE).
        Every rank calls `reduce` exactly once, also one that saw no tokens, so none hangs.
        """
        self.balance_counts = None
        if not self.cfg.bias_balancing:
            return
        counts = (
            self.load_counts
            if self.load_counts is not None
            else torch.zeros(self.num_total, dtype=torch.long, device=self.expert_bias.device)
        )
        self.load_counts = None
        load = reduce(counts.clone())[: self.num_experts].float()
        self.bias_update_count += 1
        eta = bias_step_size(self.cfg, self.bias_update_count)
        mean = load.mean()
        gap = mean - load
        if self.cfg.bias_update_form == "sign":
            direction = torch.sign(gap)
        else:  # proportional; a step that routed no token moves nothing
            direction = torch.where(mean > 0, gap / mean.clamp_min(torch.finfo(mean.dtype).tiny), 0.0)
        bias = self.expert_bias[: self.num_experts]
        bias += eta * direction
        if self.cfg.bias_update_centered:
            bias -= bias.mean()
        self.last_bias_update = torch.stack([load.max() / mean.clamp_min(torch.finfo(mean.dtype).tiny), eta])

    def discard_step(self) -> None:
        """A skipped step's loads must not steer the next bias update, nor its assignments the next
        step's `global` balance loss (see Router.discard_step)."""
        self.balance_counts = None
        if self.cfg.bias_balancing:
            self.load_counts = None


@register_router("linear")
class LinearRouter(TokenChoiceRouter):
    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.gate = nn.Linear(dim, self.num_total, bias=False)

    def logits(self, tokens, ctx):
        return _linear32(tokens, self.gate)


def _check_hidden_dim(cfg: MoEConfig) -> None:
    require(cfg.router_hidden_dim >= 1, f"model.moe.router_hidden_dim must be >= 1, got {cfg.router_hidden_dim}")


@register_router("mlp")
class MLPRouter(TokenChoiceRouter):
    config_keys = TokenChoiceRouter.config_keys | {"router_hidden_dim"}

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        super().check_config(cfg)
        _check_hidden_dim(cfg)

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.gate = nn.Sequential(
            nn.Linear(dim, cfg.router_hidden_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.router_hidden_dim, self.num_total, bias=False),
        )

    def logits(self, tokens, ctx):
        return _linear32(F.gelu(_linear32(tokens, self.gate[0]), approximate="tanh"), self.gate[2])


@register_router("cross_attention")
class CrossAttentionRouter(TokenChoiceRouter):
    """Each token attends to the projected text tokens plus the timestep embedding (one extra
    key/value, per sample or per token); gate(query + attended) scores the experts.

    Width `router_hidden_dim` in heads of 64 (one head below 64 or when 64 does not divide it).
    """

    head_dim = 64
    config_keys = TokenChoiceRouter.config_keys | {"router_hidden_dim"}

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        super().check_config(cfg)
        _check_hidden_dim(cfg)

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        hidden = cfg.router_hidden_dim
        self.num_heads = hidden // self.head_dim if hidden >= self.head_dim and hidden % self.head_dim == 0 else 1
        self.query = nn.Linear(dim, hidden)
        self.key = nn.Linear(dim, hidden)
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(hidden, self.num_total, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden] -> [B, heads, S, hidden/heads]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def logits(self, tokens, ctx):
        if ctx is None or (ctx.text is None and ctx.temb is None):
            raise ValueError("the cross_attention router needs RoutingContext.text or .temb to attend to")
        b, l = ctx.batch_size, ctx.seq_len
        q = self._heads(_linear32(tokens, self.query).view(b, l, -1))  # [B, h, L, d]
        scale = q.shape[-1] ** -0.5
        scores, values = [], []
        if ctx.text is not None:
            text = ctx.text.float()
            k, v = self._heads(_linear32(text, self.key)), self._heads(_linear32(text, self.value))
            scores.append(q @ k.transpose(-1, -2) * scale)  # [B, h, L, L_text]
            values.append(v)
        if ctx.temb is not None:
            temb = ctx.temb.float()
            temb = temb[:, None] if temb.ndim == 2 else temb  # [B, 1 or L, dim]
            k, v = self._heads(_linear32(temb, self.key)), self._heads(_linear32(temb, self.value))
            scores.append((q * k).sum(-1, keepdim=True) * scale)  # [B, h, L, 1]: its own key per token
            values.append(v)
        attn = torch.cat(scores, -1).softmax(-1)
        out = torch.zeros_like(q)
        start = 0
        if ctx.text is not None:
            start = values[0].shape[2]
            out = out + attn[..., :start] @ values[0]
        if ctx.temb is not None:
            out = out + attn[..., start:] * values[-1]  # one key: broadcast instead of a matmul
        h = (q + out).transpose(1, 2).reshape(b * l, -1)
        return _linear32(h, self.gate)
