"""The planner against the real thing: parameter counts of the model built on the meta device, memory
of a DeepSpeed engine and saved activations measured on the CPU, and its verdicts on the 5B configs."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from launcher.plan import main
from megamoe.config import load_config
from megamoe.config_checks import validate
from megamoe.model.activation_checkpointing import SavedActivationMeter, apply_activation_checkpointing
from megamoe.model.dit import build_model, count_parameters
from megamoe.moe.layer import moe_layers
from megamoe.tools.layout_planner import (
    GB,
    Layout,
    make_plan,
    optimizer_groups,
    zero_gradient_bytes,
)
from megamoe.tools.parameter_counts import config_parameter_counts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The 5B configs and the cluster each is laid out for (their header comments say the same).
# configs/tiny_moe.yaml weights the token-choice losses; other routers do not compute them.
NO_TOKEN_CHOICE_LOSSES = ["model.moe.balance_loss=0", "model.moe.z_loss=0"]
PLANNED_NODES = {"configs/wan2.2_ti2v_5b_moe.yaml": 4, "configs/wan2.2_ti2v_5b_moe_cloned.yaml": 8}


def meta_counts(model_cfg):
    """(total, activated) of the model built on the meta device."""
    model = build_model(model_cfg, "meta")
    total = count_parameters(model)
    activated = total
    for layer in moe_layers(model):
        x = layer.experts
        one_expert = (x.w1.numel() + x.b1.numel() + x.w2.numel() + x.b2.numel()) // x.num_experts
        activated -= (x.num_experts - layer.cfg.top_k) * one_expert
    return total, activated


@pytest.mark.parametrize(
    "path, overrides",
    [
        ("configs/tiny.yaml", []),
        ("configs/tiny_moe.yaml", []),
        ("configs/wan2.2_ti2v_5b.yaml", []),
        ("configs/wan2.2_ti2v_5b_moe.yaml", []),
        ("configs/wan2.2_ti2v_5b_moe_cloned.yaml", []),
        # every router family and the MoE options that change the parameter count
        (
            "configs/tiny_moe.yaml",
            ["model.moe.router=mlp", "model.moe.layers=every_other", "model.moe.num_null_experts=2"],
        ),
        (
            "configs/tiny_moe.yaml",
            [
                "model.moe.router=cross_attention",
                "model.moe.router_hidden_dim=64",
                "model.moe.layer_reg_loss=0.1",
                "model.moe.shared_ffn_dim=96",
            ],
        ),
        (
            "configs/tiny_moe.yaml",
            [
                "model.moe.router=promoe",
                "model.moe.num_prototypes_per_expert=3",
                "model.moe.layers=0,3",
                *NO_TOKEN_CHOICE_LOSSES,
            ],
        ),
        (
            "configs/tiny_moe.yaml",
            [
                "model.moe.router=expert_race",
                *NO_TOKEN_CHOICE_LOSSES,
                "model.moe.expert_ffn_dim=128",
                "model.moe.top_k=3",
                "model.moe.num_shared_experts=2",
                "model.cross_attn_norm=false",
            ],
        ),
    ],
)
def test_parameter_counts_equal_the_meta_model(path, overrides):
    m = load_config(os.path.join(ROOT, path), overrides).model
    counts = config_parameter_counts(m)
    assert (counts.total, counts.activated) == meta_counts(m)


def test_5b_figures():
    dense = config_parameter_counts(load_config(os.path.join(ROOT, "configs/wan2.2_ti2v_5b.yaml")).model)
    fine = config_parameter_counts(load_config(os.path.join(ROOT, "configs/wan2.2_ti2v_5b_moe.yaml")).model)
    assert dense.total == dense.activated and abs(dense.total / 1e9 - 5.0) < 0.01
    # Fine-grained upcycling keeps the activated FFN width (7 routed + 1 shared slices of 1792 = 14336).
    assert abs(fine.activated - dense.total) / dense.total < 0.001 and 13.2e9 < fine.total < 13.3e9


# ---------------------------------------------------------------- memory: weights, gradients, optimizer

ENGINE_BYTES = r"""
import json, os, sys, torch
import deepspeed.comm
import torch.distributed as dist
from megatron.core import parallel_state
from megamoe.config import load_config
from megamoe.deepspeed_adapter import fp32_master_partitions, torch_optimizer, zero_gradient_partitions
from megamoe.model.dit import build_model
from megamoe.parallel.parallelize import parallelize
from megamoe.parallel.topology import init_distributed
from megamoe.train.engine import build_engine

def play_rank(parallel, rank, world):
    # One process plays global rank `rank` of `world` GPUs: torch's fake process group accepts every
    # collective and moves no data, so which shards and ZeRO partitions the rank holds are real.
    from torch.testing._internal.distributed.fake_pg import FakeStore
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29500")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel_size, pipeline_model_parallel_size=1,
        context_parallel_size=parallel.context_parallel_size, expert_model_parallel_size=parallel.expert_parallel_size,
        expert_tensor_parallel_size=1, create_gloo_process_groups=False)

for case in json.loads(sys.argv[1]):
    cfg = load_config(case["path"], case["overrides"])
    if case["world"] == 1:
        init_distributed(cfg.parallel, torch.device("cpu"))
    else:
        play_rank(cfg.parallel, case["rank"], case["world"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if case["world"] > 1:
        parallelize(model, cfg.parallel)
    engine = build_engine(model, cfg)
    m, dtype = cfg.model, (torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
    x = torch.randn(2, m.in_channels, 5, 16, 16, dtype=dtype)
    text = torch.randn(2, 8, m.text_dim, dtype=dtype)
    seen = {}
    def add(kind, tensors):
        # Storages are held until the end, so that a freed gradient's address cannot come back as Adam state.
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                seen.setdefault(t.untyped_storage().data_ptr(), (kind, t.untyped_storage().nbytes(), t))
    add("weights", engine.module.parameters())
    engine.backward(engine(x, torch.rand(2) * 1000, text).float().square().mean())
    # After backward, before the step: the gradients DeepSpeed keeps (at an accumulation boundary the
    # partition it reduced into; before one, under ZeRO-1, every local gradient).
    add("gradients", [p.grad for p in engine.module.parameters()])
    add("gradients", [getattr(p, "grad_accum", None) for p in engine.module.parameters()])
    add("gradients", zero_gradient_partitions(engine))
    engine.step()
    # After the step: the fp32 master partition and Adam's moments.
    add("optimizer", fp32_master_partitions(engine))
    add("optimizer", [v for s in torch_optimizer(engine).state.values() for v in s.values() if v.dim() > 0])
    out = {}
    for kind, n, _ in seen.values():
        out[kind] = out.get(kind, 0) + n
    print("BYTES " + json.dumps(out), flush=True)
    del engine, model, seen
    parallel_state.destroy_model_parallel()
    deepspeed.comm.destroy_process_group()
"""


def engine_bytes(cases: list[dict], tmp_path) -> list[dict]:
    """{weights, gradients, optimizer: bytes} DeepSpeed holds for each case {path, overrides, world, rank},
    measured in one process (start-up dominates): world 1 for real, else as one rank on the fake process group."""
    cases = [dict(c, overrides=[*c["overrides"], f"train.output_dir={tmp_path}"]) for c in cases]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_BYTES, json.dumps(cases)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("BYTES ")]
    assert done.returncode == 0 and len(lines) == len(cases), done.stderr[-3000:]
    return [json.loads(line[len("BYTES ") :]) for line in lines]


@pytest.mark.slow
def test_weights_gradients_optimizer_match_a_deepspeed_engine(tmp_path):
    cases = [
        {"path": path, "overrides": [f"optim.zero_stage={zero}", *precision], "world": 1}
        for path, precision in (("configs/tiny.yaml", []), ("configs/tiny_moe.yaml", ["train.precision=bf16"]))
        for zero in (1, 2)
    ]
    for case, measured in zip(cases, engine_bytes(cases, tmp_path)):
        plan = make_plan(load_config(os.path.join(ROOT, case["path"]), case["overrides"]), world=1)
        for kind, planned, tolerance in (
            ("weights", plan.weights, 0.2),
            ("gradients", plan.gradients, 0.02),
            ("optimizer", plan.optimizer, 0.2),
        ):
            assert abs(planned - measured[kind]) <= tolerance * measured[kind], (case, kind, planned, measured[kind])


# EP=4 on 8 ranks: the non-expert group is partitioned over 8 data-parallel ranks (4 with TP=2), the
# experts over 2 expert-data-parallel ranks; ranks 0 and 7 hold the first and last partitions. ZeRO-1
# is measured between micro-batches (grad_accum 2), where it keeps every local gradient (at the
# boundary it reduces them into its partition, as ZeRO-2 does all along).
SHARDED = ["parallel.expert_parallel_size=4", "train.precision=bf16"]
RANKS = [
    (SHARDED + ["optim.zero_stage=2"], 0),
    (SHARDED + ["optim.zero_stage=2"], 7),
    (SHARDED + ["optim.zero_stage=2", "parallel.tensor_parallel_size=2"], 5),
    (SHARDED + ["optim.zero_stage=1", "train.grad_accum=2"], 6),
]


@pytest.mark.slow
def test_gradients_of_one_rank_match_deepspeed_on_the_fake_process_group(tmp_path):
    cases = [
        {"path": "configs/tiny_moe.yaml", "overrides": overrides, "world": 8, "rank": rank} for overrides, rank in RANKS
    ]
    for case, measured in zip(cases, engine_bytes(cases, tmp_path)):
        cfg = load_config(os.path.join(ROOT, case["path"]), case["overrides"])
        planned = zero_gradient_bytes(cfg, Layout.of(cfg), 8, case["rank"])
        # Exact up to a few bytes of storage rounding; numel / ranks alone is 1-2.5% off here.
        assert abs(planned - measured["gradients"]) <= 0.001 * measured["gradients"], (case, planned, measured)


def test_optimizer_groups_are_deepspeeds_for_the_5b_moe():
    """The planner's groups against DeepSpeed's own split of the local parameters (order, expert chunks
    of at most max_group_size elements), on the meta model as EP rank 0 of the config's EP=8 holds it."""
    from deepspeed.moe.utils import configure_moe_param_groups

    from megamoe.parallel.expert import shard_experts

    cfg = load_config(os.path.join(ROOT, "configs/wan2.2_ti2v_5b_moe.yaml"))
    ep = cfg.parallel.expert_parallel_size
    model = build_model(cfg.model, "meta")
    for layer in moe_layers(model):
        with torch.device("meta"):
            layer.experts = shard_experts(layer.experts, 0, ep)
        for param in layer.experts.parameters():  # DeepSpeed's expert tags, as apply_expert_parallel sets them
            param.allreduce, param.group_name = False, f"ep_size_{ep}"
    groups = configure_moe_param_groups([p for p in model.parameters() if p.requires_grad])
    ours = optimizer_groups(cfg, Layout.of(cfg))
    assert len(ours) > 2  # the experts span several groups
    assert ours == [(tuple(p.numel() for p in g["params"]), bool(g.get("moe"))) for g in groups if g["params"]]


# ---------------------------------------------------------------- memory: activations


@pytest.mark.parametrize(
    "path, overrides, latent",
    [
        ("configs/tiny.yaml", [], None),
        ("configs/tiny_moe.yaml", [], None),
        ("configs/tiny_moe.yaml", ["train.precision=bf16", "data.micro_batch_size=2", "model.moe.top_k=3"], (5, 8, 24)),
    ],
)
@pytest.mark.parametrize("spec", ["none", "every_2", "all"])
def test_activations_match_the_saved_tensors_of_a_forward(path, overrides, latent, spec):
    cfg = load_config(os.path.join(ROOT, path), [*overrides, f"train.activation_checkpointing={spec}"])
    plan = make_plan(cfg, world=1, latent=latent)
    held, _ = plan.activations_by_checkpointing[spec]
    m, dtype = cfg.model, (torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
    torch.manual_seed(0)
    model = build_model(m).to(dtype)
    apply_activation_checkpointing(model, spec)
    b = cfg.data.micro_batch_size
    with SavedActivationMeter(model) as meter:
        model(
            torch.randn(b, m.in_channels, *plan.latent, dtype=dtype),
            torch.rand(b) * 1000,
            torch.randn(b, cfg.data.text_len, m.text_dim, dtype=dtype),
        )
    assert abs(held - meter.bytes) <= 0.2 * meter.bytes, (held, meter.bytes)


def test_parallel_sizes_divide_what_they_should():
    cfg = load_config(os.path.join(ROOT, "configs/wan2.2_ti2v_5b_moe.yaml"))
    one = make_plan(cfg, 32, Layout(1, 1, 1, 1, "all"))
    split = make_plan(cfg, 32, Layout(2, 2, 8, 2, "all"))
    p = one.params
    dense = p.total - p.routed_experts
    assert one.weights == 2 * p.total
    assert split.weights == 2 * (dense - p.tensor_parallel / 2 + p.routed_experts / 8)
    # ZeRO-2 shards the optimizer state over the 16 data x context ranks / the 4 expert-data ranks; the
    # gradients it keeps are the whole parameters touching the rank's partitions, so at least that share
    # (the DeepSpeed engines above check the exact figure). ZeRO-1 keeps every gradient.
    local = (dense - p.tensor_parallel / 2) / 16 + p.routed_experts / 8 / 4
    assert split.optimizer == pytest.approx(12 * local) and split.gradients >= 2 * local
    assert one.gradients == 2 * p.total
    # Sequence parallelism and CP split the tokens: activations shrink about 4x (at equal EP, whose
    # experts keep the rows the all-to-all delivered).
    same_ep = make_plan(cfg, 32, Layout(1, 1, 8, 2, "all"))
    assert 3.5 < same_ep.activations_by_checkpointing["none"][0] / split.activations_by_checkpointing["none"][0] < 4.5
    assert one.all_to_all == 0 and split.all_to_all > 0


# ---------------------------------------------------------------- verdicts on the 5B configs


def test_every_config_in_configs_validates():
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        name = os.path.relpath(path, ROOT)
        validate(load_config(path), world_size=8 * PLANNED_NODES[name] if name in PLANNED_NODES else 2)


@pytest.mark.parametrize("path", sorted(PLANNED_NODES))
def test_planner_accepts_the_5b_configs_at_their_node_counts(path, capsys):
    assert (
        main(["--config", os.path.join(ROOT, path), "--nodes", str(PLANNED_NODES[path]), "--gpus-per-node", "8"]) == 0
    )
    out = capsys.readouterr()
    assert "fits" in out.out and out.err == ""


def test_refuses_a_layout_that_does_not_fit_and_suggests_one(capsys):
    path = os.path.join(ROOT, "configs/wan2.2_ti2v_5b_moe_cloned.yaml")
    # One node without activation checkpointing: ~300 GB of activations per GPU.
    assert main(["--config", path, "--nodes", "1", "train.activation_checkpointing=none"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "more than the 80 GB" in err
    suggestion = err.split("this layout fits")[1].split(": ", 1)[1].split()
    assert "train.activation_checkpointing=all" in suggestion
    # The suggestion, applied, is accepted.
    assert main(["--config", path, "--nodes", "1", *suggestion]) == 0
    assert "fits" in capsys.readouterr().out


def test_no_layout_fits_on_too_few_gpus(capsys):
    path = os.path.join(ROOT, "configs/wan2.2_ti2v_5b_moe_cloned.yaml")
    assert main(["--config", path, "--nodes", "1", "--gpus-per-node", "1", "parallel.expert_parallel_size=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no layout of 1 GPUs fits; use more nodes" in err


def test_bad_input_is_one_line(capsys):
    path = os.path.join(ROOT, "configs/wan2.2_ti2v_5b_moe.yaml")
    assert main(["--config", path, "--nodes", "3", "--gpus-per-node", "2"]) == 2  # EP=8 does not divide 6 GPUs
    assert "parallel.expert_parallel_size=8" in capsys.readouterr().err
    assert main(["--config", path, "--nodes", "4", "--latent", "31,44"]) == 2
    assert "--latent" in capsys.readouterr().err
    # tiny.yaml's tubelets span 5 frames: a 3-frame latent would be planned as 0 tokens.
    assert main(["--config", os.path.join(ROOT, "configs/tiny.yaml"), "--nodes", "1", "--latent", "3,16,17"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "e.g. --latent 5,16,18" in err, err
    tiny = os.path.join(ROOT, "configs/tiny.yaml")
    assert main(["--config", tiny, "--nodes", "1", "--latent", "5,640,640"]) == 2  # 320 patches a side
    assert "beyond model.rope_max_seq_len=64" in capsys.readouterr().err
    assert main(["--config", tiny, "--nodes", "1", "--latent", "5,16,16", "model.patch_size=[0,2,2]"]) == 2
    assert "model.patch_size must be three positive ints" in capsys.readouterr().err  # not a ZeroDivisionError
    assert main(["--config", path, "--nodes", "4", "data.path=/shards", "data.buckets=[]"]) == 2  # size unknown
    assert "data.buckets" in capsys.readouterr().err
    assert main(["--config", path, "--nodes", "4", "data.path=/shards", "data.buckets=[]", "--latent", "21,30,52"]) == 0
    assert "latent 21x30x52 -> 8190 tokens" in capsys.readouterr().out
    assert make_plan(load_config(path), 32).total / GB < 80
