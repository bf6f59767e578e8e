"""One-shot GPU check: does megamoe train, how fast are its MoE layer and a 5B block, and does the planner's
memory figure hold, on one CUDA GPU (an H100 or H200; about 5 minutes, at most 8).

    python benchmarks/gpu_check.py --out gpu_check/          # one GPU: bf16, CUDA, NCCL
    python benchmarks/gpu_check.py --cpu --out /tmp/check/   # every section on tiny shapes: CPU, gloo, fp32

Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (the table for benchmarks/RESULTS.md).
The exit code is 1 when the loss check fails, else 0. Sections:

train      tiny_moe trained for a few steps through megamoe.train.loop.train, the production loop
           (DeepSpeed, ZeRO-1), in a torch.distributed world of one: bf16 on CUDA with NCCL. The script
           then trains the same steps in fp32 on the CPU with gloo: same initial weights, same batches,
           same noise (every random draw is made on the CPU from the step's generator). Every logged step
           loss must agree within LOSS_RTOL[precision] (see there for why that tolerance).
moe_layer  megamoe.moe.layer.MoEFeedForward forward + backward at hidden 3072 and 16,384 tokens, for E8 top-2
           and E32 top-4, each against a dense FFN of the same activated FLOPs: the dense width is Wan2.2's
           14,336 and each expert is 14,336 / k wide. TFLOP/s and time(MoE) / time(dense).
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
        "| MoE layer | tokens | dense ms | MoE ms | dense TFLOP/s | MoE TFLOP/s | MoE / dense time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["moe_layer"]:
        lines.append(
            f"| E{r['experts']} top-{r['top_k']} (w {r['expert_width']}, d {r['dim']}) | {r['tokens']} | "
            f"{r['dense_ms']:.2f} | {r['moe_ms']:.2f} | {r['dense_tflops']:.3g} | {r['moe_tflops']:.3g} | "
            f"{r['time_ratio']:.2f}x |"
        )
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
    report["moe_layer"] = check_moe_layer(device, dtype, shapes)
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
    return 0 if report["train"]["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
