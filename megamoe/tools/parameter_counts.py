"""What a model config weighs: its parameter counts and the bytes one checkpoint takes on disk.

Closed forms of the config, so they run anywhere before anything is built: the layout planner
(layout_planner.py) sizes GPUs with the counts, and the run directory's start-up check
(train/run_dir.py) asks for room for one checkpoint. tests/tools/test_layout_planner.py checks the
counts against the model built on the meta device; tests/posttrain/test_lora_export.py the checkpoint
size against what real runs write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamoe.config import Config, ModelConfig
from megamoe.model.lora_mixer import adapter_parameters
from megamoe.moe.layer import moe_layer_indices


@dataclass
class ParameterCounts:
    """Parameter counts of a model config, from closed forms."""

    total: int
    """Every parameter once."""
    activated: int
    """What one token passes through: non-expert parameters + top_k routed experts per MoE layer."""
    routed_experts: int
    """Parameters of the routed experts (sharded by EP)."""
    tensor_parallel: int
    """Non-expert parameters that TP shards; the rest of the non-expert ones are replicated."""


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _router_parameters(m: ModelConfig) -> int:
    e, d = m.moe, m.dim
    columns = e.merged_from or e.num_experts  # a merged model's router scores the experts before merging
    total, h = columns + e.num_null_experts, e.router_hidden_dim
    n = {
        "linear": _linear(d, total, False),
        "mlp": _linear(d, h) + _linear(h, total, False),
        "cross_attention": 3 * _linear(d, h) + _linear(h, total, False),
        "promoe": (columns - 1) * e.num_prototypes_per_expert * d + 1,
    }.get(e.router, d * columns)
    if e.layer_reg_loss > 0:
        n += _linear(d, m.out_channels * math.prod(m.patch_size))
    return n


def config_parameter_counts(m: ModelConfig) -> ParameterCounts:
    """Closed-form parameter counts of `WanDiT(m)`, from the config alone (model/dit.py's `count_parameters`
    counts a built module; tests compare the two on the meta-device model)."""
    d, f = m.dim, m.ffn_dim
    patch = math.prod(m.patch_size)
    embed = (
        (m.in_channels * patch * d + d)
        + _linear(m.freq_dim, d)
        + _linear(d, d)
        + _linear(d, 6 * d)
        + _linear(m.text_dim, d)
        + _linear(d, d)
    )
    head = _linear(d, m.out_channels * patch) + 2 * d
    # TP shards q/k/v (weight + bias: column-parallel), out (weight; its bias is added after the reduce)
    # and the q/k RMSNorm weights, which follow the heads (parallel/tensor.py's table).
    attn_tp = 3 * _linear(d, d) + d * d + 2 * d
    attn_rest = d  # out bias
    block_rest = 2 * attn_rest + (2 * d if m.cross_attn_norm else 0) + 6 * d

    def ffn(width: int) -> tuple[int, int]:  # (TP-sharded, replicated)
        return _linear(d, width) + width * d, d

    e = m.moe
    width = e.expert_ffn_dim or f
    one_expert = 2 * d * width + width + d
    moe = moe_layer_indices(m)
    total = routed = tp = activated = 0
    for i in range(m.num_layers):
        total += 2 * attn_tp + block_rest
        tp += 2 * attn_tp
        if i in moe:
            shared_tp, shared_rest = (
                ffn(e.num_shared_experts * (e.shared_ffn_dim or width)) if e.num_shared_experts else (0, 0)
            )
            experts = e.num_experts * one_expert
            total += _router_parameters(m) + experts + shared_tp + shared_rest
            routed += experts
            tp += shared_tp
            activated += e.top_k * one_expert
        else:
            dense_tp, dense_rest = ffn(f)
            total += dense_tp + dense_rest
            tp += dense_tp
    total += embed + head
    return ParameterCounts(total=total, activated=total - routed + activated, routed_experts=routed, tensor_parallel=tp)


RANK_FILE_BYTES = 1 << 16
"""Allowance for one rank's rank_*.pt (data-stream position and RNG states: a few KB, more with many bad shards)."""
CHECKPOINT_FIXED_BYTES = 1 << 20
"""Allowance for meta.json, config.json and the safetensors headers (tensor names and offsets)."""


def checkpoint_bytes(cfg: Config, world: int) -> int:
    """Bytes one checkpoint of `cfg` written by `world` ranks takes on disk (see train/checkpoint.py).

    state/ holds each parameter once as the module holds it (2 bytes under bf16, else 4) plus
    fp32 master weight and Adam's two moments (12); weights/ repeats it in the module's dtype; with
    EMA on, state/ holds the fp32 EMA and ema_weights/ repeats it (4 + 4); each rank adds its rank
    file. The parallel layout changes only the number of rank files: every block of a tensor is
    written once.
    Buffers (router biases and thresholds) are a few numbers per layer and fall in the allowances.
    With LoRA-Mixer adapters the base is frozen (model/lora_mixer.py `freeze_base`): only the adapters
    have master weights and moments; the base is written in state/ and weights/ (and its EMA, as the
    EMA averages every parameter).
    """
    w_bytes = 2 if cfg.train.precision == "bf16" else 4
    ema = 8 if cfg.train.ema_decay > 0 else 0
    adapted, base = adapter_parameters(cfg.model), config_parameter_counts(cfg.model).total  # base: no adapters
    trainable, frozen = (adapted, base) if adapted else (base, 0)
    per_trained, per_frozen = w_bytes + 12 + w_bytes + ema, w_bytes + w_bytes + ema
    return trainable * per_trained + frozen * per_frozen + world * RANK_FILE_BYTES + CHECKPOINT_FIXED_BYTES
