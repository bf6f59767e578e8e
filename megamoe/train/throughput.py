"""Throughput figures of the progress line: model FLOPs per video token, and the GPU's peak for MFU.

    flops = train_flops_per_token(cfg.model, tokens_per_sample, cfg.data.text_len)   # once at start-up
    TFLOP/s = flops x video tokens per second;  MFU = TFLOP/s / peak_flops(device name)

The count is analytic (the matrix products and attention of `WanDiT`, 2 FLOPs per multiply-add), so
it needs no forward pass of a model that may fill a GPU; tests/train/test_validation.py checks the
forward part against torch's FlopCounterMode (posttrain/evaluation.flops_per_token). A training
step is 3 forwards' worth (forward, and backward for inputs and weights); recomputed activations
(train.activation_checkpointing) are not counted, as MFU is defined on model FLOPs (PaLM, appendix B).
MoE layers count top_k routed experts (for routers whose experts per token vary, top_k is their
average or bound: nominal), the shared experts, a linear gate and the experts' second biases.
"""

from __future__ import annotations

import math

from megamoe.config import ModelConfig
from megamoe.moe.layer import moe_layer_indices

PEAK_BF16_DENSE = (
    ("H100 PCIe", 756e12, "H100 PCIe bf16 dense 756 TFLOP/s"),
    ("H100", 989e12, "H100 SXM bf16 dense 989 TFLOP/s"),
    ("H200", 989e12, "H200 bf16 dense 989 TFLOP/s"),
    ("GH200", 989e12, "GH200 bf16 dense 989 TFLOP/s"),
    ("A100", 312e12, "A100 bf16 dense 312 TFLOP/s"),
)
"""(device-name substring, peak FLOP/s, description): NVIDIA's dense bf16 tensor-core peaks (no
sparsity), first match wins. fp32 runs are measured against the same bf16 peak."""


def peak_flops(device_name: str) -> tuple[float, str] | None:
    """(peak bf16 dense FLOP/s, what it is) of a GPU by its name (torch.cuda.get_device_name), or None
    when the table does not know it (no MFU is shown then)."""
    for needle, peak, what in PEAK_BF16_DENSE:
        if needle in device_name:
            return peak, what
    return None


def forward_flops_per_token(m: ModelConfig, tokens_per_sample: int, text_len: int) -> float:
    """Forward FLOPs per video token of the WanDiT `m` on samples of `tokens_per_sample` patch tokens
    with `text_len` text tokens; per-sample work (timestep and text embeddings, the text's keys and
    values) is spread over the sample's tokens."""
    d, s, L = m.dim, tokens_per_sample, text_len
    patch = math.prod(m.patch_size)
    per_token = 2 * m.in_channels * patch * d + 2 * d * m.out_channels * patch  # patch embedding, proj_out
    per_sample = 2 * L * (m.text_dim * d + d * d)  # text embedder MLP
    per_sample += 2 * (m.freq_dim * d + d * d + d * 6 * d)  # time embedder MLP and modulation
    moe = m.moe
    moe_blocks = moe_layer_indices(m)
    for block in range(m.num_layers):
        per_token += 2 * 4 * d * d + 4 * s * d  # self-attention q, k, v, out; scores and values over s keys
        per_token += 2 * 2 * d * d + 4 * L * d  # cross-attention q, out; scores and values over the text
        per_sample += 2 * 2 * L * d * d  # cross-attention keys and values of the text
        if block in moe_blocks:
            expert = moe.expert_ffn_dim or m.ffn_dim
            shared = moe.shared_ffn_dim or expert
            per_token += 4 * d * (moe.top_k * expert + moe.num_shared_experts * shared)
            per_token += 2 * 2 * d * moe.num_experts  # the gate [dim -> E], and the experts' biases mixed by weight
        else:
            per_token += 4 * d * m.ffn_dim
    return per_token + per_sample / s


def train_flops_per_token(m: ModelConfig, tokens_per_sample: int, text_len: int) -> float:
    """Model FLOPs of one training step per video token: 3 x the forward's (forward + backward)."""
    return 3 * forward_flops_per_token(m, tokens_per_sample, text_len)
