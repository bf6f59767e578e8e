"""The seed study at toy scale: train a dense DiT, upcycle it into each routing configuration, train
each on the same batches and seeds, and write what the diagnostics found (docs/routing_study.md).

    python benchmarks/routing_study.py                 # the full study (about 40 min on 2 CPU cores)
    python benchmarks/routing_study.py --quick --out /tmp/study   # the smoke test's run (seconds)

The seed study upcycled a dense video DiT by three laws and saw linear routers homogenize, MLP
routers fall into selective deadlock (U-shaped over depth), cross-attention routers partly recover
and bf16 drop small router updates. This script asks the same questions of megamoe's own training
code in one process: `build_model` (dense), `upcycle_model` (the three laws), `parallelize` +
`build_engine` (DeepSpeed, ZeRO-0, fp32), the loop's `train_step` with the MoE `StepHooks`
(diagnostics every `diag_every` steps, routing traces), and `validation_loss` on the embedded data's
held-out split. The training loop itself (`train/loop.py`) reads its batches from a loader and
writes checkpoints; here every configuration must see the very same batches, so the batches are
read once and replayed, and the loop's per-step body (`train_step`) is called directly.

bf16 router masters. megamoe refuses to train with router masters in bf16 (diagnostics.py,
`check_router_precision`), so the run that shows what bf16 does simulates them: after every applied
step each router parameter is rounded to bf16, which is what a bf16 master would hold. The lost
updates are counted directly on that run (an element the optimizer moved whose stored value did not
change) and compared with the diagnostics' `bf16_lost_update_frac` in the smoke test.

Thresholds are the diagnostics' documented ones (`DiagnosticsThresholds()`), never changed here.
The report and plots are written by benchmarks/routing_study_report.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):  # megamoe, and routing_study_report next to this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from megamoe.config import (  # noqa: E402
    Config,
    DataConfig,
    DiffusionConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
)
from megamoe.train.step import StepHooks  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Scale:
    """The sizes of one study: model, steps, how often things are recorded."""

    dim: int
    num_layers: int
    ffn_dim: int
    num_experts: int
    dense_steps: int
    moe_steps: int
    diag_every: int
    val_every: int
    lr: float
    micro_batch_size: int = 8


FULL = Scale(
    dim=64,
    num_layers=8,
    ffn_dim=256,
    num_experts=8,
    dense_steps=600,
    moe_steps=200,
    diag_every=10,
    val_every=50,
    lr=1e-3,
    micro_batch_size=4,
)
LONG = Scale(
    dim=32,
    num_layers=4,
    ffn_dim=128,
    num_experts=4,
    dense_steps=300,
    moe_steps=2100,
    diag_every=50,
    val_every=300,
    lr=1e-3,
    micro_batch_size=4,
)
"""A smaller model trained past the homogenization alarm's grace period (2000 steps), which FULL does not reach."""
QUICK = Scale(
    dim=32,
    num_layers=4,
    ffn_dim=64,
    num_experts=4,
    dense_steps=30,
    moe_steps=45,
    diag_every=5,
    val_every=15,
    lr=3e-3,
    micro_batch_size=4,
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of the study: MoE keys over the base, and what it tests."""

    name: str
    what: str
    moe: dict = dataclasses.field(default_factory=dict)
    bf16_router_masters: bool = False
    """Round every router parameter to bf16 after each applied step (a simulated bf16 master)."""
    lr_scale: float = 1.0
    steps_scale: float = 1.0


BASE_MOE = dict(top_k=2, num_shared_experts=1, balance_loss=0.01, z_loss=0.001, shared_init="noise")
"""The seed study's upcycling at toy scale: cloned experts, top-2 renormalised, a tiny-noise shared expert."""
NO_AUX = dict(balance_loss=0.0, z_loss=0.0)

VARIANTS = [
    Variant("linear", "the study's linear router", dict(router="linear")),
    Variant("mlp", "the study's MLP router", dict(router="mlp")),
    Variant("cross_attention", "the study's cross-attention router", dict(router="cross_attention")),
    Variant("mlp_bf16", "MLP router, router masters rounded to bf16 after every step", dict(router="mlp"), True),
    Variant(
        "mlp_aux_free",
        "remedy: MLP + aux-loss-free bias",
        dict(router="mlp", bias_balancing=True, bias_update_rate=1e-3),
    ),
    Variant("mlp_balance_x10", "remedy: MLP + 10x balance loss (0.1)", dict(router="mlp", balance_loss=0.1)),
    Variant("expert_race", "remedy: Expert Race (MLP gate)", dict(router="expert_race", race_gate="mlp")),
    Variant("promoe", "remedy: ProMoE", dict(router="promoe", contrastive_loss=0.01)),
    Variant("selective_sinkhorn", "remedy: Selective Sinkhorn", dict(router="selective_sinkhorn")),
    Variant("diffmoe", "remedy: DiffMoE", dict(router="diffmoe")),
    Variant("mlp_shared_0", "MLP, shared expert starts at 0", dict(router="mlp", shared_init_std=0.0)),
    Variant("mlp_shared_1e-4", "MLP, shared expert starts at 1e-4 noise", dict(router="mlp", shared_init_std=1e-4)),
    Variant("mlp_shared_1e-2", "MLP, shared expert starts at 1e-2 noise", dict(router="mlp", shared_init_std=1e-2)),
]
"""The full study's configurations, all upcycled from the same dense checkpoint with the same seed."""

SEARCH = [
    Variant("mlp_lr_x10", "search: MLP at 10x learning rate", dict(router="mlp"), lr_scale=10.0),
    Variant("mlp_no_balance", "search: MLP without balance or z loss", dict(router="mlp", **NO_AUX)),
    Variant("linear_no_balance", "search: linear without balance or z loss", dict(router="linear", **NO_AUX)),
    Variant("mlp_no_shared", "search: MLP without a shared expert", dict(router="mlp", num_shared_experts=0)),
    Variant(
        "mlp_no_balance_shared_0",
        "search: mlp_no_balance, shared expert starts at 0",
        dict(router="mlp", **NO_AUX, shared_init_std=0.0),
    ),
    Variant(
        "mlp_no_balance_shared_1e-2",
        "search: mlp_no_balance, shared expert starts at 1e-2 noise",
        dict(router="mlp", **NO_AUX, shared_init_std=1e-2),
    ),
    Variant(
        "mlp_no_balance_aux_free",
        "remedy: mlp_no_balance + aux-loss-free bias",
        dict(router="mlp", **NO_AUX, bias_balancing=True, bias_update_rate=1e-3),
    ),
]
"""Conditions searched for failure modes that the base configurations do not show (the issue's point 4)."""

LONG_VARIANTS = [VARIANTS[0]]
"""The linear router on LONG: does the experts' output cosine stay above 0.99 after 2000 steps?"""

QUICK_VARIANTS = [
    VARIANTS[1],
    VARIANTS[3],
    Variant("mlp_no_balance", SEARCH[1].what + ", 10x LR", SEARCH[1].moe, lr_scale=10.0),
]
"""The smoke test's: MLP, its bf16-master twin, and an unbalanced high-LR MLP that deadlocks quickly."""


def base_config(scale: Scale, out: Path) -> Config:
    """The dense model's run config (fp32, ZeRO-0 so the module's parameters are the optimizer's masters)."""
    model = ModelConfig(
        dim=scale.dim,
        num_layers=scale.num_layers,
        num_heads=4,
        ffn_dim=scale.ffn_dim,
        in_channels=3,
        out_channels=3,
        text_dim=32,
        freq_dim=32,
        rope_max_seq_len=64,
    )
    return Config(
        model=model,
        data=DataConfig(micro_batch_size=scale.micro_batch_size, text_len=8, synthetic_frames=5, synthetic_size=16),
        diffusion=DiffusionConfig(timestep_sampling="logit_normal", shift=3.0, text_dropout=0.1),
        optim=OptimConfig(lr=scale.lr, warmup_steps=20, zero_stage=0),
        train=dataclasses.replace(Config().train, steps=scale.dense_steps, output_dir=str(out / "dense")),
        logging=LoggingConfig(val_batches=2, tensorboard=False),
    )


def moe_keys(variant: Variant, scale: Scale) -> dict:
    """The variant's `model.moe` keys: the base's, less those its router does not read (validation
    refuses a key a router ignores), the router's MLP width set to the model width where it has one."""
    from megamoe.moe.routers import ROUTERS

    keys = {**BASE_MOE, **variant.moe}
    reads = ROUTERS[keys.get("router", "linear")].config_keys
    router_keys = frozenset().union(*(r.config_keys for r in ROUTERS.values()))
    keys = {k: v for k, v in keys.items() if k in reads or k not in router_keys or k in variant.moe}
    if "router_hidden_dim" in reads:
        keys.setdefault("router_hidden_dim", scale.dim)
    return keys


def moe_config(base: Config, scale: Scale, variant: Variant, out: Path) -> Config:
    moe = MoEConfig(
        num_experts=scale.num_experts,
        diagnostics_every=scale.diag_every,
        trace_every=scale.val_every,
        trace_tokens=256,
        **moe_keys(variant, scale),
    )
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, moe=moe),
        optim=dataclasses.replace(base.optim, lr=base.optim.lr * variant.lr_scale),
        train=dataclasses.replace(
            base.train, steps=round(scale.moe_steps * variant.steps_scale), output_dir=str(out / "runs" / variant.name)
        ),
    )


def read_batches(cfg: Config, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `steps` training batches of the embedded data, read once so every run replays them."""
    from megamoe.data.loader import build_loader

    batches = []
    with build_loader(cfg, 0, 1) as loader:
        for _ in range(steps):
            batch = next(loader)
            batches.append((batch["latents"].float(), batch["text"].float()))
    return batches


def router_parameters(module: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """'<layer label>.<parameter>' -> (layer label, parameter) of every router parameter, labelled as
    the diagnostics label their layers ('layer03' is block 3)."""
    from megamoe.moe.routing_trace import moe_layer_labels

    return {
        f"{label}.{p}": (label, param)
        for label, layer in moe_layer_labels(module)
        for p, param in layer.router.named_parameters()
    }


class StudyHooks(StepHooks):
    """The MoE step hooks, plus a direct count of the router updates bf16 loses and, for the
    bf16-master run, the rounding of every router parameter to bf16 after each applied step.

    Per applied step it appends {layer label: [lost, changed]}: `changed` router elements the
    optimizer moved, `lost` of them whose bf16 value did not move. On the bf16-master run `lost`
    is read off the weights themselves: the stored (rounded) weight is what it was before the step."""

    def __init__(self, inner: StepHooks, module: torch.nn.Module, bf16_masters: bool):
        self.inner, self.bf16_masters = inner, bf16_masters
        self.params = router_parameters(module)
        self.before: dict[str, torch.Tensor] = {}
        self.counts: list[dict[str, list[int]]] = []
        if bf16_masters:
            self._round()  # the masters start as bf16 values too

    @torch.no_grad()
    def _round(self) -> None:
        for _, param in self.params.values():
            param.copy_(param.bfloat16().float())

    def before_forward(self, step: int, last: bool) -> None:
        self.inner.before_forward(step, last)

    def after_forward(self, step: int, last: bool) -> None:
        if last:  # the optimizer steps after the last micro-batch's backward
            self.before = {name: p.detach().clone() for name, (_, p) in self.params.items()}
        self.inner.after_forward(step, last)

    @torch.no_grad()
    def after_step(self, step: int):
        report = self.inner.after_step(step)  # the diagnostics measure the optimizer's own update
        moved = {name: param != self.before[name] for name, (_, param) in self.params.items()}
        if self.bf16_masters:
            self._round()
        counts: dict[str, list[int]] = {}
        for name, (label, param) in self.params.items():
            old = self.before[name]
            stayed = param == old if self.bf16_masters else param.bfloat16() == old.bfloat16()
            acc = counts.setdefault(label, [0, 0])
            acc[0] += int((moved[name] & stayed).sum())
            acc[1] += int(moved[name].sum())
        self.counts.append(counts)
        return report

    def after_skipped_step(self, step: int) -> None:
        self.inner.after_skipped_step(step)


def build_trainer(cfg: Config, model: torch.nn.Module):
    """The engine around `model`, as the training loop builds it (one process)."""
    from megamoe.parallel.parallelize import parallelize
    from megamoe.train.engine import build_engine

    parallelize(model, cfg.parallel)
    return build_engine(model, cfg)


def train(cfg: Config, engine, batches, hooks: StepHooks, held_out, val_every: int, on_report=None) -> dict:
    """Train `cfg.train.steps` steps on `batches` with the loop's `train_step`; returns the history:
    per step the flow loss, every `val_every` steps (and at the end) the validation loss, and the
    wall time of the training steps alone (validation excluded)."""
    from megamoe.config_checks import validate
    from megamoe.train.resilience import StepAgreement
    from megamoe.train.step import step_generator, train_step
    from megamoe.train.validation import validation_loss

    validate(cfg)
    agreement = StepAgreement(torch.device("cpu"), cfg.train.max_nonfinite_steps)
    history = {"flow": [], "val": [], "train_seconds": 0.0}
    engine.train()
    for step in range(1, cfg.train.steps + 1):
        latents, text = batches[(step - 1) % len(batches)]
        micro = iter([(latents, text, step_generator(cfg.train.seed, 0, step))])
        started = time.perf_counter()
        outcome = train_step(engine, cfg, step, micro, agreement, hooks)
        history["train_seconds"] += time.perf_counter() - started
        history["flow"].append(float(outcome.losses["flow"]))
        if outcome.report is not None and on_report is not None:
            on_report(outcome.report)
        if step % val_every == 0 or step == cfg.train.steps:
            history["val"].append((step, validation_loss(engine.module, held_out)["loss"]))
    return history


def run_variant(base: Config, scale: Scale, variant: Variant, dense_state: dict, batches, held_out, out: Path) -> dict:
    """Upcycle the dense weights into `variant` and train it; returns its record (JSON-able)."""
    from megamoe.moe.upcycle import upcycle_model
    from megamoe.train.moe_step_hooks import MoEStepHooks

    cfg = moe_config(base, scale, variant, out)
    torch.manual_seed(cfg.train.seed)
    model = upcycle_model(dense_state, cfg.model, "train", cfg.train.seed)
    engine = build_trainer(cfg, model)
    hooks = StudyHooks(MoEStepHooks(cfg, engine.module), engine.module, variant.bf16_router_masters)
    diagnostics = []

    def keep(report):
        diagnostics.append(
            {
                "step": report.step,
                "scalars": report.scalars,
                "load_matrix": report.load_matrix.tolist(),
                "depth_profile": report.depth_profile,
                "warnings": report.warnings,
                "layer_names": report.layer_names,
            }
        )

    history = train(cfg, engine, batches, hooks, held_out, scale.val_every, keep)
    return {
        "name": variant.name,
        "settings": settings(base, scale, variant, out),
        "what": variant.what,
        "moe": dataclasses.asdict(cfg.model.moe),
        "lr": cfg.optim.lr,
        "steps": cfg.train.steps,
        "bf16_router_masters": variant.bf16_router_masters,
        "history": history,
        "diagnostics": diagnostics,
        "lost_updates": hooks.counts,
        "trace_dir": str(Path(cfg.train.output_dir) / "routing_traces"),
    }


def run_dense(base: Config, batches, held_out) -> tuple[dict, dict]:
    """Train the dense model from scratch; returns (its fp32 state dict, its record)."""
    from megamoe.model.dit import build_model

    torch.manual_seed(base.train.seed)
    model = build_model(base.model)
    engine = build_trainer(base, model)
    history = train(base, engine, batches, StepHooks(), held_out, max(1, base.train.steps // 6))
    state = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    return state, {"name": "dense", "steps": base.train.steps, "history": history}


def world_of_one():
    """A one-process torch.distributed group, as a one-rank training run has."""
    from megamoe.parallel.topology import init_distributed

    if torch.distributed.is_initialized():
        return
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    return init_distributed(ParallelConfig(), torch.device("cpu"))


def settings(base: Config, scale: Scale, variant: Variant, out: Path) -> dict:
    """Everything a variant's run depends on besides the code, as JSON: equal settings, equal run."""
    cfg = moe_config(base, scale, variant, out)
    return json.loads(json.dumps({"config": dataclasses.asdict(cfg), "bf16": variant.bf16_router_masters}))


def previous_runs(out: Path, scale: Scale, base: Config) -> dict[str, dict]:
    """The runs of an earlier study in `out` at the same scale, by name, so that a rerun after adding
    configurations trains only those (each record carries its settings, compared before reuse)."""
    path = out / "study.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    same = old.get("scale") == json.loads(json.dumps(dataclasses.asdict(scale)))
    same &= old["model"] == json.loads(json.dumps(dataclasses.asdict(base.model)))
    return {r["name"]: r for r in old["runs"] if "settings" in r} if same else {}


def run_study(scale: Scale, variants: list[Variant], out: Path, log=print) -> dict:
    """Train the dense model, then every variant from it; writes and returns out/study.json."""
    from megamoe.train.validation import read_held_out

    out.mkdir(parents=True, exist_ok=True)
    base = base_config(scale, out)
    steps = max(scale.dense_steps, *(round(scale.moe_steps * v.steps_scale) for v in variants))
    batches = read_batches(base, steps)
    held_out = read_held_out(base)
    world_of_one()
    started = time.perf_counter()
    cache = out / "dense.pt"  # the dense run, kept so that a rerun of the variants starts from it
    key = json.dumps(dataclasses.asdict(base))  # the dense run's whole config
    saved = torch.load(cache, weights_only=False) if cache.exists() else None
    if saved is not None and saved["key"] == key:
        dense_state, dense = saved["state"], saved["record"]
        log("dense: reused " + str(cache))
    else:
        dense_state, dense = run_dense(base, batches, held_out)
        torch.save({"key": key, "state": dense_state, "record": dense}, cache)
    log(f"dense: {dense['history']['train_seconds']:.0f} s, val loss {dense['history']['val'][-1][1]:.4f}")
    done = previous_runs(out, scale, base)
    runs = []
    for variant in variants:
        record = done.get(variant.name)
        if record is None or record["settings"] != settings(base, scale, variant, out):
            record = run_variant(base, scale, variant, dense_state, batches, held_out, out)
        else:
            log(f"{variant.name}: reused from {out / 'study.json'} (same settings)")
        h = record["history"]
        alarms = sum(len(d["warnings"]) for d in record["diagnostics"])
        log(f"{variant.name}: {h['train_seconds']:.0f} s, val loss {h['val'][-1][1]:.4f}, {alarms} warning(s)")
        runs.append(record)
    study = {
        "scale": dataclasses.asdict(scale),
        "model": dataclasses.asdict(base.model),
        "dense": dense,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "study.json").write_text(json.dumps(study))
    return study


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, three configurations (smoke test)")
    parser.add_argument(
        "--out", default=None, help="where runs and the report go (default: outputs/routing_study[_quick])"
    )
    parser.add_argument(
        "--report",
        default=None,
        help="the report's path (default: docs/routing_study.md; quick: <out>/routing_study.md)",
    )
    parser.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine more threads spin)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from <out>/study.json, training nothing"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from routing_study_report import write_report

    scale = QUICK if args.quick else FULL
    variants = QUICK_VARIANTS if args.quick else VARIANTS + SEARCH
    if args.only:
        wanted = args.only.split(",")
        variants = [v for v in variants if v.name in wanted]
    out = Path(args.out or REPO / ("outputs/routing_study_quick" if args.quick else "outputs/routing_study"))
    report = Path(args.report or (out / "routing_study.md" if args.quick else REPO / "docs" / "routing_study.md"))
    command = "python benchmarks/routing_study.py" + (" --quick" if args.quick else "")
    log = lambda line: print(line, flush=True)  # noqa: E731
    with_long = not args.quick and not args.only
    if args.report_only:  # the report again, from the runs' records
        study = json.loads((out / "study.json").read_text())
        long = json.loads((out / "long" / "study.json").read_text()) if with_long else None
    else:
        study = run_study(scale, variants, out, log=log)
        long = None
        if with_long:
            log(f"long runs of a smaller model ({LONG.moe_steps} steps), past the homogenization grace period")
            long = run_study(LONG, LONG_VARIANTS, out / "long", log=log)
    mismatches = write_report(study, report, command, long)
    if mismatches:
        print("alarm check failed:\n" + "\n".join(mismatches))
        return 1
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
