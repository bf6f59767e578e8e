"""Mixture-of-depths token routing in a DiT block (`model.mod`).

Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating compute in transformer-based
language models" (arXiv:2404.02258); Luo et al. 2024, "gamma-MoD: Exploring Mixture-of-Depth
Adaptation for Multimodal Large Language Models" (arXiv:2410.13859), whose ARank picks the blocks
to convert (megamoe/tools/attention_rank.py).

In a routed block a linear router scores every token; only the best-scored tokens of each sample
run the block (self-attention among themselves, at their own RoPE positions; cross-attention; FFN),
the others pass through the residual unchanged:

    s      = sigmoid(router([LayerNorm(x), features]))      [B, L]  fp32, one score per token
    chosen = per sample, the k = round(capacity * L) tokens of highest s (training), or the tokens
             with s >= threshold (eval, once a threshold has been learned)
    y      = block(x[chosen]) at the chosen tokens, x elsewhere
    out    = y + (y - x) * (s - stopgrad(s))     update_scale=straight_through (the default)
             x + (y - x) * s                      update_scale=score (MoD's r * f(x))

Either way the router gets the gradient of the block update scaled by its score, so it learns
which tokens the block helps. `straight_through` keeps the forward value of every chosen token
exactly the plain block's output (the factor is 1.0 to the bit): a pretrained block keeps its
function when converted, and capacity 1.0 is the plain model bit for bit. `score` multiplies the
update by s in the forward too, as in the MoD paper.

Features (FTP-style, `router_features`): 'noise_level' (timestep / 1000, per sample or per token)
and 'position' (the token's frame, row and column in the patch grid, each scaled to [0, 1]). The
previous block's attention statistics are not offered: SDPA never forms the attention map.

Which rule runs when: `model.train()` always chooses the per-sample top-k (batch-independent by
construction, a fixed compute per sample) and updates the threshold, an EMA (decay
`threshold_decay`) of the mean over samples of the k-th best score, averaged over every rank of
the global batch so all ranks hold the same value. `model.eval()` chooses by the threshold, so a
sample's routing never depends on the other samples of its batch (the CFG-null copy, other
prompts), as Expert Race does for experts; before the first training step it falls back to the
top-k rule, and at capacity 1.0 every token runs the block in eval too. Samples that choose
different counts then run the block one at a time.

Sequence sharding (context parallelism): each rank holds a chunk of every sample. The scores are
gathered, so every rank picks the unsharded top-k; the chosen tokens (in sequence order) are cut
into equal chunks, one per rank, so Ulysses attention runs among all chosen tokens; the block
outputs are gathered back and each rank keeps its own tokens. k must then divide into the shards
(training; config_checks refuses a capacity that breaks this for a sample shape known before
start-up), and at eval each sample's count is rounded up to a multiple of the shards with its
next-best tokens (in one process nothing is rounded).

Converting a pretrained model: a checkpoint without routers is a base, whose weights
`train.init_from` loads while it draws the routers from the seed (parallel/sharded_weights.py).

Loss (`aux`, unweighted; the objective weighs it by `sparsity_loss`):
    'mod_sparsity'  (mean s over every token of the micro-batch - sparsity_target)^2
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamoe.config import ConfigError, MixtureOfDepthsConfig, ModelConfig
from megamoe.model.activation_checkpointing import current_routing_record, is_recomputing
from megamoe.moe.token_shards import ONE_PROCESS, TokenShards
from megamoe.parallel.collectives import gather_sequence

ROUTER_FEATURES = {"noise_level": 1, "position": 3}
"""Router feature -> its width."""
UPDATE_SCALES = ("straight_through", "score")


def mod_layer_indices(cfg: ModelConfig) -> set[int]:
    """Blocks that route their tokens under `cfg.mod.layers`: 'none', 'all', 'every_other' (1, 3, 5, ...)
    or a comma list like '2,5'. ConfigError naming the key for anything else or an index out of range."""
    spec, n = str(cfg.mod.layers).strip(), cfg.num_layers
    if spec == "none":
        return set()
    if spec == "all":
        return set(range(n))
    if spec == "every_other":
        return set(range(1, n, 2))
    try:
        listed = [int(part) for part in spec.split(",")]
    except ValueError:
        listed = []
    if not listed or any(not 0 <= i < n for i in listed):
        raise ConfigError(
            f"model.mod.layers='{cfg.mod.layers}' is not 'none', 'all', 'every_other' or a comma list of "
            f"block indices in [0, {n}) like '2,5'; fix model.mod.layers"
        )
    repeated = sorted({i for i in listed if listed.count(i) > 1})
    if repeated:  # a block routes once: a repeat is a typo for another block
        raise ConfigError(
            f"model.mod.layers='{cfg.mod.layers}' names block(s) {repeated} more than once; list each block once"
        )
    return set(listed)


def is_mod_key(key: str) -> bool:
    """Whether a state-dict key belongs to a block's mixture-of-depths router (its gate or threshold)."""
    return ".mod." in key


def tokens_per_sample(capacity: float, seq_len: int) -> int:
    """k: the tokens of a sample of `seq_len` that run a routed block in training (at least one)."""
    return max(1, min(seq_len, round(capacity * seq_len)))


class MixtureOfDepths(nn.Module):
    """The token router of one block and the routing around it (see the module docstring).

    `token_shards` is set by parallelize() as for the MoE routers (megamoe/moe/token_shards.py).
    """

    token_shards: TokenShards = ONE_PROCESS

    def __init__(self, dim: int, cfg: MixtureOfDepthsConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim + sum(ROUTER_FEATURES[f] for f in cfg.router_features), 1)
        # Persistent: eval routing depends on it. fp32 whatever the model dtype (see _apply).
        self.register_buffer("threshold", torch.empty((), dtype=torch.float32))
        self.register_buffer("threshold_initialized", torch.empty((), dtype=torch.bool))
        self.reset_buffers()
        self.aux: dict[str, torch.Tensor] = {}
        """The last forward's unweighted losses ({'mod_sparsity': ...} when sparsity_loss > 0)."""

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """No threshold yet: the first training forward sets it (also after a meta-device build)."""
        self.threshold.zero_()
        self.threshold_initialized.fill_(False)

    def _apply(self, fn, recurse=True):
        # A bf16 threshold would round away the EMA's small steps: keep it fp32 (as Router does).
        before = self._buffers["threshold"]
        out = super()._apply(fn, recurse)
        now = self._buffers["threshold"]
        if now.dtype != torch.float32:
            self._buffers["threshold"] = before.to(device=now.device, dtype=torch.float32)
        return out

    def scores(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """x [B, L, dim] (this rank's tokens) -> router scores s [B, L] in (0, 1), fp32.

        The token is layer-normalised first: the residual stream's scale grows with depth and
        training, and the router's logits should not."""
        b, l, dim = x.shape
        inputs = [F.layer_norm(x.float(), (dim,))]
        if "noise_level" in self.cfg.router_features:
            t = ctx.timestep.float() / 1000.0
            inputs.append((t[:, None] if t.ndim == 1 else t).expand(b, l)[..., None])
        if "position" in self.cfg.router_features:
            f, h, w = ctx.grid
            p = ctx.token_offset + torch.arange(l, device=x.device)
            coords = torch.stack((p // (h * w), p // w % h, p % w), dim=-1).float()
            scale = torch.tensor([max(f - 1, 1), max(h - 1, 1), max(w - 1, 1)], dtype=torch.float32, device=x.device)
            inputs.append((coords / scale).expand(b, l, 3))
        logits = F.linear(torch.cat(inputs, dim=-1), self.gate.weight.float(), self.gate.bias.float())
        return logits.squeeze(-1).sigmoid()

    def forward(self, run_block, x: torch.Tensor, text: torch.Tensor, modulation: torch.Tensor, rope, ctx):
        """x [B, L, dim] (this rank's chunk of every sample); text [B, L_text, dim]; modulation
        [B, T, 6, dim], T in {1, L}; rope (cos, sin) [L, head_dim/2] of this rank's chunk; ctx the
        block's RoutingContext. `run_block(x, text, modulation, rope, ctx)` is the plain block, which
        gets the chosen tokens [n, k, dim] with their modulation and per-sample RoPE tables
        [n, k, head_dim/2]. Returns [B, L, dim] in x's dtype."""
        s = self.scores(x, ctx)
        shards = self.token_shards
        full = shards.gather(s.detach(), dim=1)  # [B, L_total]: every rank picks the same tokens
        groups = self._choose(full)
        x_full = _gather_tokens(x, shards)
        mod_full = modulation if modulation.shape[1] == 1 else _gather_tokens(modulation, shards)
        cos, sin = (rope[0], rope[1]) if shards.group is None else (shards.gather(t, dim=0) for t in rope)
        rows = [
            x_full[samples]
            if chosen is None
            else self._run(run_block, x_full[samples], text[samples], mod_full[samples], (cos, sin), ctx, chosen)
            for samples, chosen in groups
        ]
        y_full = rows[0] if len(rows) == 1 else torch.cat(rows)
        y = _own_chunk(y_full, shards)
        if self.cfg.update_scale == "score":
            out = x.float() + (y.float() - x.float()) * s[..., None]
        else:  # the factor is exactly 1.0 in the forward; its gradient is the score's
            out = y.float() + (y.float() - x.float()) * (s - s.detach())[..., None]
        if not is_recomputing():
            self.aux = self._losses(s)
        return out.to(x.dtype)

    def _choose(self, scores: torch.Tensor) -> list[tuple[slice, torch.Tensor | None]]:
        """scores [B, L] (whole sequences) -> [(samples, chosen token positions [n, k] ascending)]:
        one group for the batch when every sample chooses as many tokens, else one per sample
        (None: it chooses none and skips the block)."""
        b, length = scores.shape
        num = self.token_shards.num
        if self.training or not bool(self.threshold_initialized) or self.cfg.capacity == 1:
            k = tokens_per_sample(self.cfg.capacity, length)
            if k % num:
                raise ValueError(
                    f"model.mod.capacity={self.cfg.capacity} routes {k} of {length} tokens per sample, which do "
                    f"not split over {num} sequence shards; choose a capacity that makes it a multiple of {num}"
                )
            top = scores.topk(k, dim=1)
            if self.training and not is_recomputing():
                self._update_threshold(top.values[:, -1])
            chosen = self._replay(top.indices.sort(dim=1).values)
            return [(slice(0, b), chosen)]
        counts = (scores >= self.threshold).sum(dim=1)
        counts = ((counts + num - 1) // num * num).tolist()  # round up to the shards (one process: as is)
        if len(set(counts)) == 1 and counts[0] > 0:
            return [(slice(0, b), scores.topk(counts[0], dim=1).indices.sort(dim=1).values)]
        return [
            (slice(i, i + 1), scores[i : i + 1].topk(k, dim=1).indices.sort(dim=1).values if k else None)
            for i, k in enumerate(counts)
        ]

    def _run(self, run_block, x, text, modulation, rope, ctx, chosen: torch.Tensor) -> torch.Tensor:
        """The block on this rank's share of the chosen tokens of samples x [n, L, dim]; returns
        [n, L, dim]: the block's output at every chosen token (every rank's share), x elsewhere."""
        shards, dim, k = self.token_shards, x.shape[-1], chosen.shape[1]
        own = chosen.narrow(1, _shard_index(shards) * (k // shards.num), k // shards.num)  # [n, k / shards]
        x_in = x.gather(1, own[..., None].expand(-1, -1, dim))
        if modulation.shape[1] != 1:
            modulation = modulation.gather(1, own[:, :, None, None].expand(-1, -1, *modulation.shape[2:]))
        rope_in = (rope[0][own], rope[1][own])  # [n, k / shards, head_dim / 2]: the tokens' own positions
        y_in = run_block(x_in, text, modulation, rope_in, ctx)
        y_chosen = _gather_tokens(y_in, shards)  # [n, k, dim]
        return x.scatter(1, chosen[..., None].expand(-1, -1, dim), y_chosen.to(x.dtype))

    def _replay(self, chosen: torch.Tensor) -> torch.Tensor:
        """A recomputed checkpointed block gets its first forward's choice (see Router.replay)."""
        record = current_routing_record() if self.training else None
        return chosen if record is None else record.replay(self, chosen)

    @torch.no_grad()
    def _update_threshold(self, kth: torch.Tensor) -> None:
        """EMA step from this forward's k-th best scores [B], averaged over the global batch's ranks
        (one tiny all-reduce; each rank of a sequence-shard group holds the same values, so they
        weigh equally). A non-finite value (a NaN batch) never reaches the threshold."""
        stats = self.token_shards.sum_over_batch(torch.stack((kth.float().sum(), kth.new_tensor(float(kth.numel())))))
        value = stats[0] / stats[1]
        if not torch.isfinite(value):
            return
        if bool(self.threshold_initialized):
            value = self.cfg.threshold_decay * self.threshold + (1.0 - self.cfg.threshold_decay) * value
        self.threshold.copy_(value)
        self.threshold_initialized.fill_(True)

    def _losses(self, s: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.sparsity_loss <= 0:
            return {}
        mean = self.token_shards.mean(s.mean())  # the unsharded mean (equal chunks)
        return {"mod_sparsity": (mean - self.cfg.sparsity_target) ** 2}


def _shard_index(shards: TokenShards) -> int:
    return 0 if shards.group is None else dist.get_rank(shards.group)


def _gather_tokens(x: torch.Tensor, shards: TokenShards) -> torch.Tensor:
    """[B, L_local, ...] -> [B, L_local * shards, ...] in chunk order, on every rank. Backward sums every
    rank's gradient of the gathered tokens and keeps this rank's chunk (reduce-scatter), as each
    rank uses a different part of them."""
    return x if shards.group is None else gather_sequence(x, 1, shards.group)


def _own_chunk(x: torch.Tensor, shards: TokenShards) -> torch.Tensor:
    if shards.group is None:
        return x
    n = x.shape[1] // shards.num
    return x.narrow(1, _shard_index(shards) * n, n)


def block_flops(dim: int, ffn_dim: int, tokens: int, text_len: int) -> int:
    """FLOPs (2 per multiply-add) of the matrix products of one WanBlock forward on one sample of
    `tokens` tokens: q, k, v, o projections and attention scores and mix (self-attention over the
    tokens), q and o on the tokens and k, v on the text (cross-attention), and the two FFN linears.
    Norms, modulation and activations are left out, as torch's FlopCounterMode leaves them out."""
    projections = 2 * dim * dim * (6 * tokens + 2 * text_len)
    attention = 4 * dim * tokens * (tokens + text_len)
    return projections + attention + 4 * tokens * dim * ffn_dim


def routed_block_flops(cfg: ModelConfig, seq_len: int, text_len: int) -> int:
    """FLOPs of one routed block's training forward on one sample of `seq_len` tokens: the router on
    every token plus the block on its k = round(capacity * seq_len) tokens (`block_flops`)."""
    router = 2 * seq_len * (cfg.dim + sum(ROUTER_FEATURES[f] for f in cfg.mod.router_features))
    k = tokens_per_sample(cfg.mod.capacity, seq_len)
    return router + block_flops(cfg.dim, cfg.ffn_dim, k, text_len)


def mixture_of_depths_modules(model: nn.Module) -> list[MixtureOfDepths]:
    return [m for m in model.modules() if isinstance(m, MixtureOfDepths)]


def collect_mod_aux(model: nn.Module) -> dict[str, torch.Tensor]:
    """The routed blocks' losses of the last forward, each summed over the blocks (as collect_aux does)."""
    totals: dict[str, torch.Tensor] = {}
    for module in mixture_of_depths_modules(model):
        for name, value in module.aux.items():
            totals[name] = totals[name] + value if name in totals else value
    return totals
