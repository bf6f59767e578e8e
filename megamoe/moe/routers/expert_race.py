"""Expert Race: one top-K over all (token, expert) scores of the micro-batch.

Yuan et al. 2025, "Expert Race: A Flexible Routing Strategy for Scaling Diffusion Transformer
with Mixture of Experts" (Race-DiT, ICML 2025, arXiv:2503.16057).

Training:
    logits = gate(tokens)                         [N, E]; gate = one linear map (`race_gate=linear`)
                                                  or Linear -> GELU -> Linear (`mlp`, width router_hidden_dim)
    scores = act(logits)                          act = `race_score_func`: identity (raw logits,
                                                  the default), softmax over experts, or sigmoid
    K      = N * top_k                            (N = B * L: B x L x E scores race together)
    selected = the K largest entries of scores, over tokens AND experts at once
               (every pair whose score reaches the K-th largest; ties at it are all taken)
    probs    = scores where selected, 0 elsewhere

Tokens and experts compete together, so hard tokens (detail, late denoising steps) can take
many experts and easy ones (flat background) none, while the average stays top_k.

Why identity is the default: a softmax over experts makes a token's scores sum to one, so
scores of different tokens are hardly comparable and a token can never out-bid another on all
experts; the raw gate output races and weights (a selected weight can therefore be any real
number, also negative). Softmax and sigmoid are the usual gates the paper compares against;
sigmoid keeps scores of different tokens comparable and the weights in (0, 1).

`race_scope=global` races over the global batch instead of the micro-batch: K = top_k times
the tokens of every data-parallel rank (and shard), and each rank selects the pairs of its own
tokens that reach the K-th largest score of all of them, exactly what one process racing over
the concatenated global batch selects (TokenShards.kth_largest_over_batch: two all-gathers per
layer and forward). Only training races globally; eval before the first threshold falls back to
the micro-batch race, so an evaluation on one rank never waits for the others.

Inference: the top-K of a batch depends on the other samples in it (the CFG-null copy, the
other prompts), so at `eval()` a pair (t, e) is selected iff scores[t, e] >= threshold, a
buffer tracking an EMA (decay `race_threshold_decay`) of the K-th largest training score.
`after_step` updates it from the mean K-th score of the step's forwards, averaged over the
data-parallel ranks, so every rank holds the same threshold; it is saved with the model. A
skipped step's scores are dropped (`discard_step`) and never reach it.
The first update copies the value (no warm-up from zero). Before any update, eval falls
back to the training rule.

Under sequence sharding each rank holds a chunk of every sample: the race still runs over the
whole micro-batch (each rank sends its own top-K scores, at most N_local * E, to find the global
K-th score; see moe/token_shards.py), so every shard selects what one process would.

Losses (unweighted, in aux; the loop multiplies by the config weights):
    'similarity'            router similarity loss (router_losses.router_similarity_loss),
                            when model.moe.similarity_loss > 0.
    'layer_reg_prediction'  from the base Router (any router), see routers/base.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.model.activation_checkpointing import is_recomputing
from megamoe.moe.router_losses import router_similarity_loss
from megamoe.moe.routers.base import (
    Reduce,
    Router,
    RouterOutput,
    RoutingContext,
    register_router,
    require,
    update_threshold_ema,
)

RACE_SCORE_FUNCS = ("identity", "softmax", "sigmoid")
RACE_GATES = ("linear", "mlp")
RACE_SCOPES = ("micro_batch", "global")


def race_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """[N, E] logits -> the [N, E] scores that race and weight (`race_score_func`)."""
    if score_func == "softmax":
        return logits.softmax(-1)
    if score_func == "sigmoid":
        return logits.sigmoid()
    return logits


@register_router("expert_race")
class ExpertRaceRouter(Router):
    # Not read: num_null_experts (a token may already take zero experts), bias_balancing,
    # score_func and renormalize (race_score_func picks the activation; the selected scores are
    # the weights), balance_loss and z_loss (a logsumexp penalty would only shrink the raw
    # combine weights).
    # A bf16 EMA silently drops updates smaller than its precision ((1 - decay) * gap is small).
    fp32_buffers = ("threshold",)
    config_keys = Router.config_keys | {
        "race_threshold_decay",
        "similarity_loss",
        "race_score_func",
        "race_gate",
        "race_scope",
        "router_hidden_dim",
    }

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        super().check_config(cfg)
        require(
            0.0 <= cfg.race_threshold_decay < 1.0,
            f"model.moe.race_threshold_decay must be in [0, 1), got {cfg.race_threshold_decay}",
        )
        for key, choices in (
            ("race_score_func", RACE_SCORE_FUNCS),
            ("race_gate", RACE_GATES),
            ("race_scope", RACE_SCOPES),
        ):
            value = getattr(cfg, key)
            require(value in choices, f"model.moe.{key} must be one of {', '.join(choices)}, got '{value}'")
        if cfg.race_gate == "mlp":
            require(
                cfg.router_hidden_dim >= 1, f"model.moe.router_hidden_dim must be >= 1, got {cfg.router_hidden_dim}"
            )
        else:
            default = MoEConfig().router_hidden_dim
            require(
                cfg.router_hidden_dim == default,
                f"model.moe.router_hidden_dim={cfg.router_hidden_dim} has no effect with "
                f"model.moe.race_gate={cfg.race_gate}; set race_gate=mlp or remove router_hidden_dim",
            )

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        if cfg.race_gate == "mlp":  # the layout of the mlp router's gate (placement reads gate.2's rows)
            self.gate = nn.Sequential(
                nn.Linear(dim, cfg.router_hidden_dim),
                nn.GELU(approximate="tanh"),
                nn.Linear(cfg.router_hidden_dim, cfg.num_experts, bias=False),
            )
        else:
            self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        # Persistent: inference routing depends on it, so it must survive checkpoints.
        self.register_buffer("threshold", torch.empty(()))
        self.register_buffer("threshold_initialized", torch.empty((), dtype=torch.bool))
        self.reset_buffers()
        # K-th scores seen since the last optimizer step (one per forward, e.g. per micro-batch
        # under gradient accumulation). Plain attributes: per-step scratch, not model state.
        self._kth_sum: torch.Tensor | None = None
        self._kth_count = 0

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """No threshold yet: the first step's sets it (also after a meta-device build, see megamoe/model/init.py)."""
        self.threshold.zero_()
        self.threshold_initialized.fill_(False)

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        n = tokens.shape[0]
        if ctx.batch_size * ctx.seq_len != n:
            raise ValueError(
                f"expert_race router got {n} tokens but batch_size*seq_len = {ctx.batch_size}*{ctx.seq_len}"
            )
        logits = self.logits(tokens)
        scores = race_scores(logits, self.cfg.race_score_func)

        shards = self.token_shards
        if self.training or not bool(self.threshold_initialized):
            # The race runs over the tokens of every shard (and, globally, of every data-parallel
            # rank): K counts them all, and a pair is selected iff its score reaches the K-th
            # largest score of all of them.
            if self.training and self.cfg.race_scope == "global":
                kth = shards.kth_largest_over_batch(scores.detach(), self.cfg.top_k)
            else:
                kth = shards.kth_largest(scores.detach().flatten()[None], n * shards.num * self.cfg.top_k, dim=1)
            mask = scores.detach() >= kth.reshape(())
            if self.training and not is_recomputing():  # a recomputed forward was counted already
                kth = kth.reshape(()).float()
                self._kth_sum = kth if self._kth_sum is None else self._kth_sum + kth
                self._kth_count += 1
        else:
            mask = scores.detach() >= self.threshold.float()
        mask = self.replay(mask)
        probs = scores * mask  # the selected scores are the combine weights (Race-DiT)

        aux = {"unrouted_fraction": (~mask.any(dim=1)).float().mean().detach()}
        if self.cfg.similarity_loss > 0:
            aux["similarity"] = router_similarity_loss(logits, mask, shards)
        return RouterOutput(probs=probs, routing_map=mask, aux=aux)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, dim] fp32 -> [N, E] gate logits, with fp32 copies of the weights (a bf16 module routes in fp32)."""
        if isinstance(self.gate, nn.Linear):
            return F.linear(tokens, self.gate.weight.float())
        first, last = self.gate[0], self.gate[2]
        hidden = F.gelu(F.linear(tokens, first.weight.float(), first.bias.float()), approximate="tanh")
        return F.linear(hidden, last.weight.float())

    @torch.no_grad()
    def after_step(self, reduce: Reduce) -> None:
        kth_sum, kth_count = self._kth_sum, self._kth_count
        self._kth_sum, self._kth_count = None, 0
        update_threshold_ema(
            self.threshold, self.threshold_initialized, kth_sum, kth_count, self.cfg.race_threshold_decay, reduce
        )

    def discard_step(self) -> None:
        """A skipped step's K-th scores (NaN for a NaN batch) must not reach the threshold EMA,
        where a NaN would stay for good (see Router.discard_step)."""
        self._kth_sum, self._kth_count = None, 0
