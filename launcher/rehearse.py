"""Rehearse one rank of a cluster layout in one process: build its shard, load its slices, take a step, measure.

    python launcher/rehearse.py --config configs/wan2.2_ti2v_5b_moe.yaml --nodes 4 --gpus-per-node 8 --rank 0 \
        [--init-from /weights/Wan2.2-TI2V-5B/transformer] [--num-layers 6] [key=value ...]

Before a cluster is booked, this answers "does rank R of this layout start, load and step, and how many
bytes does it hold?" on one machine. The process joins torch's fake process group as rank R of
nodes x gpus-per-node ranks (see parallel/topology.init_rehearsal_distributed): collectives move no
data, so values are meaningless, but every shape is the one rank R has on the cluster. It

1. picks the layout the planner picks (the config's own if it fits, else megamoe.tools.layout_planner.search's),
2. builds rank R's shard of the model on the meta device and materialises only what R holds,
3. loads R's slices of `--init-from` (a dense diffusers Wan checkpoint is upcycled while loading),
4. builds the DeepSpeed engine, runs one training step on a small latent (--latent), and
5. prints the bytes R holds per category next to the planner's figure for the same config:
   weights, gradients (the partition DeepSpeed reduces into), optimizer state (fp32 master
   partition + Adam moments), and activations per token (what the forward saves for backward).

A full 5B rank needs more host memory than a workstation may have: --num-layers builds fewer blocks.
Weights, gradients and optimizer state are then compared with the planner for the same reduced
config, and the full config's planner figure is shown beside them.
Exit code 0 when measured and planned agree within --tolerance on weights, gradients and optimizer;
1 when they do not; 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
import warnings

EXIT_BAD_INPUT = 2
CATEGORIES = ("weights", "gradients", "optimizer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--nodes", type=int, required=True, help="nodes of the planned cluster")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--rank", type=int, default=0, help="global rank to play (default 0)")
    p.add_argument("--init-from", default=None, help="weights to load R's slices of (train.init_from)")
    p.add_argument("--num-layers", type=int, default=None, help="build fewer blocks than the config (memory)")
    p.add_argument(
        "--latent",
        default=None,
        help="latent F,H,W of the one training step (default: one patch deep, four high and wide: 1,8,8 for "
        "Wan's 1x2x2 patch)",
    )
    p.add_argument(
        "--text-len",
        type=int,
        default=16,
        help="text tokens of that step (default 16: the step exists to exercise every code path; on a "
        "CPU, bf16 matmuls are slow and the 512 text tokens of the 5B configs would dominate)",
    )
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, for the planner")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest |measured/planned - 1| accepted")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    return p.parse_intermixed_args(argv)


class ByteLedger:
    """Bytes of distinct storages by category: a tensor seen twice (a view, a shared buffer) counts once.

    Storages are keyed by address, so the ledger holds each one it has seen until it is dropped:
    otherwise a buffer freed in the step (a gradient) could hand its address to one allocated there
    (Adam's moments), which would then count as already seen, under the wrong category.
    """

    def __init__(self):
        self._seen: dict[int, tuple[str, int]] = {}
        self._held: list = []

    def add(self, category: str, tensors) -> None:
        import torch

        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in self._seen:
                    self._seen[storage.data_ptr()] = (category, storage.nbytes())
                    self._held.append(storage)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for category, nbytes in self._seen.values():
            out[category] += nbytes
        return out


def choose_layout(cfg, world: int, gpus_per_node: int, gpu_memory_gb: float):
    """The config's own layout if the planner says it fits, else the layout the planner's search picks."""
    from megamoe.config import ConfigError
    from megamoe.tools.layout_planner import make_plan, search, with_layout

    plan = make_plan(cfg, world, gpu_memory_gb=gpu_memory_gb)
    if not plan.fits:
        plan = search(cfg, world, gpus_per_node, gpu_memory_gb=gpu_memory_gb)
        if plan is None:
            raise ConfigError(f"no layout of {world} GPUs fits {gpu_memory_gb:g} GB per GPU; use more nodes")
    return with_layout(cfg, plan.layout), plan


def rehearse(cfg, topology, latent: tuple, text_len: int, init_from: str | None, log=print) -> tuple[dict, float]:
    """Build, load, one step; returns (bytes per category, activation bytes saved per token)."""
    import torch

    from megamoe.deepspeed_adapter import fp32_master_partitions, torch_optimizer, zero_gradient_partitions
    from megamoe.model.activation_checkpointing import SavedActivationMeter, apply_activation_checkpointing
    from megamoe.model.dit import count_parameters
    from megamoe.parallel.parallelize import build_sharded_model
    from megamoe.parallel.sharded_weights import init_from as load_slices
    from megamoe.train.engine import build_engine
    from megamoe.train.objective import training_loss
    from megamoe.train.step import step_generator

    start = time.perf_counter()
    model = build_sharded_model(cfg, topology.device, initialize=not init_from)  # loading fills it otherwise
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    log(
        f"built rank {topology.rank}'s shard: {count_parameters(model) / 1e9:.3f}B parameters "
        f"in {time.perf_counter() - start:.0f} s"
    )
    if init_from:
        start = time.perf_counter()
        log(f"{load_slices(model, init_from, cfg.train.seed)} in {time.perf_counter() - start:.0f} s")
    engine = build_engine(model, cfg)
    ledger = ByteLedger()
    ledger.add("weights", engine.module.parameters())

    m, dtype = cfg.model, (torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
    b = cfg.data.micro_batch_size
    latents = torch.randn(b, m.in_channels, *latent, dtype=dtype, device=topology.device)
    text = torch.randn(b, text_len, m.text_dim, dtype=dtype, device=topology.device)
    start = time.perf_counter()
    with SavedActivationMeter(engine.module) as meter:
        loss, _ = training_loss(engine, engine.module, latents, text, cfg, step_generator(cfg.train.seed, 0, 0))
    engine.backward(loss)
    # After backward, before the step: the gradient partition DeepSpeed reduced into.
    ledger.add("gradients", [p.grad for p in engine.module.parameters()])
    ledger.add("gradients", zero_gradient_partitions(engine))
    engine.step()
    # After the step: the fp32 master partition and Adam's moments.
    ledger.add("optimizer", fp32_master_partitions(engine))
    adam = torch_optimizer(engine)
    ledger.add("optimizer", [v for s in adam.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0])
    log(f"one training step on a {'x'.join(map(str, latent))} latent in {time.perf_counter() - start:.0f} s")
    return ledger.totals(), meter.bytes / local_tokens(cfg, latent)


def local_tokens(cfg, latent: tuple) -> int:
    """Tokens of one micro-batch that one rank holds: CP splits the sequence, and so does TP under SP."""
    from megamoe.tools.layout_planner import tokens_of

    p = cfg.parallel
    shards = p.context_parallel_size * (p.tensor_parallel_size if p.sequence_parallel else 1)
    return tokens_of(cfg.model, latent) * cfg.data.micro_batch_size // shards


def compare(
    measured: dict, planned, full_planned, act_per_token: float, planned_act_per_token: float, tolerance: float
) -> tuple[str, bool]:
    """The table printed at the end, and whether every category agrees within `tolerance`."""
    rows = [
        f"{'category':12s} {'measured':>12s} {'planned':>12s} {'ratio':>7s}"
        + (f" {'full config':>12s}" if full_planned is not None else "")
    ]
    ok = True
    for kind in CATEGORIES:
        got, want = measured[kind], getattr(planned, kind)
        ratio = got / want if want else float("inf")
        ok &= abs(ratio - 1) <= tolerance
        full = f" {getattr(full_planned, kind) / 1e6:9.1f} MB" if full_planned is not None else ""
        rows.append(f"{kind:12s} {got / 1e6:9.1f} MB {want / 1e6:9.1f} MB {ratio:7.3f}{full}")
    rows.append(
        f"{'activations':12s} {act_per_token / 1e3:9.1f} KB {planned_act_per_token / 1e3:9.1f} KB "
        f"{act_per_token / planned_act_per_token:7.3f}  per token, saved for backward"
    )
    return "\n".join(rows), ok


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megamoe.config import ConfigError, load_config
    from megamoe.config_checks import validate
    from megamoe.model.weights import WeightsError
    from megamoe.tools.layout_planner import parse_latent

    world = args.nodes * args.gpus_per_node
    try:
        if args.nodes < 1 or args.gpus_per_node < 1 or not 0 <= args.rank < world:
            raise ConfigError(f"--rank must be in 0..{world - 1} and --nodes, --gpus-per-node >= 1")
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=world)  # model.patch_size first: --latent is read in its units
        pt, ph, pw = cfg.model.patch_size
        latent = parse_latent(args.latent if args.latent is not None else f"{pt},{4 * ph},{4 * pw}", cfg.model)
        cfg, full_plan = choose_layout(cfg, world, args.gpus_per_node, args.gpu_memory_gb)
        if args.num_layers is not None:
            if not 1 <= args.num_layers <= cfg.model.num_layers:
                raise ConfigError(f"--num-layers must be in 1..{cfg.model.num_layers}")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=args.num_layers))
        validate(cfg, world_size=world)
        if args.init_from:
            from megamoe.parallel.sharded_weights import open_init_source

            open_init_source(args.init_from, cfg.model)  # headers and shapes only, before anything is built
    except (ConfigError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from megamoe.device import resolve_device
    from megamoe.parallel.topology import destroy_distributed, init_rehearsal_distributed
    from megamoe.tools.layout_planner import activation_bytes, make_plan, tokens_of, zero_gradient_bytes

    device = resolve_device(cfg.train.device)
    topology = init_rehearsal_distributed(cfg.parallel, device, args.rank, world, args.gpus_per_node)
    print(
        f"rehearsing rank {args.rank} of {args.nodes} x {args.gpus_per_node} as {topology.describe()} "
        f"(ep rank {topology.ep_rank}), ZeRO-{cfg.optim.zero_stage}, {cfg.train.precision}, "
        f"checkpointing {cfg.train.activation_checkpointing}, {cfg.model.num_layers} blocks on {device.type}"
    )
    try:
        measured, act_per_token = rehearse(cfg, topology, latent, args.text_len, args.init_from)
    finally:
        destroy_distributed()
    planned = make_plan(cfg, world, gpu_memory_gb=args.gpu_memory_gb, latent=latent)
    layout = planned.layout
    # The planner's Plan.gradients is the worst rank (ZeRO-2 keeps whole parameters per partition
    # touched, so ranks differ): compare this rank with its own figure.
    planned = dataclasses.replace(planned, gradients=zero_gradient_bytes(cfg, layout, world, args.rank))
    held, _ = activation_bytes(cfg, layout, tokens_of(cfg.model, latent), layout.activation_checkpointing)
    planned_act_per_token = held / local_tokens(cfg, latent)
    table, ok = compare(
        measured,
        planned,
        full_plan if args.num_layers is not None else None,
        act_per_token,
        planned_act_per_token,
        args.tolerance,
    )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(table)
    print(
        f"peak host memory of this process {peak_gb:.1f} GB; "
        f"{'agrees' if ok else 'DISAGREES'} with the planner within {args.tolerance:.0%} on {', '.join(CATEGORIES)}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "rank": args.rank,
                    "world": world,
                    "layout": dataclasses.asdict(layout),
                    "num_layers": cfg.model.num_layers,
                    "measured": measured,
                    "planned": {k: getattr(planned, k) for k in CATEGORIES},
                    "activation_bytes_per_token": {"measured": act_per_token, "planned": planned_act_per_token},
                    "peak_host_gb": peak_gb,
                },
                f,
                indent=2,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
