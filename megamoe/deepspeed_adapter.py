"""Every place megamoe reaches past DeepSpeed's public API, in one module.

megamoe uses DeepSpeed through `deepspeed.initialize`, the engine's `backward` / `step` and the
`deepspeed.utils.safe_get/set_full_*` fragment API. A few things it needs have no public API:
telling the engine that a model without DeepSpeed's MoE classes has experts, handing DeepSpeed
megatron-core's expert groups, re-linking ZeRO's fp32 fragments to Adam's state, and setting the
engine's step counters when megamoe (not DeepSpeed) restores a checkpoint. Each of those is one
small function here, saying what it relies on; nothing else in megamoe touches a private name of
DeepSpeed. tests/test_deepspeed_adapter.py checks each against the installed DeepSpeed and
fails if an upgrade changes one.

`TESTED_DEEPSPEED` is the range whose sources were read for every function below and whose
tests pass. Importing this module refuses an older DeepSpeed (0.17.0 and earlier lack the
expert-group rank tables `register_expert_groups` fills) and warns on a newer one.
"""

from __future__ import annotations

import importlib.metadata
import sys
import warnings

import torch

TESTED_DEEPSPEED = ("0.17.1", "0.19.8")
"""Oldest and newest DeepSpeed release megamoe is tested with (both ends included)."""


def check_deepspeed_version(installed: str | None = None) -> None:
    """Raise on a DeepSpeed older than `TESTED_DEEPSPEED`, warn on a newer one, in one line each.

    Older releases lack what this module relies on, so they fail; a newer one may well work, and
    this module's tests say whether it does. Pre-release and local builds count as their release.
    The version comes from the package metadata, so checking does not import DeepSpeed.
    """
    from packaging.version import Version

    if installed is None:
        try:
            installed = importlib.metadata.version("deepspeed")
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                "DeepSpeed is not installed; megamoe needs it: "
                f"pip install 'deepspeed>={TESTED_DEEPSPEED[0]},<={TESTED_DEEPSPEED[1]}'"
            ) from None
    low, high = TESTED_DEEPSPEED
    release = Version(installed).release
    if release < Version(low).release:
        raise ImportError(
            f"DeepSpeed {installed} is installed but megamoe is tested with {low} to {high} and relies "
            f"on internals older releases lack; pip install 'deepspeed>={low},<={high}'"
        )
    if release > Version(high).release:
        warnings.warn(
            f"DeepSpeed {installed} is newer than megamoe's tested range {low} to {high}; run "
            f"tests/test_deepspeed_adapter.py before training, or pip install 'deepspeed=={high}'",
            stacklevel=2,
        )


check_deepspeed_version()


# ---------------------------------------------------------------------------------------------
# The engine.


def build_expert_aware_engine(model, params, schedule, mpu, config: dict, num_experts: int):
    """A DeepSpeed engine that treats `model` as a MoE model although it has no DeepSpeed MoE layer.

    DeepSpeed switches on its expert handling (an optimizer param group per expert group, ZeRO
    partitions over the expert-data-parallel group, expert-aware gradient norms) only when
    `DeepSpeedEngine._configure_distributed_model(self, model)` finds its own `MoE` (or AutoEP)
    modules, by setting `engine.has_moe_layers` and `engine.num_experts`; `_configure_optimizer`
    reads them right after. megamoe's experts carry DeepSpeed's own tags instead (`allreduce=False`,
    `group_name`), and a subclass sets the two attributes after DeepSpeed's own method ran. There
    is no public switch (DeepSpeed 0.17.1 to 0.19.8), and `deepspeed.initialize` cannot construct a
    subclass, so the engine is constructed here as `deepspeed.initialize` does it, with the
    `config_class=DeepSpeedConfig(config, mpu)` it would pass. What else `deepspeed.initialize`
    does (tag parameters for Muon, switch off Python's GC) serves config options megamoe does not set.

    Fails if DeepSpeed did not put the expert parameters in a MoE param group, which is what
    happens if a DeepSpeed release renames the hook this overrides.
    """
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    class ExpertAwareEngine(DeepSpeedEngine):
        def _configure_distributed_model(self, module):
            super()._configure_distributed_model(module)
            self.has_moe_layers = True
            self.num_experts = [num_experts]

    engine = ExpertAwareEngine(
        args=None,
        model=model,
        optimizer=None,
        model_parameters=params,
        lr_scheduler=schedule,
        mpu=mpu,
        config=config,
        config_class=DeepSpeedConfig(config, mpu),
    )
    if not any(group.get("moe", False) for group in torch_optimizer(engine).param_groups):
        raise RuntimeError(
            f"DeepSpeed {importlib.metadata.version('deepspeed')} did not give the expert parameters "
            f"their own optimizer group; megamoe's engine hook no longer takes effect "
            f"(megamoe is tested with DeepSpeed {TESTED_DEEPSPEED[0]} to {TESTED_DEEPSPEED[1]})"
        )
    return engine


def import_muon_with_compile_deferred() -> None:
    """Import DeepSpeed's Muon optimizer now, with `torch.compile` deferred (megamoe/deferred_compile.py).

    The first `deepspeed.initialize` imports it to list the optimizers ZeRO supports
    (`deepspeed.runtime.zero.utils.is_zero_supported_optimizer`), and its kernels are decorated with
    `torch.compile` at import, which loads Inductor: about 1.4 s of CPU on every rank at every start
    for an optimizer megamoe never uses. Imported first here, the decorations only record what to
    compile. Releases without the module (or the import's other dependencies) are left as they are.
    """
    from megamoe.deferred_compile import compile_deferred

    with compile_deferred():
        try:
            import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
        except ImportError:
            pass


# ---------------------------------------------------------------------------------------------
# Expert groups: DeepSpeed's module-level tables in `deepspeed.utils.groups`.


def skip_shared_memory_all_reduce() -> None:
    """Tell DeepSpeed's communication backend not to build its CPU shared-memory all-reduce.

    On the CPU accelerator, `deepspeed.init_distributed` compiles a C++ extension
    (`deepspeed_shm_comm`) the first time it runs on a machine (30 to 60 s of both cores here, and
    again whenever its build hash changes) for `inference_all_reduce` alone, which megamoe never
    calls: its reductions go through torch.distributed. Relies on `deepspeed.comm.torch.build_shm_op`
    returning None for an op that `deepspeed.ops.__compatible_ops__` marks incompatible.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def register_expert_groups(name: str, ep_group, edp_group) -> None:
    """Make DeepSpeed use these expert-parallel and expert-data-parallel groups under `name`.

    ZeRO reduces and partitions parameters tagged `group_name=name` over
    `groups._get_expert_data_parallel_group(name)`, and DeepSpeed creates groups under a name only
    when it is absent from its tables. DeepSpeed has no public call to register groups that exist
    already (its own are built by its MoE layers from its own rank arithmetic), so megatron-core's
    are written into the four tables it reads, as its group builders write them: group and rank
    list, per name, for this rank (DeepSpeed 0.17.1 to 0.19.8; 0.17.0 and older have no rank
    tables). A name already registered is left as it is; `registered_expert_groups` says what it is.
    """
    from deepspeed.utils import groups

    if name in groups._get_expert_parallel_group_dict():
        return
    import torch.distributed as dist

    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp_group)


def registered_expert_groups(name: str) -> tuple:
    """(expert-parallel group, expert-data-parallel group) DeepSpeed uses under `name`.

    Read through the getters ZeRO and the engine call (`groups._get_expert_parallel_group(name)`,
    `_get_expert_data_parallel_group(name)`; DeepSpeed 0.17.1 to 0.19.8), so a check of these is a
    check of what DeepSpeed will reduce over.
    """
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def forget_expert_groups() -> None:
    """Drop the expert groups and the `mpu` DeepSpeed was lent, before the process groups are destroyed.

    They are megatron-core's groups: once destroyed, a DeepSpeed that kept them would hand a later
    engine in the same process (the in-process tests build several) dead groups. DeepSpeed 0.19.8's
    `deepspeed.comm.destroy_process_group()` clears these tables itself, but releases before it do
    not, and megamoe destroys the world through torch (megatron-core created it), so the tables are
    cleared here (DeepSpeed 0.17.1 to 0.19.8). Does nothing if DeepSpeed was never imported.
    """
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for table in (
        groups._EXPERT_PARALLEL_GROUP,
        groups._EXPERT_PARALLEL_GROUP_RANKS,
        groups._EXPERT_DATA_PARALLEL_GROUP,
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    ):
        table.clear()
    groups.mpu = None


# ---------------------------------------------------------------------------------------------
# Optimizer state.


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW that owns the state, inside DeepSpeed's ZeRO / bf16 wrapper if there is one.

    DeepSpeed's wrappers (ZeRO-1/2's `DeepSpeedZeroOptimizer`, `BF16_Optimizer`, `FP16_Optimizer`)
    keep the optimizer they wrap as `.optimizer`; without a wrapper (ZeRO-0, fp32) `engine.optimizer`
    is torch's own (DeepSpeed 0.17.1 to 0.19.8).
    """
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def has_fp32_fragments(param) -> bool:
    """Whether DeepSpeed keeps `param`'s fp32 master and Adam state as fragments of its flat partitions.

    ZeRO-1/2 and the bf16 optimizer link every parameter to its fragments (`link_hp_params` sets
    `param._hp_mapping`, None where this rank's partition holds none of it), and then the
    `safe_get/set_full_*` functions apply; without them (ZeRO-0, fp32) torch owns the state and
    those functions return None. This is the test they make themselves (DeepSpeed 0.17.1 to 0.19.8).
    """
    return hasattr(param, "_hp_mapping")


def relink_optimizer_state(engine) -> None:
    """Point DeepSpeed's per-parameter fragments at the Adam state torch holds now.

    The fragments reach exp_avg / exp_avg_sq through views DeepSpeed makes once, right after the
    first optimizer step (`_lazy_init_hp_params_optimizer_state`, guarded by the flag
    `_hp_optimizer_states_linked`). Two cases need it run again: state created before any step (a
    run about to resume), and several param groups, since ZeRO links every group right after
    stepping the first one, when the others (experts get their own group) have no state yet. The
    public `deepspeed.utils.lazy_init_hp_params_optimizer_state` takes the optimizer's private
    partition lists, so the optimizer's own method is called instead (DeepSpeed 0.17.1 to 0.19.8,
    ZeRO-1/2 and BF16_Optimizer). Does nothing for an optimizer without fragments.
    """
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def zero_gradient_partitions(engine) -> list[torch.Tensor]:
    """The reduced gradient partitions ZeRO-1/2 holds between backward and step (none without ZeRO).

    For measuring memory (launcher/rehearse.py): `DeepSpeedZeroOptimizer.averaged_gradients`,
    {param group: [tensors]} (DeepSpeed 0.17.1 to 0.19.8).
    """
    return [g for group in getattr(engine.optimizer, "averaged_gradients", {}).values() for g in group]


def fp32_master_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 master-weight partitions under ZeRO-1/2 (none without ZeRO).

    For measuring memory (launcher/rehearse.py): `DeepSpeedZeroOptimizer.single_partition_of_fp32_groups`
    (DeepSpeed 0.17.1 to 0.19.8).
    """
    return list(getattr(engine.optimizer, "single_partition_of_fp32_groups", []))


# ---------------------------------------------------------------------------------------------
# The engine's counters.


def skip_micro_step(engine) -> None:
    """Count the micro-step as `engine.step()` would, without stepping.

    The engine decides whether a micro-step ends a gradient-accumulation cycle (reduces gradients,
    steps the optimizer) from `engine.micro_steps`, which `step()` increments at its end:
    `is_gradient_accumulation_boundary()` is `(micro_steps + 1) % gradient_accumulation_steps == 0`.
    A micro-step megamoe leaves out of the step (ZeRO-0 with non-finite gradients) must still be
    counted, or every later boundary moves by one. Only the micro-step count changes: the step
    counters (`global_steps`, `skipped_steps`) stay, as they do for any step DeepSpeed does not
    take (DeepSpeed 0.17.1 to 0.19.8).
    """
    engine.micro_steps += 1


ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
"""The engine's step counters that DeepSpeed's own checkpoints save and restore."""


def engine_counters(engine) -> dict:
    """{global_steps, global_samples, skipped_steps}: what DeepSpeed's own checkpoint keeps of the engine.

    megamoe writes its own checkpoints (DeepSpeed's cannot change the layout), so it saves these
    itself; they are the engine attributes DeepSpeed's `save_checkpoint` saves (DeepSpeed 0.17.1 to 0.19.8).
    """
    return {name: getattr(engine, name) for name in ENGINE_COUNTERS}


def restore_engine_counters(engine, counters: dict) -> None:
    """Set the engine's step counters from `engine_counters`' dict, as DeepSpeed's `load_checkpoint` does.

    There is no public setter; DeepSpeed's own loader assigns the same attributes (DeepSpeed 0.17.1
    to 0.19.8). `micro_steps` is not restored, by DeepSpeed either: a checkpoint is taken between steps.
    """
    for name in ENGINE_COUNTERS:
        setattr(engine, name, counters[name])
