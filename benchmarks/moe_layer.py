"""MoE layer speed and memory against a dense FFN of equal activated FLOPs and against peers' MoE layers.

    python benchmarks/moe_layer.py [--tokens 8192] [--dim 512] [--repeats 5] [--allocator both]
    python benchmarks/moe_layer.py --quick        # 256 tokens, 1 repeat: a smoke run

Forward + backward. For each shape (E experts, top-k, expert width w) it times, interleaved in one
process (dense, megamoe, deepspeed, torchtitan, dense, ...; the first round warms up; median of
the rest), so machine noise hits every contender alike:
  dense          FFN of width k * w (the FLOPs every token activates in the MoE layer), GELU, biases
  megamoe        MoEFeedForward, linear top-k router, dropless fused experts (a loop of GEMMs on CPU)
  deepspeed      deepspeed.moe.layer.MoE with the same experts (GELU FFN of width w), ep_size 1,
                 drop_tokens=False (dropless: capacity grows to the busiest expert), no random token
                 selection
  torchtitan     torchtitan 0.3.0's MoE layer (torchtitan.models.common.moe.MoE), as shipped: token-choice
                 top-k router (softmax, scores renormalised over the k), LocalTokenDispatcher (no expert
                 parallelism; dropless: every routed token is computed), load_balance_coeff=None (no
                 expert-bias buffer, so nothing outside the step changes its routing). Its experts are
                 SwiGLU (three matrices, no biases): hidden h with 3h = 2w gives the GELU expert's
                 activated FLOPs; h is rounded to a multiple of 8 (torch._grouped_mm wants 16-byte
                 strides in bf16): w 1024/256/128 -> h 680/168/88, FLOPs 0.4% / 1.6% under and 3.1%
                 over. 0.3.0 has no grouped-mm/for-loop switch: its GroupedExperts always calls
                 torch._grouped_mm (on the CPU too), and always casts the tokens and expert weights to
                 bf16 for it, whatever the layer's dtype.
  torchtitan-fp32  (fp32 runs only) the same layer with that bf16 cast removed: the expert GEMMs run in
                 the input's dtype like every other contender's. The verdict "beats peers" compares
                 megamoe with deepspeed and this one (equal precision); the as-shipped column is shown
                 for what the layer does out of the box.
Each is printed as a ratio to the dense time of the same process, with minor page faults per step
(getrusage ru_minflt around each timed step, median) and the bytes one forward keeps for backward
(autograd's saved tensors, each storage once, parameters excluded: SavedActivationMeter, as in
benchmarks/activation_memory.py; torchtitan's bf16 weight copies count: they are kept for backward).
On CUDA also the step's peak: torch.cuda.max_memory_allocated over one forward + backward, minus what
was allocated before it (every contender's weights and gradients stay resident during the run).

Allocator. On the CPU, a step allocates and frees many tensors of megabytes; glibc serves those above
its mmap threshold (128 KiB, adapting upwards to at most 32 MiB) with fresh mmap()s and unmaps them on
free(), and gives the heap's top back to the kernel once over its trim threshold, so every step touches
new pages: minor page faults, a kernel zero-fill each, repeated every step. The script runs each
allocator setting in a child process of its own (every contender alike) and prints one table per setting:
  default  the process's allocator as launched (glibc's MALLOC_* variables removed from the child's
           environment)
  tuned    TUNED_ENV: glibc keeps freed memory. MALLOC_MMAP_MAX_=0 serves every block from the heap
           (mallopt(3): 0 disables mmap for large requests), MALLOC_TRIM_THRESHOLD_=2^40 stops free()
           from returning the heap's top to the kernel. Both are needed (megamoe at E64, 8192 tokens):
           MMAP_MAX_=0 alone leaves the faults as they were (the heap's top is trimmed every step), the
           trim threshold alone makes them 12x worse (setting any of these variables stops glibc
           adapting the others, so the mmap threshold stays at 128 KiB). MALLOC_MMAP_THRESHOLD_ is not
           used: alone it leaves the faults too (trimming), and mallopt(3) caps it at 32 MiB on 64-bit
           (DEFAULT_MMAP_THRESHOLD_MAX; older glibc releases ignore larger values silently) while the
           tensors here reach 128 MiB. (The glibc 2.36 measured here does accept 2^30: a 600 MiB malloc
           stays off mmap. MMAP_MAX_=0 works either way.) MALLOC_TOP_PAD_ is not set: without trimming
           the heap reaches its peak in the warm-up round and stays there; 256 MiB of pad changed no
           fault count.
The faults/step column is the evidence that the setting does what it claims (about 0 for every
contender when tuned), and each table's header says whether a 64 MiB block came from mmap (glibc's
mallinfo2). On CUDA the host allocator does not hold the tensors (PyTorch's caching allocator does):
the script runs once and says so.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the megamoe checkout, not an installed copy
    sys.path.insert(0, str(REPO))

from megamoe.config import MoEConfig  # noqa: E402
from megamoe.device import resolve_device, synchronize  # noqa: E402

SHAPES = [(8, 2, 1024), (32, 4, 256), (64, 8, 128)]  # E, k, expert width
TARGETS = {"default": (1.05, 1.20, 1.35), "tuned": (1.05, 1.15, 1.25)}  # megamoe / dense, per shape
TUNED_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
# Without its dependencies: torchtitan 0.3.0 declares `datasets`, whose pins downgrade huggingface_hub
# and fsspec under diffusers and transformers; its MoE module needs only these (triton: CPU-only torch).
TORCHTITAN_INSTALL = "pip install --no-deps torchtitan==0.3.0 && pip install tyro spmd_types triton"


class DenseFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x, ctx=None):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------
# Contenders.


def ensure_world_of_one(device: torch.device) -> None:
    """A torch.distributed world of one for the peers that need one (an in-process store: no port)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29655")  # read by DeepSpeed, never bound: the store is in-process
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )


def deepspeed_moe(dim, width, experts, k, device, dtype):
    import deepspeed
    from deepspeed.moe.layer import MoE

    from megamoe.deepspeed_adapter import skip_shared_memory_all_reduce

    ensure_world_of_one(device)
    if device.type != "cuda":
        skip_shared_memory_all_reduce()  # a C++ build for an all-reduce this layer (ep_size 1) never makes
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    layer = MoE(
        hidden_size=dim,
        expert=DenseFFN(dim, width),
        num_experts=experts,
        ep_size=1,
        k=k,
        drop_tokens=False,
        use_rts=False,
    )
    return layer.to(device, dtype)


def swiglu_hidden(width: int) -> int:
    """SwiGLU hidden size of a GELU FFN's activated FLOPs (3h = 2w), to a multiple of 8 (at least 8)."""
    return max(8, 8 * round(2 * width / 3 / 8))


def torchtitan_available() -> str | None:
    """None when torchtitan's MoE layer imports, else why not."""
    try:
        import torchtitan.models.common.moe  # noqa: F401
    except Exception as e:  # ImportError, or a dependency failing at import
        return f"{type(e).__name__}: {e}"
    return None


def torchtitan_moe(dim, width, experts, k, device, dtype, bf16_experts: bool = True):
    """torchtitan 0.3.0's MoE layer; bf16_experts=False removes its experts' hard-coded bf16 cast."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts as TitanExperts
    from torchtitan.models.common.moe import MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    experts_cfg = TitanExperts.Config(dim=dim, hidden_dim=swiglu_hidden(width), num_experts=experts)
    cfg = MoE.Config(
        num_experts=experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=experts_cfg,
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=experts, top_k=k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=experts,
            gate=Linear.Config(in_features=dim, out_features=experts),
            top_k=k,
            score_func="softmax",
            route_norm=True,
        ),
        load_balance_coeff=None,
    )
    layer = cfg.build()
    if not bf16_experts:
        layer.routed_experts.inner_experts.forward = _same_dtype_experts(layer.routed_experts.inner_experts)
    with torch.no_grad():  # torchtitan allocates with torch.empty and initialises in its model's init pass
        for p in layer.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)  # fan-in scaling
    return layer.to(device, dtype)


def _same_dtype_experts(experts):
    """torchtitan's GroupedExperts.forward without its `.bfloat16()` casts (local, non-DTensor weights)."""

    def forward(x, num_tokens_per_expert):
        offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        w1, w2, w3 = (w.transpose(-2, -1) for w in (experts.w1_EFD, experts.w2_EDF, experts.w3_EFD))
        h = F.silu(experts._grouped_mm(A=x, B_t=w1, offs=offsets))
        h = h * experts._grouped_mm(A=x, B_t=w3, offs=offsets)
        return experts._grouped_mm(A=h, B_t=w2, offs=offsets)

    return forward


def build_contenders(dim, experts, k, width, device, dtype, skip=()) -> tuple[dict, dict]:
    """{name: (module, call)} for one shape, and {name: why it is missing} for the skipped ones."""
    from megamoe.moe.layer import MoEFeedForward

    plain = lambda m, t: m(t)  # noqa: E731
    runs, missing = {"dense": (DenseFFN(dim, k * width).to(device, dtype), plain)}, {}
    moe = MoEFeedForward(dim, width, MoEConfig(num_experts=experts, top_k=k)).to(device, dtype)
    runs["megamoe"] = (moe, plain)
    if "deepspeed" in skip:
        missing["deepspeed"] = "skipped (--no-deepspeed)"
    else:
        runs["deepspeed"] = (deepspeed_moe(dim, width, experts, k, device, dtype), lambda m, t: m(t)[0])
    why = "skipped (--no-torchtitan)" if "torchtitan" in skip else torchtitan_available()
    if why is None:
        runs["torchtitan"] = (torchtitan_moe(dim, width, experts, k, device, dtype), plain)
        if dtype == torch.float32:
            tt = torchtitan_moe(dim, width, experts, k, device, dtype, bf16_experts=False)
            runs["torchtitan-fp32"] = (tt, plain)
    else:
        missing["torchtitan"] = why
    return runs, missing


# ---------------------------------------------------------------------------------------------
# Measurements.


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_step(module, x, call):
    x = x.detach().requires_grad_()
    synchronize(x.device)
    start = time.perf_counter()
    out = call(module, x)
    out.float().square().mean().backward()
    synchronize(x.device)
    return time.perf_counter() - start


def saved_bytes(module, x, call) -> int:
    """Bytes one forward keeps for backward: unique storages autograd saves, parameters excluded."""
    from megamoe.model.activation_checkpointing import SavedActivationMeter

    with SavedActivationMeter(module) as meter:
        out = call(module, x.detach().requires_grad_())
    del out
    return meter.bytes


def cuda_step_peak(module, x, call) -> int | None:
    """torch.cuda.max_memory_allocated over one forward + backward, above what was allocated before it."""
    if x.device.type != "cuda":
        return None
    synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    time_step(module, x, call)
    return torch.cuda.max_memory_allocated(x.device) - before


def measure(runs: dict, x: torch.Tensor, repeats: int) -> dict:
    """Interleaved rounds (the first warms up) -> {name: {ms, faults, saved_mb, peak_mb}}; a contender
    that fails is reported with its error instead (e.g. out of memory) and leaves the rounds."""
    times = {name: [] for name in runs}
    faults = {name: [] for name in runs}
    errors = {}
    for _ in range(repeats + 1):
        for name, (module, call) in runs.items():
            if name in errors:
                continue
            try:
                before = minor_faults()
                times[name].append(time_step(module, x, call))
                faults[name].append(minor_faults() - before)
            except Exception as e:  # one contender's failure must not lose the others' figures
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    result = {}
    for name, (module, call) in runs.items():
        if name in errors:
            result[name] = {"error": errors[name]}
            continue
        steps = slice(1, None) if len(times[name]) > 1 else slice(None)
        peak = cuda_step_peak(module, x, call)
        result[name] = {
            "ms": statistics.median(times[name][steps]) * 1e3,
            "faults": statistics.median(faults[name][steps]),
            "saved_mb": saved_bytes(module, x, call) / 2**20,
            "peak_mb": None if peak is None else peak / 2**20,
        }
    return result


def mmap_serves(nbytes: int = 64 * 2**20) -> bool | None:
    """Whether glibc serves a block of `nbytes` with mmap (mallinfo2's mmapped bytes grow); None off glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None
    before = libc.mallinfo2().hblkhd
    block = torch.empty(nbytes, dtype=torch.uint8)
    grew = libc.mallinfo2().hblkhd > before
    del block
    return grew


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def run_setting(args, label: str) -> dict:
    """Every shape, every contender, in this process: the figures of one allocator setting."""
    warnings.filterwarnings("ignore")
    device = resolve_device("auto")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    skip = {name for name, off in (("deepspeed", args.no_deepspeed), ("torchtitan", args.no_torchtitan)) if off}
    report = {
        "label": label,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "glibc": os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None,
        "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"},
        "mmap_64mib": mmap_serves() if device.type == "cpu" else None,
        "shapes": [],
    }
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype)
    for experts, k, width in SHAPES:
        torch.manual_seed(0)
        runs, missing = build_contenders(args.dim, experts, k, width, device, dtype, skip)
        report["shapes"].append(
            {"experts": experts, "top_k": k, "width": width, "results": measure(runs, x, args.repeats)}
        )
        report["missing"] = missing
        del runs
    return report


# ---------------------------------------------------------------------------------------------
# Tables.


def equal_precision_peers(results: dict) -> list[str]:
    """The peers megamoe must beat: every other MoE layer, torchtitan's as shipped only where it computes
    in the run's precision (bf16), else its fp32 variant (see the docstring)."""
    peers = [name for name in results if name not in ("dense", "megamoe")]
    return [p for p in peers if not (p == "torchtitan" and "torchtitan-fp32" in results)]


def verdicts(results: dict, target: float, expected_peers=("deepspeed", "torchtitan")) -> str:
    megamoe, dense = results["megamoe"], results["dense"]
    if "ms" not in megamoe or "ms" not in dense:
        return "megamoe or dense failed: no verdict"
    ratio = megamoe["ms"] / dense["ms"]
    line = f"megamoe {ratio:.2f}x, target <= {target:.2f}: {'met' if ratio <= target else 'MISSED'}"
    peers = [(p, results[p]["ms"] / dense["ms"]) for p in equal_precision_peers(results) if "ms" in results[p]]
    if peers:
        beats = all(megamoe["ms"] < results[p]["ms"] for p, _ in peers)
        compared = ", ".join(f"{p} {r:.2f}x" for p, r in peers)
        line += f"; beats peers ({compared}): {'yes' if beats else 'no'}"
        absent = [p for p in expected_peers if not any(q.startswith(p) for q, _ in peers)]
        if absent:
            line += f" (not measured: {', '.join(absent)})"
    else:
        line += "; no peer measured"
    return line


def table(report: dict, args, targets: tuple) -> str:
    if report["device"] == "cuda":
        title = "allocator: CUDA caching allocator (the glibc setting does not apply; one run)"
    else:
        env = " ".join(f"{k}={v}" for k, v in report["env"].items()) or "no MALLOC_* variables"
        mmap = {True: "yes", False: "no", None: "unknown"}[report["mmap_64mib"]]
        title = f"allocator {report['label']}: {env}; a 64 MiB block comes from mmap: {mmap}"
    lines = [
        title,
        f"device {report['device']}, threads {report['threads']}, {report['glibc'] or 'libc ?'}, tokens {args.tokens}, "
        f"dim {args.dim}, {args.dtype}, forward+backward, median of {args.repeats}",
        f"{'E':>3} {'k':>2} {'width':>5}  {'contender':<16} {'ms':>9} {'x dense':>8} {'faults/step':>12} "
        f"{'saved MB':>9} {'peak MB':>8}",
    ]
    for shape, target in zip(report["shapes"], targets):
        results, dense = shape["results"], shape["results"]["dense"].get("ms")
        head = f"{shape['experts']:>3} {shape['top_k']:>2} {shape['width']:>5}"
        for name, r in results.items():
            if "error" in r:
                lines.append(f"{head}  {name:<16} failed: {r['error']}")
            else:
                ratio = f"{r['ms'] / dense:7.2f}x" if dense else "       -"
                peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
                lines.append(
                    f"{head}  {name:<16} {r['ms']:9.1f} {ratio:>8} {r['faults']:12.0f} {r['saved_mb']:9.1f} {peak:>8}"
                )
            head = " " * len(head)
        lines.append(f"{head}  -> {verdicts(results, target)}")
    for name, why in report.get("missing", {}).items():
        hint = f"; install: {TORCHTITAN_INSTALL}" if name == "torchtitan" and not why.startswith("skipped") else ""
        lines.append(f"{name}: not measured ({why}){hint}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Driver.


def child_env(setting: str) -> dict:
    """The environment of one setting's child: glibc's MALLOC_* variables removed, then TUNED_ENV's set
    for `tuned` (GLIBC_TUNABLES, if the caller set it, stays; the table prints it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if setting == "tuned":
        env.update(TUNED_ENV)
    return env


def run_child(setting: str, argv: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--child", setting],
        env=child_env(setting),
        capture_output=True,
        text=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-8000:])
        raise SystemExit(f"the {setting} allocator run failed (exit code {result.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="8192 (256 with --quick)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up: 5 (1 with --quick)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--allocator", choices=["default", "tuned", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="a smoke run: 256 tokens, 1 repeat")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--no-torchtitan", action="store_true")
    p.add_argument("--child", choices=["default", "tuned", "cuda"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (256 if args.quick else 8192)
    args.repeats = args.repeats or (1 if args.quick else 5)
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_setting(args, args.child)), flush=True)
        return
    forwarded = [a for a in argv if not a.startswith("--allocator")]
    if "--allocator" in argv:  # "--allocator X" as two words
        i = argv.index("--allocator")
        forwarded = argv[:i] + argv[i + 2 :]
    if resolve_device("auto").type == "cuda":
        print("CUDA: tensors live in PyTorch's caching allocator, not glibc's; the allocator setting is irrelevant.")
        report = run_setting(args, "cuda")
        print(table(report, args, TARGETS["default"]))
        return
    settings = ["default", "tuned"] if args.allocator == "both" else [args.allocator]
    reports = {s: run_child(s, forwarded) for s in settings}  # one child each: every contender alike
    for i, setting in enumerate(settings):
        if i:
            print()
        print(table(reports[setting], args, TARGETS[setting]))


if __name__ == "__main__":
    main()
