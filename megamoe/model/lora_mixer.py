"""LoRA-Mixer: routed low-rank experts on the attention projections, for fine-tuning a frozen base.

Li et al., "LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing"
(arXiv:2507.00029, 2025). Each adapted projection y = W x + b (q, k, v or o of a WanAttention,
`model.lora.targets`) gets E low-rank experts (A_e: r x in, B_e: out x r) and a linear router:

    p = softmax(R x)                                  router distribution over the E experts  [E]
    S = the top_k experts of p                        hard: which experts run for this token
    g_e = p_e / sum_{j in S} p_j  (e in S), else 0    soft: their renormalised weights (top_k = 1: g = p)
    y = W x + b + (alpha / r) * sum_e g_e B_e A_e x

The hard choice gives each token a few specialised experts; the soft weights let the router learn
through the loss (the gradient reaches R through the selected p_e). B starts at zero (LoRA's
initialisation, drawn through megamoe.model.init like every parameter), so an adapted model
starts equal to its base bit for bit. With adapters on, only they and their routers train
(`freeze_base`, called when the model is built: the optimizer takes the parameters that require
gradients).

Routing loss (the paper's "specialization balance" / routing specialization loss, two weighted parts,
each summed over the adapted projections like the MoE router losses over layers):
    lora_balance = E * sum_e load_e * P_e    load_e: fraction of the top_k picks going to e (no gradient),
                                             P_e: mean router probability of e (Switch's balance term; 1 when uniform)
    lora_entropy = mean over tokens of H(p) = -sum_e p_e log p_e   (low: sharp, specialised routing)

Compute: the down projections of all E experts run as one matmul and the unselected ones are
zeroed by their gate (E * r is small next to the projection's width: a gather per token would cost
more than it saves), so the extra FLOPs are `adapter_flops` whatever top_k is.

Parallelism: adapters and routers are replicated (TP is refused by config_checks). Under context
parallelism each rank routes its own tokens; the losses are formed from statistics averaged over
the sequence shards (megamoe/moe/token_shards.py), so they equal the one-process values. The text
tokens a cross-attention's k and v see are whole on every rank: their statistics are not averaged
but their gradient is divided by the shard count (`TokenShards.replicated`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megamoe.config import LoRAConfig, ModelConfig
from megamoe.model.init import ZEROS, Init
from megamoe.moe.token_shards import TokenShards

PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out"}
"""model.lora.targets letter -> the adapter's key in WanAttention.lora (to_out: the output projection to_out.0)."""


def hard_soft_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (probs [N, E] softmax in fp32 (or fp64), gates [N, E] likewise, picked [N, top_k] indices).

    gates hold the top_k probabilities of each row renormalised to sum to 1 and zeros elsewhere; ties
    are broken as torch.topk breaks them. With top_k = 1 the probability is kept as it is (as the
    Switch Transformer does): renormalised it would be 1 whatever the router says, and the router
    would learn from the routing loss alone.
    """
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top, picked = probs.topk(top_k, dim=-1)
    if top_k > 1:
        top = top / top.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, picked, top)
    return probs, gates, picked


@dataclass
class RoutingStats:
    """One adapter's routing over the tokens of its last forward (this rank's)."""

    load: torch.Tensor
    """[E] fraction of the tokens' top_k picks that went to each expert (sums to 1; no gradient)."""
    mean_probs: torch.Tensor
    """[E] mean router probability of each expert (differentiable)."""
    mean_entropy: torch.Tensor
    """0-dim: mean entropy of the tokens' router distributions, in nats (differentiable)."""
    gate_sum: torch.Tensor
    """[E] gate weights summed over the tokens (no gradient; calibration of the merged export)."""
    tokens: int
    """Tokens routed."""
    sharded: bool
    """The tokens are this rank's shard of the sequence (False: the text, whole on every rank)."""


class RoutedLoRA(nn.Module):
    """E routed LoRA experts for one linear projection in -> out; `forward` returns the update to add.

    Parameters: router.weight [E, in], lora_A [E, r, in], lora_B [E, out, r] (zero at init).
    """

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig):
        super().__init__()
        self.num_experts, self.rank, self.top_k = cfg.num_experts, cfg.rank, cfg.top_k
        self.scaling = cfg.alpha / cfg.rank
        self.router = nn.Linear(in_features, cfg.num_experts, bias=False)
        self.lora_A = nn.Parameter(torch.empty(cfg.num_experts, cfg.rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(cfg.num_experts, out_features, cfg.rank))
        self.stats: RoutingStats | None = None

    def parameter_inits(self) -> dict[str, Init]:
        """A as PEFT's LoRA (kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B zero so the
        update starts at exactly 0; the router as any linear (Xavier-uniform)."""
        return {"lora_A": Init("uniform", self.lora_A.shape[-1] ** -0.5), "lora_B": ZEROS}

    def forward(self, x: torch.Tensor, sharded: bool = True) -> torch.Tensor:
        """x [..., in] -> update [..., out] in x's dtype. sharded: see RoutingStats.sharded."""
        flat = x.reshape(-1, x.shape[-1])
        probs, gates, picked = hard_soft_top_k(self.router(flat), self.top_k)
        down = torch.einsum("ni,eri->ner", flat, self.lora_A.to(flat.dtype))
        down = down * gates.to(down.dtype)[..., None]  # unselected experts contribute exactly 0
        update = torch.einsum("ner,eor->no", down, self.lora_B.to(flat.dtype)) * self.scaling
        counts = torch.zeros(self.num_experts, device=x.device).index_add_(
            0, picked.flatten(), torch.ones(picked.numel(), device=x.device)
        )
        self.stats = RoutingStats(
            load=counts / max(picked.numel(), 1),
            mean_probs=probs.mean(0),
            mean_entropy=torch.special.entr(probs).sum(-1).mean(),
            gate_sum=gates.detach().sum(0),
            tokens=flat.shape[0],
            sharded=sharded,
        )
        return update.reshape(*x.shape[:-1], -1)

    def delta_weight(self, mix: torch.Tensor) -> torch.Tensor:
        """[out, in]: the dense update (alpha / r) * sum_e mix_e B_e A_e for expert weights mix [E]
        (the merged export's fold of the routing)."""
        a, b = self.lora_A.detach().float(), self.lora_B.detach().float()
        return torch.einsum("e,eor,eri->oi", mix.float(), b, a) * self.scaling


def attention_adapters(dim: int, cfg: LoRAConfig) -> nn.ModuleDict | None:
    """WanAttention's `lora`: a RoutedLoRA per projection in cfg.targets (keys to_q, to_k, to_v,
    to_out), or None when cfg.num_experts is 0 (the attention unchanged)."""
    if cfg.num_experts == 0:
        return None
    return nn.ModuleDict({PROJECTIONS[t]: RoutedLoRA(dim, dim, cfg) for t in PROJECTIONS if t in cfg.targets})


def adapters(model: nn.Module) -> dict[str, RoutedLoRA]:
    """{module name: RoutedLoRA} of a model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutedLoRA)}


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to a LoRA-Mixer adapter (router or experts), not the base."""
    return ".lora." in key


def freeze_base(model: nn.Module) -> None:
    """Only the adapters and their routers train: every other parameter stops requiring gradients.
    The engine hands the optimizer the parameters that require them (train/engine.py), so frozen ones
    get no gradient, no optimizer state and no update; checkpoints keep their weights only."""
    trained = {id(p) for m in adapters(model).values() for p in m.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trained)


def routing_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'lora_balance', 'lora_entropy'} of the model's last forward, each summed over the adapters that
    ran in it (empty without adapters): the unsharded values on every rank of a sequence-sharded model.
    Reading them consumes them, so an adapter a later forward does not run (a block skipped by a block
    router) is not counted again from a graph its backward has freed."""
    found = []
    for m in adapters(model).values():
        if m.stats is not None:
            found.append(m.stats)
            m.stats = None
    if not found:
        return {}
    sharding = model.sequence_sharding
    shards = TokenShards(sharding.group if sharding.num_shards > 1 else None)
    balance, entropy = 0.0, 0.0
    for s in found:
        if s.sharded:
            load, probs, ent = shards.mean(s.load), shards.mean(s.mean_probs), shards.mean(s.mean_entropy)
        else:
            load, probs, ent = s.load, shards.replicated(s.mean_probs), shards.replicated(s.mean_entropy)
        balance = balance + load.numel() * (load * probs).sum()
        entropy = entropy + ent
    return {"lora_balance": balance, "lora_entropy": entropy}


def adapter_flops(tokens: int, in_features: int, out_features: int, cfg: LoRAConfig) -> int:
    """Forward FLOPs of the matrix products (2 per multiply-add, as train/throughput.py counts) one
    RoutedLoRA adds for `tokens` tokens: the router, every expert's down projection, the gated up
    projections. (The softmax, gating and scaling add O(E r + out) per token: left out.)"""
    e, r = cfg.num_experts, cfg.rank
    return 2 * tokens * e * (in_features + in_features * r + r * out_features)


def flops_per_token(dim: int, num_layers: int, tokens_per_sample: int, text_len: int, cfg: LoRAConfig) -> float:
    """Forward FLOPs the adapters add per video token: per block, q and o of both attentions and k, v of
    self-attention on the video tokens, k and v of cross-attention on the text (per sample, spread)."""
    if cfg.num_experts == 0:
        return 0.0
    per_token, per_sample = 0, 0
    for t in cfg.targets:
        per_token += 2 * adapter_flops(1, dim, dim, cfg)  # self- and cross-attention q/o, self k/v
        if t in ("k", "v"):
            per_token -= adapter_flops(1, dim, dim, cfg)  # cross-attention k/v run on the text instead
            per_sample += adapter_flops(text_len, dim, dim, cfg)
    return num_layers * (per_token + per_sample / tokens_per_sample)


def adapter_parameters(cfg: ModelConfig) -> int:
    """Parameters of every adapter of `WanDiT(cfg)`, from the config alone (what trains with adapters on):
    per block, self- and cross-attention each adapt `targets`, each adapter E x (router d + A r d + B d r)."""
    lora, d = cfg.lora, cfg.dim
    if lora.num_experts == 0:
        return 0
    return cfg.num_layers * 2 * len(lora.targets) * lora.num_experts * (d + 2 * lora.rank * d)


def trainable_parameters(model: nn.Module) -> int:
    """Parameters that require gradients (shared ones once); works on the meta device."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
