"""One-shot GPU check: does megamoe train, how fast are its MoE layer and a 5B block, and does the planner's
memory figure hold, on one CUDA GPU (an H100 or H200; about 5 minutes, at most 8).

    python benchmarks/gpu_check.py --out gpu_check/          # one GPU: bf16, CUDA, NCCL
    python benchmarks/gpu_check.py --cpu --out /tmp/check/   # every section on tiny shapes: CPU, gloo, fp32

Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (the table for benchmarks/RESULTS.md).
The exit code is 1 when the loss check or the experts check fails, else 0. Sections:

train      tiny_moe trained for a few steps through megamoe.train.loop.train, the production loop
           (DeepSpeed, ZeRO-1), in a torch.distributed world of one: bf16 on CUDA with NCCL. The script
           then trains the same steps in fp32 on the CPU with gloo: same initial weights, same batches,
           same noise (every random draw is made on the CPU from the step's generator). Every logged step
           loss must agree within LOSS_RTOL[precision] (see there for why that tolerance).
experts    megamoe's fused experts on this device, both paths: torch._grouped_mm with its explicit backward
           (the CUDA default) and the per-expert loop, in the run's dtype, each against the loop in fp32 on
           the same device: relative error of the output and of every gradient (tokens, routing weights,
           w1, b1, w2), 8 experts, one of them without tokens. Fails the check (exit code 1) above
           EXPERTS_RTOL[dtype].
moe_layer  megamoe.moe.layer.MoEFeedForward forward + backward at hidden 3072 and 16,384 tokens, for E8 top-2
           and E32 top-4, each against a dense FFN of the same activated FLOPs: the dense width is Wan2.2's
           14,336 and each expert is 14,336 / k wide. TFLOP/s and time(MoE) / time(dense).
peers      megamoe's MoE layer against its peers at hidden 3072 and 16,384 tokens, bf16, forward +
           backward, the contenders of benchmarks/moe_layer.py (dense FFN of width k x w, megamoe,
           DeepSpeed's MoE, torchtitan 0.3.0's MoE when installed) plus megatron-core's MoELayer
           (`megatron_moe`: alltoall token dispatcher over a world of one, NCCL). Shapes E8 top-2
           w 4,096, E32 top-4 w 1,024, E64 top-8 w 512: the CPU benchmark's three (hidden 512, w 1,024 /
           256 / 128) with the hidden size x6 and the widths x4, so the E8 case activates twice the
           FLOPs of the other two as there, and granularity (hidden / w) goes 0.75, 3, 6. Per
           contender: ms, time / dense, bytes one forward keeps for backward, and the step's
           torch.cuda.max_memory_allocated above what was allocated before it. In the --cpu mode
           megatron's layer is skipped (it cannot run without CUDA; the row says why) after its
           TransformerConfig is built, so its arguments are still checked.
block      one Wan2.2-TI2V-5B block (configs/wan2.2_ti2v_5b*.yaml: dim 3072, 24 heads, FFN 14,336, text 512
           tokens), dense and MoE (E32 top-7 experts of 1,792 + one shared), forward + backward at 16,384 and
           27,280 tokens (a 121-frame 704x1280 clip), attention forced onto the flash SDPA kernel.
           TFLOP/s from `block_flops` and MFU against the GPU's dense bf16 peak.
memory     one training step of a 2-block model at the 5B MoE width (one GPU, ZeRO-2, bf16, every block
           recomputed, the 27,280-token clip): torch.cuda.max_memory_allocated against the planner's
           weights + gradients + optimizer + activations (its reserve, the CUDA context and NCCL buffers,
           is outside what the allocator counts).

FLOPs count matrix multiplications only (norms, RoPE, modulation and gates are O(tokens x dim) and below
1%), as multiply-adds x 2, and backward as twice forward (the usual model-FLOPs convention: recomputation,
and flash attention's backward recomputing the scores, are not counted as useful work).
The CPU mode keeps every section's code path on a few-second budget: gloo instead of NCCL, fp32, tiny
widths, the default SDPA kernel; its "peak" memory is the process's peak RSS (torch counts no CPU peak),
so only the GPU figures compare with the plan.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/moe_layer.py, run as a script or imported
from moe_layer import DenseFFN, time_step  # noqa: E402

from megamoe.config import MoEConfig, load_config  # noqa: E402
from megamoe.device import device_name, peak_memory_allocated, reset_peak_memory, resolve_device, synchronize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = {"bf16": 0.03, "fp32": 1e-5}
"""Largest relative difference |loss - loss_fp32| / loss_fp32 allowed at any step.

bf16 keeps 8 significant bits: each rounding is off by at most 2^-9 (0.2%). tiny_moe's prediction
passes about 40 rounded stages (4 blocks of ~10 matmuls, norms and residual adds); independent
roundings add like a random walk, sqrt(40) x 0.2% = 1.2% on the prediction, and the loss, a mean
square of the prediction's error, moves by about twice that: 2.5%. The weights stay close for a few
steps because the optimizer updates fp32 master copies. 3% covers that; an error in the CUDA path (a
wrong kernel, a lost gradient, unsynchronised state) moves the loss by far more within a few steps.
fp32 (the --cpu mode, same device both times) must agree to rounding."""
DENSE_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}
"""Dense bf16 tensor-core peak by product name (NVIDIA datasheets; H100 means SXM). Unlisted devices
(and the CPU) use the best matmul rate measured here, which the JSON says."""


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of one mode: the GPU check's real ones, or the --cpu mode's tiny ones."""

    train_steps: int
    dim: int  # MoE layer and block width
    heads: int
    ffn: int  # dense FFN width of the layer and block
    text_len: int
    layer_tokens: int
    layer_cases: tuple  # (E, k)
    block_tokens: tuple  # grids (F, H, W) of tokens
    moe: MoEConfig  # the MoE block's FFN
    memory_overrides: tuple  # model overrides for the memory section
    memory_latent: tuple  # (F, H, W) latent of the memory section
    repeats: int
    peer_dim: int = 3072  # the peers section: hidden size, tokens, (E, k, expert width) cases
    peer_tokens: int = 16384
    peer_cases: tuple = ((8, 2, 4096), (32, 4, 1024), (64, 8, 512))


GPU = Shapes(
    train_steps=8,
    dim=3072,
    heads=24,
    ffn=14336,
    text_len=512,
    layer_tokens=16384,
    layer_cases=((8, 2), (32, 4)),
    block_tokens=((16, 32, 32), (31, 22, 40)),
    moe=MoEConfig(num_experts=32, expert_ffn_dim=1792, top_k=7, num_shared_experts=1),
    memory_overrides=(),
    memory_latent=(31, 44, 80),
    repeats=5,
)
CPU = Shapes(
    train_steps=3,
    dim=64,
    heads=4,
    ffn=256,
    text_len=8,
    layer_tokens=512,
    layer_cases=((8, 2), (32, 4)),
    block_tokens=((2, 8, 8), (4, 8, 8)),
    moe=MoEConfig(num_experts=8, expert_ffn_dim=32, top_k=2, num_shared_experts=1),
    memory_overrides=(
        "model.dim=64",
        "model.num_heads=4",
        "model.ffn_dim=256",
        "model.text_dim=32",
        "model.in_channels=4",
        "model.out_channels=4",
        "model.freq_dim=32",
        "model.moe.num_experts=8",
        "model.moe.expert_ffn_dim=32",
        "model.moe.top_k=2",
        "data.text_len=8",
    ),
    memory_latent=(2, 8, 8),
    repeats=2,
    peer_dim=64,
    peer_tokens=256,
    peer_cases=((8, 2, 64), (32, 4, 16), (64, 8, 8)),
)


# ---------------------------------------------------------------------------------------------
# FLOPs.


def ffn_flops(tokens: int, dim: int, width: int) -> float:
    """Forward FLOPs of a two-matmul FFN of hidden `width`: 2 x (2 x tokens x dim x width)."""
    return 4.0 * tokens * dim * width


def moe_flops(tokens: int, dim: int, moe: MoEConfig, width: int) -> float:
    """Forward FLOPs of an MoE FFN: each token's top_k experts and shared experts, plus the router
    (2 x tokens x dim x E)."""
    shared = moe.num_shared_experts * (moe.shared_ffn_dim or width)
    return ffn_flops(tokens, dim, moe.top_k * width + shared) + 2.0 * tokens * dim * moe.num_experts


def block_flops(tokens: int, text_len: int, dim: int, ffn_forward: float) -> float:
    """Forward + backward FLOPs of one Wan block (3 x forward), `ffn_forward` its FFN's forward FLOPs.

    self-attention  q, k, v, out projections 4 x 2 T d^2; scores Q K^T and weighted sum P V 2 x 2 T^2 d
    cross-attention q, out on the T video tokens 2 x 2 T d^2; k, v on the L text tokens 2 x 2 L d^2;
                    scores and weighted sum 2 x 2 T L d
    """
    t, length, d = float(tokens), float(text_len), float(dim)
    attention = 8 * t * d * d + 4 * t * t * d
    cross = 4 * t * d * d + 4 * length * d * d + 4 * t * length * d
    return 3.0 * (attention + cross + ffn_forward)


# ---------------------------------------------------------------------------------------------
# Sections.


def loss_agreement(losses: list[float], reference: list[float], precision: str) -> dict:
    """Compare a run's per-step losses with the fp32 CPU run's: {max_rel_diff, tolerance, passed}."""
    if len(losses) != len(reference) or not losses:
        return {"max_rel_diff": float("inf"), "tolerance": LOSS_RTOL[precision], "passed": False}
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    return {"max_rel_diff": worst, "tolerance": LOSS_RTOL[precision], "passed": bool(worst <= LOSS_RTOL[precision])}


def run_training(device: torch.device, precision: str, steps: int, workdir: Path, name: str) -> list[float]:
    """tiny_moe for `steps` steps through the training loop in a world of one; the per-step losses."""
    from megamoe.config_checks import validate
    from megamoe.parallel.topology import destroy_distributed, init_distributed
    from megamoe.train.loop import train

    cfg = load_config(
        REPO / "configs" / "tiny_moe.yaml",
        [
            f"train.steps={steps}",
            f"train.precision={precision}",
            f"train.device={device.type}",
            "logging.every_steps=1",
            "checkpoint.every_steps=0",
            "model.moe.diagnostics_every=0",
            "optim.warmup_steps=1",
            f"train.output_dir={workdir / name}",
            f"data.cache_dir={workdir / 'cache'}",
        ],
    )
    validate(cfg, world_size=1)
    topology = init_distributed(cfg.parallel, device)
    try:
        history = train(cfg, topology)
    finally:
        destroy_distributed()
    return [entry["loss"] for entry in history]


def check_training(device: torch.device, shapes: Shapes, workdir: Path) -> dict:
    precision = "bf16" if device.type == "cuda" else "fp32"
    start = time.perf_counter()
    losses = run_training(device, precision, shapes.train_steps, workdir, "device")
    reference = run_training(torch.device("cpu"), "fp32", shapes.train_steps, workdir, "cpu_fp32")
    return {
        "device": device.type,
        "precision": precision,
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "steps": shapes.train_steps,
        "losses": losses,
        "reference_fp32_cpu": reference,
        **loss_agreement(losses, reference, precision),
        "seconds": time.perf_counter() - start,
    }


def median_seconds(module, x, call, repeats: int) -> float:
    times = [time_step(module, x, call) for _ in range(repeats + 1)]  # the first warms up
    return statistics.median(times[1:])


def check_moe_layer(device: torch.device, dtype: torch.dtype, shapes: Shapes) -> list[dict]:
    from megamoe.moe.layer import MoEFeedForward

    torch.manual_seed(0)
    x = torch.randn(1, shapes.layer_tokens, shapes.dim, device=device, dtype=dtype)
    rows = []
    for experts, k in shapes.layer_cases:
        width = shapes.ffn // k
        moe_cfg = MoEConfig(num_experts=experts, top_k=k, num_shared_experts=0)
        dense = DenseFFN(shapes.dim, shapes.ffn).to(device, dtype)
        moe = MoEFeedForward(shapes.dim, width, moe_cfg).to(device, dtype)
        dense_s = median_seconds(dense, x, lambda m, t: m(t), shapes.repeats)
        moe_s = median_seconds(moe, x, lambda m, t: m(t), shapes.repeats)
        dense_flops = 3 * ffn_flops(shapes.layer_tokens, shapes.dim, shapes.ffn)
        flops = 3 * moe_flops(shapes.layer_tokens, shapes.dim, moe_cfg, width)
        rows.append(
            {
                "experts": experts,
                "top_k": k,
                "expert_width": width,
                "dim": shapes.dim,
                "tokens": shapes.layer_tokens,
                "dense_ms": dense_s * 1e3,
                "moe_ms": moe_s * 1e3,
                "dense_tflops": dense_flops / dense_s / 1e12,
                "moe_tflops": flops / moe_s / 1e12,
                "time_ratio": moe_s / dense_s,
            }
        )
        del dense, moe
    return rows


EXPERTS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # fp32: rounding; bf16: its 8-bit mantissa


def check_experts(device: torch.device, dtype: torch.dtype) -> dict:
    from megamoe.moe.dispatch import expert_assignments
    from megamoe.moe.experts import GroupedExperts

    n, dim, hidden, experts, k = 2048, 256, 512, 8, 2
    gen = torch.Generator().manual_seed(0)
    reference = GroupedExperts(experts, dim, hidden)
    with torch.no_grad():
        reference.b1.normal_(0, 0.1, generator=gen)
    logits = torch.randn(n, experts, generator=gen)
    logits[:, 3] = -1e9  # expert 3 gets no token: the zero-row case of both paths
    picked = logits.topk(k, dim=-1).indices
    routing_map = torch.zeros(n, experts, dtype=torch.bool).scatter_(1, picked, True)
    probs = logits.softmax(-1) * routing_map
    a = expert_assignments(probs, routing_map, experts, picked)
    x = torch.randn(n, dim, generator=gen)
    cotangent = torch.randn(n, dim, generator=gen)

    def run(module, use_grouped_mm, run_dtype):
        module = copy.deepcopy(module).to(device, run_dtype)
        module.use_grouped_mm = use_grouped_mm
        tokens = x.to(device, run_dtype).requires_grad_()
        weights = a.weights.detach().to(device).requires_grad_()
        out = module(tokens, a.token_index.to(device), a.tokens_per_expert.to(device), weights)
        inputs = [tokens, weights, module.w1, module.b1, module.w2]
        grads = torch.autograd.grad(out, inputs, cotangent.to(device, out.dtype))
        return [t.detach().float() for t in (out, *grads)]

    expected = run(reference, False, torch.float32)
    names = ("output", "tokens", "weights", "w1", "b1", "w2")
    errors = {}
    for path, grouped in (("grouped_mm", True), ("loop", False)):
        got = run(reference, grouped, dtype)
        errors[path] = {
            name: ((g - e).norm() / e.norm().clamp_min(1e-30)).item() for name, g, e in zip(names, got, expected)
        }
    worst = max(v for path in errors.values() for v in path.values())
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "relative_errors": errors,
        "max_rel_err": worst,
        "tolerance": EXPERTS_RTOL[dtype],
        "passed": worst <= EXPERTS_RTOL[dtype],
    }


class PeerUnavailable(RuntimeError):
    """A peer's layer that cannot be built here; its row says why."""


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # ImportError, or a CUDA extension failing to load
        return False
    return True


def megatron_moe(dim: int, width: int, experts: int, k: int, heads: int, device, dtype):
    """megatron-core's MoELayer (0.16) as a peer: top-k router without load balancing or aux loss,
    alltoall token dispatcher over megatron's groups (a world of one), GELU experts of width `width`
    without biases (the alltoall dispatcher supports none). Its experts: TEGroupedMLP when
    TransformerEngine imports, else the legacy GroupedMLP when the `grouped_gemm` package does,
    else SequentialMLP (one GEMM pair per expert in a loop). Returns (module, call, experts kind).

    On the CPU it raises PeerUnavailable after building the TransformerConfig: megatron's MoE layer
    cannot run without CUDA (the alltoall dispatcher creates a torch.cuda.Stream in its constructor;
    the router moves its weight to torch.cuda.current_device() in forward; the experts' weights are
    allocated on the current CUDA device), and no dispatcher avoids all three.
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    te = device.type == "cuda" and _importable("transformer_engine")
    legacy = not te and device.type == "cuda" and _importable("grouped_gemm")
    kind = "TEGroupedMLP" if te else "GroupedMLP (grouped_gemm)" if legacy else "SequentialMLP"
    config = TransformerConfig(
        num_layers=1,
        hidden_size=dim,
        num_attention_heads=heads,
        ffn_hidden_size=k * width,
        moe_ffn_hidden_size=width,
        num_moe_experts=experts,
        moe_router_topk=k,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_router_dtype="fp32",  # routing in fp32, as megatron advises from 32 experts on
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=te or legacy,
        add_bias_linear=False,
        gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_cpu_initialization=device.type != "cuda",
    )
    if device.type != "cuda":
        raise PeerUnavailable("megatron-core's MoELayer needs CUDA (torch.cuda.Stream in its alltoall dispatcher)")
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    model_parallel_cuda_manual_seed(0)  # its weight initialisation draws from megatron's CUDA RNG tracker
    spec = get_moe_module_spec(use_te=te, num_experts=experts, moe_grouped_gemm=te or legacy)
    layer = build_module(spec, config=config).to(device, dtype)
    return layer, lambda m, t: m(t.transpose(0, 1))[0].transpose(0, 1), kind  # megatron is sequence-first


def check_peers(device: torch.device, dtype: torch.dtype, shapes: Shapes) -> list[dict]:
    """The peers section: benchmarks/moe_layer.py's contenders plus megatron-core's, in a world of one."""
    from moe_layer import build_contenders, equal_precision_peers, measure

    from megamoe.config import ParallelConfig
    from megamoe.parallel.topology import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), device)  # NCCL on CUDA, gloo on the CPU; megatron's groups too
    rows = []
    try:
        torch.manual_seed(0)
        x = torch.randn(1, shapes.peer_tokens, shapes.peer_dim, device=device, dtype=dtype)
        for experts, k, width in shapes.peer_cases:
            torch.manual_seed(0)
            runs, missing = build_contenders(shapes.peer_dim, experts, k, width, device, dtype)
            megatron_experts = None
            try:
                module, call, megatron_experts = megatron_moe(
                    shapes.peer_dim, width, experts, k, shapes.heads, device, dtype
                )
                runs["megatron"] = (module, call)
            except PeerUnavailable as e:
                missing["megatron"] = str(e)
            except Exception as e:  # on a GPU (untested here): a TE mismatch, out of memory; keep the others
                if device.type != "cuda":
                    raise
                missing["megatron"] = f"failed to build: {type(e).__name__}: {e}"[:300]
            results = measure(runs, x, shapes.repeats)
            dense = results["dense"].get("ms")
            for r in results.values():
                r["time_ratio"] = r["ms"] / dense if dense and "ms" in r else None
            rows.append(
                {
                    "experts": experts,
                    "top_k": k,
                    "expert_width": width,
                    "dim": shapes.peer_dim,
                    "tokens": shapes.peer_tokens,
                    "results": results,
                    "missing": missing,
                    "megatron_experts": megatron_experts,
                    "beats_peers": _beats(results, equal_precision_peers(results)),
                }
            )
            del runs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        destroy_distributed()
    return rows


def _beats(results: dict, peers: list[str]) -> bool | None:
    """Whether megamoe is faster than every measured peer (None when megamoe or every peer failed)."""
    timed = [results[p]["ms"] for p in peers if "ms" in results[p]]
    if "ms" not in results["megamoe"] or not timed:
        return None
    return all(results["megamoe"]["ms"] < t for t in timed)


def block_inputs(shapes: Shapes, grid: tuple, device, dtype):
    from megamoe.model.rope import WanRotaryEmbedding
    from megamoe.moe.routers.base import RoutingContext

    tokens = math.prod(grid)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, shapes.dim, generator=g).to(device, dtype)
    text = torch.randn(1, shapes.text_len, shapes.dim, generator=g).to(device, dtype)
    modulation = (0.1 * torch.randn(1, 1, 6, shapes.dim, generator=g)).to(device, dtype)
    rope = WanRotaryEmbedding(shapes.dim // shapes.heads, 1024)(grid, device)
    ctx = RoutingContext(batch_size=1, seq_len=tokens)
    return x, text, modulation, rope, ctx


def check_block(device: torch.device, dtype: torch.dtype, shapes: Shapes, peak_tflops: float) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megamoe.config import ModelConfig
    from megamoe.model.dit import WanBlock

    flash = device.type == "cuda"
    rows = []
    for kind in ("dense", "moe"):
        moe = shapes.moe if kind == "moe" else MoEConfig()
        cfg = ModelConfig(dim=shapes.dim, num_heads=shapes.heads, ffn_dim=shapes.ffn, num_layers=1, moe=moe)
        torch.manual_seed(0)
        block = WanBlock(cfg, 0).to(device, dtype)
        for grid in shapes.block_tokens:
            x, text, modulation, rope, ctx = block_inputs(shapes, grid, device, dtype)

            def step(module, inp):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else _nothing():
                    return module(inp, text, modulation, rope, ctx)

            seconds = median_seconds(block, x, step, shapes.repeats)
            tokens = math.prod(grid)
            width = moe.expert_ffn_dim or shapes.ffn
            ffn = (
                moe_flops(tokens, shapes.dim, moe, width)
                if kind == "moe"
                else ffn_flops(tokens, shapes.dim, shapes.ffn)
            )
            tflops = block_flops(tokens, shapes.text_len, shapes.dim, ffn) / seconds / 1e12
            rows.append(
                {
                    "block": kind,
                    "tokens": tokens,
                    "ms": seconds * 1e3,
                    "tflops": tflops,
                    "mfu": tflops / peak_tflops,
                    "attention": "flash" if flash else "default (cpu)",
                }
            )
        del block
    return rows


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """The best of a few square matmuls: the achievable peak where no datasheet figure is known."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(4):
        synchronize(device)
        start = time.perf_counter()
        a @ a
        synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e12)
    return best


def peak_tflops_of(device: torch.device, dtype: torch.dtype, shapes: Shapes) -> tuple[float, str]:
    name = device_name(device)
    for key, value in DENSE_PEAK_TFLOPS.items():  # longest names first where they overlap (H100 PCIe)
        if device.type == "cuda" and key in name:
            return value, f"datasheet dense bf16 peak of {key}"
    return measured_matmul_tflops(device, dtype, 8192 if device.type == "cuda" else 512), "measured matmul peak"


def check_memory(device: torch.device, shapes: Shapes) -> dict:
    """One training step of a 2-block 5B-width MoE model, peak allocated bytes against the plan."""
    from megamoe.model.activation_checkpointing import apply_activation_checkpointing
    from megamoe.model.dit import build_model
    from megamoe.parallel.topology import destroy_distributed, init_distributed
    from megamoe.tools.layout_planner import make_plan
    from megamoe.train.engine import build_engine
    from megamoe.train.objective import training_loss
    from megamoe.train.step import step_generator

    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = load_config(
        REPO / "configs" / "wan2.2_ti2v_5b_moe.yaml",
        [
            "model.num_layers=2",
            "parallel.expert_parallel_size=1",
            "model.moe.diagnostics_every=0",
            f"train.precision={precision}",
            *shapes.memory_overrides,
        ],
    )
    plan = make_plan(cfg, world=1, latent=shapes.memory_latent, reserve_gb=0.0)
    init_distributed(cfg.parallel, device)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, device=device)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        engine = build_engine(model, cfg)
        engine.train()
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, cfg.model.in_channels, *shapes.memory_latent, generator=g).to(device)
        text = torch.randn(1, cfg.data.text_len, cfg.model.text_dim, generator=g).to(device)
        synchronize(device)
        reset_peak_memory(device)  # from here: weights, gradients, optimizer state (created at the step), activations
        rss_before = _peak_rss()
        loss, _ = training_loss(engine, engine.module, latents, text, cfg, step_generator(0, 0, 0))
        engine.backward(loss)
        engine.step()
        synchronize(device)
        peak = peak_memory_allocated(device)
        measured, what = (
            (peak, "torch.cuda.max_memory_allocated")
            if peak is not None
            else (_peak_rss(), "peak RSS of the process (CPU mode; not comparable with the plan)")
        )
        del engine, model
    finally:
        destroy_distributed()
    predicted = plan.weights + plan.gradients + plan.optimizer + plan.activations
    return {
        "config": "wan2.2_ti2v_5b_moe, 2 blocks, EP 1, one device",
        "latent": list(shapes.memory_latent),
        "tokens": plan.tokens_per_sample,
        "parameters": plan.params.total,
        "measured_bytes": float(measured),
        "measured": what,
        "rss_before_step_bytes": float(rss_before),
        "planned_bytes": predicted,
        "planned": {
            "weights": plan.weights,
            "gradients": plan.gradients,
            "optimizer": plan.optimizer,
            "activations": plan.activations,
        },
        "measured_over_planned": measured / predicted,
    }


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Report.


def peers_table(rows: list[dict]) -> list[str]:
    """The peers section's markdown rows."""
    lines = [
        "",
        "| MoE peers | contender | ms (fwd+bwd) | x dense | saved for backward MB | step peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        case = f"E{row['experts']} top-{row['top_k']} (w {row['expert_width']}, d {row['dim']}, {row['tokens']} tokens)"
        for name, r in row["results"].items():
            label = f"{name} ({row['megatron_experts']})" if name == "megatron" else name
            if "error" in r:
                lines.append(f"| {case} | {label} | failed: {r['error']} | | | |")
                continue
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            lines.append(
                f"| {case} | {label} | {r['ms']:.2f} | {r['time_ratio']:.2f}x | {r['saved_mb']:.1f} | {peak} |"
            )
        for name, why in row["missing"].items():
            lines.append(f"| {case} | {name} | not measured: {why} | | | |")
        verdict = {True: "yes", False: "no", None: "-"}[row["beats_peers"]]
        lines.append(f"| {case} | megamoe faster than every peer measured | {verdict} | | | |")
    return lines


def markdown(report: dict) -> str:
    t, mem = report["train"], report["memory"]
    lines = [
        f"GPU check on {report['device_name']} ({report['mode']} mode), {report['seconds']:.0f} s; "
        f"peak {report['peak_tflops']:.3g} TFLOP/s ({report['peak_source']}).",
        "",
        f"**train**: tiny_moe, {t['steps']} steps, {t['precision']} on {t['device']} ({t['backend']}) against "
        f"fp32 on the CPU: largest relative loss difference {t['max_rel_diff']:.2e} "
        f"(tolerance {t['tolerance']:g}): {'passed' if t['passed'] else 'FAILED'}.",
        "",
        f"**experts**: fused experts in {report['experts']['dtype']}, grouped_mm and loop paths against the fp32 "
        f"loop: largest relative error {report['experts']['max_rel_err']:.2e} (tolerance "
        f"{report['experts']['tolerance']:g}): {'passed' if report['experts']['passed'] else 'FAILED'}.",
        "",
        "| MoE layer | tokens | dense ms | MoE ms | dense TFLOP/s | MoE TFLOP/s | MoE / dense time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["moe_layer"]:
        lines.append(
            f"| E{r['experts']} top-{r['top_k']} (w {r['expert_width']}, d {r['dim']}) | {r['tokens']} | "
            f"{r['dense_ms']:.2f} | {r['moe_ms']:.2f} | {r['dense_tflops']:.3g} | {r['moe_tflops']:.3g} | "
            f"{r['time_ratio']:.2f}x |"
        )
    lines += peers_table(report["peers"])
    lines += ["", "| 5B block | tokens | attention | ms (fwd+bwd) | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    for r in report["block"]:
        lines.append(
            f"| {r['block']} | {r['tokens']} | {r['attention']} | {r['ms']:.1f} | {r['tflops']:.3g} | "
            f"{100 * r['mfu']:.1f}% |"
        )
    planned = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in mem["planned"].items())
    lines += [
        "",
        f"**memory**: {mem['config']}, {mem['tokens']} tokens, {mem['parameters'] / 1e6:.1f}M parameters: "
        f"{mem['measured_bytes'] / 1e9:.3g} GB measured ({mem['measured']}) against "
        f"{mem['planned_bytes'] / 1e9:.3g} GB planned ({planned}): {mem['measured_over_planned']:.2f}x.",
        "",
    ]
    return "\n".join(lines)


def run_check(cpu: bool, workdir: Path) -> dict:
    device = torch.device("cpu") if cpu else resolve_device("cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    shapes = CPU if cpu else GPU
    start = time.perf_counter()
    peak, source = peak_tflops_of(device, dtype, shapes)
    report = {
        "mode": "cpu" if cpu else "gpu",
        "device_name": device_name(device),
        "torch": torch.__version__,
        "peak_tflops": peak,
        "peak_source": source,
    }
    report["train"] = check_training(device, shapes, workdir)
    report["experts"] = check_experts(device, dtype)
    report["moe_layer"] = check_moe_layer(device, dtype, shapes)
    report["peers"] = check_peers(device, dtype, shapes)
    report["block"] = check_block(device, dtype, shapes, peak)
    report["memory"] = check_memory(device, shapes)
    report["seconds"] = time.perf_counter() - start
    report["video_modules_imported"] = sorted(m for m in ("av", "decord") if m in sys.modules)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (gloo, fp32): what CI runs")
    args = parser.parse_args(argv)
    if not args.cpu:
        try:
            resolve_device("cuda")
        except RuntimeError:
            print(
                "error: no CUDA device is visible; run on a GPU machine, or pass --cpu for the CPU check",
                file=sys.stderr,
            )
            return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file; pass a directory", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        report = run_check(args.cpu, Path(workdir))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["train"]["passed"] and report["experts"]["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
