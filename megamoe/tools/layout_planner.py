"""The layout planner: parameters, bytes per GPU and expert all-to-all traffic of a config on a cluster.

    python launcher/plan.py --config configs/wan2.2_ti2v_5b_moe.yaml --nodes 4 --gpus-per-node 8

Everything is a closed form of the config, so it runs anywhere in a second, before a cluster is
booked. tests/tools/test_layout_planner.py checks the parameter counts against the model built on the
meta device, and the memory figures of the tiny configs against tensors measured on the CPU.

Parameters. `total` counts every parameter once; `activated` is what one token passes through:
the non-expert parameters, plus top_k routed experts in each MoE layer (shared experts are
non-expert parameters).

Bytes per GPU, for layout TP x CP x EP on W GPUs (data-parallel DP = W / (TP x CP)):
  weights     model dtype (2 bytes under train.precision=bf16, else 4). TP divides the TP-sharded
              parameters (attention q/k/v/out, the dense FFN and the shared experts); EP divides the
              routed experts (EP folds over all TP x CP x DP ranks: megatron-core's parallel folding).
  gradients   model dtype, as DeepSpeed keeps them. ZeRO-1 keeps every local gradient. ZeRO-2 keeps,
              per optimizer parameter group, the WHOLE gradient of every parameter that touches the
              rank's partition of the group's flat buffer (DeepSpeed 0.19's `grads_in_partition`,
              runtime/zero/stage_1_and_2.py): see `zero_gradient_bytes`; `Plan.gradients` is the
              worst rank.
  optimizer   fp32 master copy + Adam's two moments = 12 bytes per parameter (DeepSpeed keeps the
              fp32 copy under fp32 training too), sharded by ZeRO-1/2 over the DP x CP ranks for
              non-expert parameters and over the W / EP expert-data-parallel ranks for experts.
  activations what one micro-batch keeps for backward at the planned video size, per block kind,
              with constants measured by the saved-tensor hook on this code (model/activation_
              checkpointing.SavedActivationMeter); checkpointed blocks keep only their input, and the
              peak adds one block recomputed during backward. CP divides the sequence; with
              sequence parallelism TP divides it too, otherwise only the TP-sharded interiors.
  reserve     a fixed allowance for the CUDA context, NCCL buffers, DeepSpeed's reduce bucket and
              allocator fragmentation (--reserve-gb), added before comparing with the GPU memory.

All-to-all bytes per step and GPU: tokens x top_k x dim x bytes x 2 (dispatch and combine) x 2 (forward
and backward; 3 for checkpointed blocks, which dispatch again when recomputed) x MoE layers x the
fraction (EP - 1) / EP that leaves the rank under uniform routing, x grad_accum micro-batches (each
row's 4-byte fp32 routing weight is not counted). ZeRO comm per step and GPU: the gradient
reduce-scatter plus the all-gather of updated weights, 2 x bytes x (local parameters) x (n - 1) / n
over each parameter's sharding group: the traffic that expert parallelism trades against the
all-to-all (experts reduce over W / EP ranks only).

Planned video size: the largest data.buckets entry by tokens (pixel buckets of video shards go
through the VAE's 4x16x16 compression), else the synthetic clip size; --latent F,H,W overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from megamoe.config import Config, ConfigError, ModelConfig
from megamoe.config_checks import validate
from megamoe.data.buckets import shape_problem
from megamoe.model.activation_checkpointing import checkpointed_blocks
from megamoe.moe.layer import moe_layer_indices
from megamoe.tools.parameter_counts import ParameterCounts, config_parameter_counts

GB = 1e9
VAE_COMPRESSION = (4, 16)  # Wan2.2 VAE: (temporal, spatial); the loader's default
CHECKPOINTING = ("none", "every_2", "all")  # what the search tries
# DeepSpeed 0.19's ZeRO-1/2 layout (runtime/zero/stage_1_and_2.py, moe/utils.py): a group's flat
# buffer is padded to a multiple of nccl_start_alignment_factor (2) x its data-parallel size, and
# expert parameters are split into optimizer groups of at most `max_group_size` elements.
NCCL_START_ALIGNMENT = 2
MOE_MAX_GROUP_SIZE = 178956971


@dataclass(frozen=True)
class Layout:
    """One way to lay a config out on the GPUs."""

    tp: int = 1
    """parallel.tensor_parallel_size"""
    cp: int = 1
    """parallel.context_parallel_size"""
    ep: int = 1
    """parallel.expert_parallel_size"""
    zero_stage: int = 1
    """optim.zero_stage"""
    activation_checkpointing: str = "none"
    """train.activation_checkpointing"""
    sequence_parallel: bool = True
    """parallel.sequence_parallel (only matters when tp > 1)"""

    @classmethod
    def of(cls, cfg: Config) -> Layout:
        p = cfg.parallel
        return cls(
            p.tensor_parallel_size,
            p.context_parallel_size,
            p.expert_parallel_size,
            cfg.optim.zero_stage,
            cfg.train.activation_checkpointing,
            p.sequence_parallel,
        )

    def overrides(self) -> str:
        """The layout as the key=value overrides a launch takes."""
        return (
            f"parallel.tensor_parallel_size={self.tp} parallel.context_parallel_size={self.cp} "
            f"parallel.expert_parallel_size={self.ep} optim.zero_stage={self.zero_stage} "
            f"train.activation_checkpointing={self.activation_checkpointing}"
        )


@dataclass
class Plan:
    """What a config costs on one GPU of a layout; bytes unless said otherwise."""

    cfg: Config
    """The config planned for."""
    layout: Layout
    """The layout planned for."""
    world: int
    """Number of GPUs."""
    params: ParameterCounts
    """Parameter counts of the model."""
    latent: tuple
    """(F, H, W) latent video size planned for."""
    tokens_per_sample: int
    """Tokens of one sample at that size (after patchifying)."""
    weights: float
    """Model weights kept on one GPU, in the model dtype."""
    gradients: float
    """Gradients kept on one GPU (ZeRO-2: the whole parameters touching its partitions), worst rank."""
    optimizer: float
    """fp32 master weights and Adam moments kept on one GPU (ZeRO-1/2: its shard)."""
    activations: float
    """Peak activation bytes of the planned layout (held for backward + one recomputed block)."""
    activations_by_checkpointing: dict
    """'none' / the layout's setting / 'all' -> (held, peak) bytes, for comparison."""
    all_to_all: float
    """Expert dispatch and combine bytes one GPU sends per optimizer step."""
    gradient_traffic: float
    """ZeRO reduce-scatter of gradients + all-gather of updated weights, bytes per GPU per step."""
    reserve: float
    """Allowance for the CUDA context, NCCL, reduce buckets and fragmentation."""
    gpu_memory: float
    """Memory of one GPU."""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory


_PARAMETERS: dict[str, list] = {}


def parameter_shapes(m: ModelConfig) -> list[tuple[tuple, bool, int | None]]:
    """(shape, is a routed-expert parameter, dimension TP splits or None) of each trainable
    parameter of `WanDiT(m)`, in the model's order (the order DeepSpeed flattens them in).

    Read off the model built on the meta device, once per model config; which parameters TP
    splits comes from megamoe.parallel.tensor.tensor_parallel_dims.
    """
    key = repr(m)
    if key not in _PARAMETERS:
        from megamoe.model.dit import build_model
        from megamoe.moe.layer import moe_layers
        from megamoe.parallel.tensor import tensor_parallel_dims

        model = build_model(m, "meta")
        tp_dims = tensor_parallel_dims(model)
        experts = {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}
        _PARAMETERS[key] = [
            (tuple(p.shape), id(p) in experts, tp_dims.get(name))
            for name, p in model.named_parameters()
            if p.requires_grad
        ]
    return _PARAMETERS[key]


def optimizer_groups(cfg: Config, layout: Layout) -> list[tuple[tuple, bool]]:
    """(numel of each local parameter, in order; is an expert group) of each parameter group of
    DeepSpeed's optimizer on one rank.

    With EP > 1 megamoe's engine has DeepSpeed split the parameters the way
    `split_params_into_different_moe_groups_for_optimizer` does: the non-expert parameters, then
    the experts in chunks of at most MOE_MAX_GROUP_SIZE elements; with EP = 1 the experts are
    ordinary parameters and there is one group. TP splits its parameters, EP the expert dimension.
    """
    dense, experts = [], []
    for shape, expert, tp_dim in parameter_shapes(cfg.model):
        shape = list(shape)
        if expert and layout.ep > 1:
            shape[0] //= layout.ep
            experts.append(math.prod(shape))
            continue
        if tp_dim is not None:
            shape[tp_dim] //= layout.tp
        dense.append(math.prod(shape))
    chunks, size = [[]], 0
    for n in experts:
        if size + n > MOE_MAX_GROUP_SIZE:
            chunks.append([])
            size = 0
        chunks[-1].append(n)
        size += n
    groups = [(tuple(dense), False)] + [(tuple(c), True) for c in chunks]
    return [g for g in groups if g[0]]  # DeepSpeed drops empty groups


@functools.lru_cache(maxsize=256)
def _partition_gradient_numels(numels: tuple, partitions: int) -> tuple:
    """Per partition of one flat group: gradient elements ZeRO-2 keeps (`grads_in_partition`).

    The flat buffer is padded to a multiple of NCCL_START_ALIGNMENT x partitions and cut into
    equal partitions; a parameter belongs to every partition from the one holding its first
    element to the one holding its last, and each counts its whole numel (DeepSpeed's
    `get_partition_info`: a parameter starting inside the partition, or straddling its start).
    """
    align = NCCL_START_ALIGNMENT * partitions
    size = -(-sum(numels) // align) * align // partitions
    kept, start = [0] * partitions, 0
    for n in numels:
        for p in range(start // size, (start + max(n, 1) - 1) // size + 1):
            kept[p] += n
        start += n
    return tuple(kept)


def zero_gradient_bytes(cfg: Config, layout: Layout, world: int, rank: int) -> int:
    """Gradient bytes DeepSpeed's ZeRO optimizer holds on global rank `rank` of `world` GPUs.

    ZeRO-2: per optimizer group (`optimizer_groups`), the whole numel of each parameter touching
    the rank's partition, in the model dtype. Non-expert groups are partitioned over the
    data x context ranks (the rank's place there is rank // TP: megatron-core orders TP fastest,
    then CP, then DP), expert groups over the world / EP expert-data-parallel ranks (place
    rank // EP: experts fold over all ranks, EP fastest). ZeRO-0/1: every local gradient (plus
    DeepSpeed's fp32 copy under bf16 without ZeRO).
    """
    w_bytes = 2 if cfg.train.precision == "bf16" else 4
    groups = optimizer_groups(cfg, layout)
    if layout.zero_stage < 2:
        local = sum(sum(numels) for numels, _ in groups)
        return local * w_bytes + (local * 4 if layout.zero_stage == 0 and w_bytes == 2 else 0)
    kept = 0
    for numels, expert in groups:
        divisor = layout.ep if expert else layout.tp
        partitions, place = world // divisor, rank // divisor
        kept += _partition_gradient_numels(numels, partitions)[place]
    return kept * w_bytes


def planned_latent(cfg: Config) -> tuple:
    """(F, H, W) latent size to plan for: the data.buckets entry with the most tokens, else the synthetic clip."""
    from megamoe.data.buckets import latent_shape

    d = cfg.data
    if d.buckets:
        video = d.format == "video" and d.path is not None
        shapes = [latent_shape(tuple(b), video, VAE_COMPRESSION) for b in d.buckets]
        return max(shapes, key=math.prod)
    if d.path is not None:
        raise ConfigError(
            "data.buckets is empty, so the sample size of data.path is unknown before reading it; "
            "set data.buckets or pass --latent F,H,W to the planner"
        )
    return (d.synthetic_frames, d.synthetic_size, d.synthetic_size)


def parse_latent(text: str, m: ModelConfig) -> tuple:
    """'F,H,W' (latent units, as --latent takes it) -> (F, H, W): a whole number of patches
    (`model.patch_size`) in every axis, within `model.rope_max_seq_len` patches on each; ConfigError
    naming the option otherwise. `m` must have passed config_checks.validate."""
    try:
        latent = tuple(int(x) for x in text.split(","))
    except ValueError:
        latent = ()
    if len(latent) != 3 or min(latent) < 1:
        raise ConfigError(f"--latent '{text}' must be three positive ints F,H,W (latent units)")
    if any(n % p for n, p in zip(latent, m.patch_size)):
        fits = ",".join(str(-(-n // p) * p) for n, p in zip(latent, m.patch_size))
        raise ConfigError(
            f"--latent '{text}' is not a whole number of model.patch_size={list(m.patch_size)} patches; "
            f"e.g. --latent {fits}"
        )
    problem = shape_problem(latent, False, (1, 1), m.patch_size, 1, m.rope_max_seq_len)
    if problem:
        raise ConfigError(f"--latent '{text}' {problem}; give a smaller --latent")
    return latent


def tokens_of(m: ModelConfig, latent: tuple) -> int:
    return math.prod(n // p for n, p in zip(latent, m.patch_size))


# Bytes per token and model-width unit kept for backward, measured on this code with the saved-tensor
# hook (see the module docstring). A block's non-FFN part keeps 12 fp32 tensors [tokens, dim] (the
# fp32 norm inputs, modulations, q/k norm and RoPE inputs, the FFN output cast for the gated residual)
# and 9 in the model dtype (attention inputs and outputs); 6 fp32 + 6 model-dtype of them are inside
# the head-sharded attention, which TP splits even without sequence parallelism.
_FP32_SEQ, _ACT_SEQ, _FP32_TP, _ACT_TP = 6, 3, 6, 6


def activation_bytes(
    cfg: Config, layout: Layout, tokens_per_sample: int, checkpointing: str | None = None
) -> tuple[float, float]:
    """(held for backward, peak including one recomputed block) of one micro-batch on one GPU."""
    m, e = cfg.model, cfg.model.moe
    act = 2 if cfg.train.precision == "bf16" else 4
    d = m.dim
    tokens = cfg.data.micro_batch_size * tokens_per_sample / layout.cp
    seq = tokens / (layout.tp if layout.sequence_parallel else 1)  # tokens of the sequence-sharded parts
    interior = tokens / layout.tp  # tokens x TP-sharded width, per rank
    attention = seq * d * (4 * _FP32_SEQ + act * _ACT_SEQ) + interior * (
        d * (4 * _FP32_TP + act * _ACT_TP) + 8 * m.num_heads
    )

    def ffn_bytes(moe_block: bool) -> float:
        if not moe_block:
            return seq * d * act + interior * 2 * m.ffn_dim * act
        width = e.expert_ffn_dim or m.ffn_dim
        shared = e.num_shared_experts * (e.shared_ffn_dim or width)
        # The router keeps an fp32 copy of its input and ~5 fp32 [T, E] tensors; the fused experts keep the model-
        # dtype tokens (fp32: the router's input) and per (token, expert) its pre-activation and ~28 index bytes.
        columns = (e.merged_from or e.num_experts) + e.num_null_experts  # the router's, merged or not
        routed = seq * (4 * d + d * act * (act != 4) + 20 * columns + e.top_k * (width * act + 28))
        if layout.ep > 1:  # the experts' input is then the rows the all-to-all delivered (and their order)
            routed += seq * e.top_k * (d * act + 8)
        shared_bytes = interior * 2 * shared * act  # their input: the same tokens, counted above
        return routed + shared_bytes

    moe = moe_layer_indices(m)
    full = [attention + ffn_bytes(i in moe) for i in range(m.num_layers)]
    chosen = set(checkpointed_blocks(checkpointing or layout.activation_checkpointing, m.num_layers))
    held = sum(seq * d * act if i in chosen else full[i] for i in range(m.num_layers))
    held += seq * d * (8 + act)  # output head: fp32 norm input and modulation, proj_out input
    peak = held + (max(full[i] for i in chosen) if chosen else 0.0)
    return held, peak


def all_to_all_bytes(cfg: Config, layout: Layout, tokens_per_sample: int) -> float:
    """Expert-dispatch bytes one GPU sends per optimizer step (see the module docstring)."""
    m, e = cfg.model, cfg.model.moe
    if e.num_experts == 0 or layout.ep == 1:
        return 0.0
    act = 2 if cfg.train.precision == "bf16" else 4
    tokens = (
        cfg.data.micro_batch_size * tokens_per_sample / (layout.cp * (layout.tp if layout.sequence_parallel else 1))
    )
    chosen = set(checkpointed_blocks(layout.activation_checkpointing, m.num_layers))
    passes = sum(3 if i in chosen else 2 for i in moe_layer_indices(m))
    return tokens * e.top_k * m.dim * act * 2 * passes * (layout.ep - 1) / layout.ep * cfg.train.grad_accum


def with_layout(cfg: Config, layout: Layout) -> Config:
    """A copy of `cfg` set to `layout`."""
    parallel = dataclasses.replace(
        cfg.parallel,
        tensor_parallel_size=layout.tp,
        context_parallel_size=layout.cp,
        expert_parallel_size=layout.ep,
        sequence_parallel=layout.sequence_parallel,
    )
    return dataclasses.replace(
        cfg,
        parallel=parallel,
        optim=dataclasses.replace(cfg.optim, zero_stage=layout.zero_stage),
        train=dataclasses.replace(cfg.train, activation_checkpointing=layout.activation_checkpointing),
    )


def check_layout(cfg: Config, layout: Layout, world: int) -> str | None:
    """Why `layout` cannot run this config on `world` GPUs (config validation's message), or None."""
    try:
        validate(with_layout(cfg, layout), world_size=world)
    except ConfigError as exc:
        return str(exc)
    return None


def make_plan(
    cfg: Config,
    world: int,
    layout: Layout | None = None,
    gpu_memory_gb: float = 80.0,
    reserve_gb: float = 6.0,
    latent: tuple | None = None,
) -> Plan:
    layout = layout or Layout.of(cfg)
    problem = check_layout(cfg, layout, world)
    if problem:
        raise ConfigError(problem)
    m = cfg.model
    params = config_parameter_counts(m)
    latent = tuple(latent or planned_latent(cfg))
    tokens = tokens_of(m, latent)
    w_bytes = 2 if cfg.train.precision == "bf16" else 4
    dp = world // (layout.tp * layout.cp)
    dense = params.total - params.routed_experts
    dense_local = dense - params.tensor_parallel + params.tensor_parallel / layout.tp
    experts_local = params.routed_experts / layout.ep
    zero = layout.zero_stage
    shard_dense, shard_experts = (dp * layout.cp, world // layout.ep) if zero >= 1 else (1, 1)
    sharded = dense_local / shard_dense + experts_local / shard_experts
    optimizer = sharded * (12 if zero >= 1 or w_bytes == 2 else 8)
    # Ranks differ only by their place in the sharding groups; the worst one decides the fit.
    grads = max(zero_gradient_bytes(cfg, layout, world, r) for r in range(world if zero >= 2 else 1))
    by_ckpt = {
        spec: activation_bytes(cfg, layout, tokens, spec)
        for spec in dict.fromkeys(("none", layout.activation_checkpointing, "all"))
    }
    return Plan(
        cfg=cfg,
        layout=layout,
        world=world,
        params=params,
        latent=latent,
        tokens_per_sample=tokens,
        weights=(dense_local + experts_local) * w_bytes,
        gradients=grads,
        optimizer=optimizer,
        activations=by_ckpt[layout.activation_checkpointing][1],
        activations_by_checkpointing=by_ckpt,
        all_to_all=all_to_all_bytes(cfg, layout, tokens),
        reserve=reserve_gb * GB,
        gradient_traffic=2
        * w_bytes
        * (dense_local * (1 - 1 / (dp * layout.cp)) + experts_local * (1 - layout.ep / world)),
        gpu_memory=gpu_memory_gb * GB,
    )


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def search(cfg: Config, world: int, gpus_per_node: int, **kwargs) -> Plan | None:
    """The layout that fits with the least overhead, or None.

    Preference: fewest tensor x context ranks (their communication runs in every layer), then the
    least recomputation, then expert parallelism inside a node (NVLink all-to-all), then ZeRO-2
    before ZeRO-1 (DeepSpeed moves the same bytes for both, ZeRO-2 keeps fewer gradients), then
    the most memory left. TP stays inside a node.
    """
    experts = cfg.model.moe.num_experts
    best, best_key = None, None
    for tp in (t for t in _divisors(gpus_per_node) if world % t == 0):
        for cp in _divisors(world // tp):
            for ep in _divisors(world) if experts else [1]:
                for ac_rank, ac in enumerate(CHECKPOINTING):
                    for zero in (2, 1):
                        layout = Layout(tp, cp, ep, zero, ac, cfg.parallel.sequence_parallel)
                        if check_layout(cfg, layout, world) is not None:
                            continue
                        plan = make_plan(cfg, world, layout, **kwargs)
                        key = (tp * cp, ac_rank, ep > gpus_per_node, -zero, plan.total)
                        if plan.fits and (best_key is None or key < best_key):
                            best, best_key = plan, key
    return best


def _gb(x: float) -> str:
    return f"{x / GB:8.2f} GB"


def format_plan(plan: Plan, nodes: int, gpus_per_node: int) -> str:
    cfg, lay, p = plan.cfg, plan.layout, plan.params
    dp = plan.world // (lay.tp * lay.cp)
    lines = [
        f"cluster      {nodes} node(s) x {gpus_per_node} GPUs = {plan.world}, {plan.gpu_memory / GB:.0f} GB each",
        f"layout       tp {lay.tp} x cp {lay.cp} x dp {dp}, ep {lay.ep} (expert-data-parallel {plan.world // lay.ep}), "
        f"ZeRO-{lay.zero_stage}, activation checkpointing {lay.activation_checkpointing}, "
        f"sequence parallel {'on' if lay.sequence_parallel and lay.tp > 1 else 'off'}, {cfg.train.precision}",
        f"video        latent {'x'.join(map(str, plan.latent))} -> {plan.tokens_per_sample} tokens per sample, "
        f"micro batch {cfg.data.micro_batch_size}",
        f"parameters   total {p.total / 1e9:.3f}B, activated {p.activated / 1e9:.3f}B per token "
        f"(routed experts {p.routed_experts / 1e9:.3f}B)",
        "per GPU:",
        f"  weights      {_gb(plan.weights)}",
        f"  gradients    {_gb(plan.gradients)}",
        f"  optimizer    {_gb(plan.optimizer)}",
    ]
    for spec, (held, peak) in plan.activations_by_checkpointing.items():
        mark = "  <- planned" if spec == lay.activation_checkpointing else ""
        lines.append(f"  activations  {_gb(peak)}  checkpointing {spec:8s} (held {held / GB:.2f} GB){mark}")
    lines += [
        f"  reserve      {_gb(plan.reserve)}  (CUDA context, NCCL, reduce buckets, fragmentation)",
        f"  total        {_gb(plan.total)}  of {plan.gpu_memory / GB:.0f} GB: {'fits' if plan.fits else 'DOES NOT FIT'}",
        f"all-to-all   {plan.all_to_all / GB:.2f} GB sent per GPU per step (expert dispatch + combine, fwd + bwd)",
        f"ZeRO comm    {plan.gradient_traffic / GB:.2f} GB per GPU per step (gradient reduce-scatter + weight all-gather)",
    ]
    return "\n".join(lines)


def run(
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    gpu_memory_gb: float = 80.0,
    reserve_gb: float = 6.0,
    latent: tuple | None = None,
) -> tuple[int, str, str]:
    """(exit code, report for stdout, one-line verdict for stderr or ''); raises ConfigError on a bad config."""
    world = nodes * gpus_per_node
    validate(cfg, world_size=world)
    kwargs = dict(gpu_memory_gb=gpu_memory_gb, reserve_gb=reserve_gb, latent=latent)
    plan = make_plan(cfg, world, **kwargs)
    report = format_plan(plan, nodes, gpus_per_node)
    if plan.fits:
        return 0, report, ""
    better = search(cfg, world, gpus_per_node, **kwargs)
    need = f"layout needs {plan.total / GB:.1f} GB per GPU, more than the {gpu_memory_gb:g} GB of a GPU"
    if better is None:
        return 1, report, f"error: {need}, and no layout of {world} GPUs fits; use more nodes"
    return 1, report, (f"error: {need}; this layout fits ({better.total / GB:.1f} GB): {better.layout.overrides()}")
