"""Peak host memory of each rank from launch to its first training step, by expert-parallel size.

    python benchmarks/build_memory.py [--ranks 4] [--config configs/tiny_moe.yaml] [key=value ...]

Launches --ranks gloo ranks on the CPU under torchrun for each EP in 1, 2, 4 (those dividing
--ranks) building as training does (`sharded`: `build_sharded_model`, i.e. meta device, parallelize,
then each rank allocates and draws only what it holds), and once more at the largest EP building as
training did before (`full`: the whole model on every rank, then `parallelize` keeps the shard).
Each rank reports, from /proc/self/status:

  held     bytes of the parameters the rank holds: its routed experts (experts) and the rest (its
           tensor-parallel blocks and every replicated parameter)
  first    what the process adds on its first build of a model (of 0.1 MB, same layout, built and
           dropped before `base`): the kernels' code paged in from libtorch and the allocator's
           pools for the initialisation's fixed-size chunks, the same whatever the model's size
  base     resident memory after the imports (torch, megatron-core, DeepSpeed), the process
           groups and that first build, just before the model is built: the process, not the model
  build    peak resident memory (VmHWM, its peak reset at base) while the model is built, minus base
  engine   peak from base until the DeepSpeed engine is built (the state just before the first
           step), minus base
  step     peak from base until the end of the first training step (forward, backward, optimizer
           step on a LATENT-sized micro-batch), minus base: launch to first step, less the process
  planned  the planner's bytes for this rank (layout_planner.make_plan at this layout and LATENT):
           weights + gradients + optimizer state (fp32 master partition, Adam moments) + activations

Two bounds, per rank. build <= 1.15 x held: the build never holds more than the rank's shard plus
the unsharded rest and 15% (allocator and first-use overheads). step <= 1.15 x planned: from launch to
the first step the rank holds no more than its share of the training state. On a GPU, the engine's
and the step's memory (ZeRO's flat parameter buffer, fp32 master partition, Adam moments, gradients,
activations) is device memory; on the CPU it is host memory, which is what makes it measurable here.
Ranks run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so that a freed
tensor's memory goes back to the system and resident memory follows the tensors alive. With glibc's
default, the threshold rises to the largest block freed so far (up to 32 MiB), later blocks come from
the heap and stay resident after they are freed: in this benchmark that kept 350-380 MB more at the
first step's peak (1.17-1.26 x planned), the CPU's counterpart of the CUDA caching allocator's
fragmentation, which the planner's `reserve` covers on a GPU and not here.
The default model (configs/tiny_moe.yaml made wider and deeper, see WIDER) holds 604 MB of routed
experts and 119 MB of other parameters. Every figure is the largest over the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WIDER = [
    "model.dim=384",
    "model.ffn_dim=3072",
    "model.num_layers=8",
    "model.num_heads=4",
    "model.moe.num_experts=8",
    "model.moe.diagnostics_every=0",
]
LATENT = (2, 8, 8)  # (F, H, W) of the first step's micro-batch: 32 tokens per sample at patch (1, 2, 2)
BOUND = 1.15
MB = 1e6


def memory_kb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since launch) of this process, in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(args) -> None:
    import deepspeed  # noqa: F401  imported before `base`, as every training rank imports it
    import torch

    from megamoe.config import load_config
    from megamoe.model.activation_checkpointing import apply_activation_checkpointing
    from megamoe.model.dit import build_model
    from megamoe.parallel.parallelize import build_sharded_model, parallelize
    from megamoe.parallel.topology import destroy_distributed, init_distributed
    from megamoe.tools.layout_planner import make_plan
    from megamoe.train.engine import build_engine
    from megamoe.train.objective import training_loss
    from megamoe.train.step import step_generator

    torch.set_num_threads(1)
    cfg = load_config(
        args.config, [*WIDER, *args.overrides, f"parallel.expert_parallel_size={args.ep}", "train.device=cpu"]
    )
    device = torch.device("cpu")
    topology = init_distributed(cfg.parallel, device)
    cold = memory_kb("VmRSS")
    small = load_config(
        args.config,
        [
            *WIDER,
            *args.overrides,
            f"parallel.expert_parallel_size={args.ep}",
            "train.device=cpu",
            "model.dim=32",
            "model.ffn_dim=64",
            "model.num_layers=1",
        ],
    )
    first = build_sharded_model(small, device) if args.build == "sharded" else build_model(small.model, device)
    first_use = memory_kb("VmHWM") - cold - sum(p.numel() * p.element_size() for p in first.parameters()) / 1e3
    del first
    base = memory_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS: peaks from here on are the model's
        f.write("5")
    start = time.perf_counter()
    if args.build == "sharded":
        model = build_sharded_model(cfg, device)
    else:  # the whole model on every rank, then its shard
        model = build_model(cfg.model, device, cfg.train.seed)
        parallelize(model, cfg.parallel)
    build_s = time.perf_counter() - start
    build = memory_kb("VmHWM")
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    held = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    engine = build_engine(model, cfg)
    engine_peak = memory_kb("VmHWM")
    b, m = cfg.data.micro_batch_size, cfg.model
    latents, text = torch.randn(b, m.in_channels, *LATENT), torch.randn(b, cfg.data.text_len, m.text_dim)
    loss, _ = training_loss(
        engine, engine.module, latents, text, cfg, step_generator(cfg.train.seed, topology.dp_rank, 0)
    )
    engine.backward(loss)
    engine.step()
    step = memory_kb("VmHWM")
    plan = make_plan(cfg, topology.world_size, latent=LATENT)
    planned = plan.weights + plan.gradients + plan.optimizer + plan.activations
    experts = sum(size for name, size in held.items() if ".ffn.experts." in name)
    with open(os.path.join(args.out, f"rank{topology.rank}.json"), "w") as f:
        json.dump(
            {
                "first": first_use * 1e3,
                "base": base * 1e3,
                "build": (build - base) * 1e3,
                "engine": (engine_peak - base) * 1e3,
                "step": (step - base) * 1e3,
                "planned": planned,
                "experts": experts,
                "rest": sum(held.values()) - experts,
                "build_s": build_s,
            },
            f,
        )
    destroy_distributed()


def launch(args, build: str, ep: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(args.ranks),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            "127.0.0.1:0",
            os.path.abspath(__file__),
            "--worker",
            "--build",
            build,
            "--ep",
            str(ep),
            "--out",
            out,
            "--config",
            args.config,
            *args.overrides,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))  # see the docstring
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{build} EP{ep} failed:\n{result.stderr[-4000:]}")
        return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(args.ranks)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_moe.yaml")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build", choices=("sharded", "full"), default="sharded", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides, after the WIDER defaults")
    args = p.parse_intermixed_args()
    if args.worker:
        return worker(args)
    print(f"{args.ranks} gloo ranks on the CPU, {args.config} + {' '.join(WIDER + args.overrides)}")
    print(
        f"{'build':>7} {'EP':>2} | {'experts MB':>10} {'rest MB':>7} | {'first MB':>8} {'base MB':>7} {'build MB':>8} "
        f"{'engine MB':>9} {'step MB':>7} {'planned MB':>10} | {'build/held':>10} {'step/planned':>12} | {'build s':>7}"
    )
    eps = [e for e in (1, 2, 4) if args.ranks % e == 0]
    exceeded = False
    for build, ep in [("sharded", e) for e in eps] + [("full", eps[-1])]:
        ranks = launch(args, build, ep)
        top = {k: max(r[k] for r in ranks) for k in ranks[0]}
        build_ratio = max(r["build"] / (r["experts"] + r["rest"]) for r in ranks)
        step_ratio = max(r["step"] / r["planned"] for r in ranks)
        print(
            f"{build:>7} {ep:>2} | {top['experts'] / MB:>10.1f} {top['rest'] / MB:>7.1f} | "
            f"{top['first'] / MB:>8.1f} {top['base'] / MB:>7.0f} {top['build'] / MB:>8.1f} {top['engine'] / MB:>9.1f} "
            f"{top['step'] / MB:>7.1f} {top['planned'] / MB:>10.1f} | {build_ratio:>10.3f} {step_ratio:>12.3f} | "
            f"{top['build_s']:>7.1f}",
            flush=True,
        )
        exceeded |= build == "sharded" and (build_ratio > BOUND or step_ratio > BOUND)
    print(
        f"bounds (sharded: build <= {BOUND} x held and step <= {BOUND} x planned, on every rank): "
        f"{'EXCEEDED' if exceeded else 'held'}"
    )
    sys.exit(1 if exceeded else 0)


if __name__ == "__main__":
    main()
