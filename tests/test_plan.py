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
from megamoe.config import load_config, validate
from megamoe.model.activation_checkpointing import SavedActivationMeter, apply_activation_checkpointing
from megamoe.model.dit import build_model
from megamoe.model.dit import count_parameters as model_parameters
from megamoe.moe.layer import moe_layers
from megamoe.plan import GB, Layout, count_parameters, make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The 5B configs and the cluster each is laid out for (their header comments say the same).
# configs/tiny_moe.yaml weights the token-choice losses; other routers do not compute them.
NO_TOKEN_CHOICE_LOSSES = ["model.moe.balance_loss=0", "model.moe.z_loss=0"]
PLANNED_NODES = {"configs/wan2.2_ti2v_5b_moe.yaml": 4, "configs/wan2.2_ti2v_5b_moe_cloned.yaml": 8}


def meta_counts(model_cfg):
    """(total, activated) of the model built on the meta device."""
    model = build_model(model_cfg, "meta")
    total = model_parameters(model)
    activated = total
    for layer in moe_layers(model):
        x = layer.experts
        one_expert = (x.w1.numel() + x.b1.numel() + x.w2.numel() + x.b2.numel()) // x.num_experts
        activated -= (x.num_experts - layer.cfg.top_k) * one_expert
    return total, activated


@pytest.mark.parametrize("path, overrides", [
    ("configs/tiny.yaml", []),
    ("configs/tiny_moe.yaml", []),
    ("configs/wan2.2_ti2v_5b.yaml", []),
    ("configs/wan2.2_ti2v_5b_moe.yaml", []),
    ("configs/wan2.2_ti2v_5b_moe_cloned.yaml", []),
    # every router family and the MoE options that change the parameter count
    ("configs/tiny_moe.yaml", ["model.moe.router=mlp", "model.moe.layers=every_other", "model.moe.num_null_experts=2"]),
    ("configs/tiny_moe.yaml", ["model.moe.router=cross_attention", "model.moe.router_hidden_dim=64",
                               "model.moe.layer_reg_loss=0.1", "model.moe.shared_ffn_dim=96"]),
    ("configs/tiny_moe.yaml", ["model.moe.router=promoe", "model.moe.num_prototypes_per_expert=3", "model.moe.layers=0,3",
                               *NO_TOKEN_CHOICE_LOSSES]),
    ("configs/tiny_moe.yaml", ["model.moe.router=expert_race", *NO_TOKEN_CHOICE_LOSSES, "model.moe.expert_ffn_dim=128",
                               "model.moe.top_k=3", "model.moe.num_shared_experts=2", "model.cross_attn_norm=false"]),
])
def test_parameter_counts_equal_the_meta_model(path, overrides):
    m = load_config(os.path.join(ROOT, path), overrides).model
    counts = count_parameters(m)
    assert (counts.total, counts.activated) == meta_counts(m)


def test_5b_figures():
    dense = count_parameters(load_config(os.path.join(ROOT, "configs/wan2.2_ti2v_5b.yaml")).model)
    fine = count_parameters(load_config(os.path.join(ROOT, "configs/wan2.2_ti2v_5b_moe.yaml")).model)
    assert dense.total == dense.activated and abs(dense.total / 1e9 - 5.0) < 0.01
    # Fine-grained upcycling keeps the activated FFN width (7 routed + 1 shared slices of 1792 = 14336).
    assert abs(fine.activated - dense.total) / dense.total < 0.001 and 13.2e9 < fine.total < 13.3e9


# ---------------------------------------------------------------- memory: weights, gradients, optimizer

ENGINE_BYTES = r"""
import json, sys, torch
from megamoe.config import load_config
from megamoe.model.dit import build_model
from megamoe.parallel.topology import init_distributed
from megamoe.train.engine import build_engine
cfg = load_config(sys.argv[1], sys.argv[2:])
init_distributed(cfg.parallel, torch.device("cpu"))
torch.manual_seed(0)
engine = build_engine(build_model(cfg.model), cfg)
m, dtype = cfg.model, (torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
x = torch.randn(2, m.in_channels, 5, 16, 16, dtype=dtype)
text = torch.randn(2, 8, m.text_dim, dtype=dtype)
seen = {}
def add(kind, tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            seen.setdefault(t.untyped_storage().data_ptr(), (kind, t.untyped_storage().nbytes()))
add("weights", engine.module.parameters())
engine.backward(engine(x, torch.rand(2) * 1000, text).float().square().mean())
# After backward, before the step: DeepSpeed's gradient buffers (the partition it reduces into).
add("gradients", [p.grad for p in engine.module.parameters()])
add("gradients", [g for group in engine.optimizer.averaged_gradients.values() for g in group])
engine.step()
# After the step: the fp32 master partition and Adam's moments.
add("optimizer", engine.optimizer.single_partition_of_fp32_groups)
add("optimizer", [v for s in engine.optimizer.optimizer.state.values() for v in s.values() if v.dim() > 0])
out = {}
for kind, n in seen.values():
    out[kind] = out.get(kind, 0) + n
print("BYTES " + json.dumps(out))
"""


@pytest.mark.parametrize("path, overrides", [
    ("configs/tiny.yaml", ["optim.zero_stage=1"]),
    ("configs/tiny_moe.yaml", ["optim.zero_stage=2", "train.precision=bf16"]),
])
def test_weights_gradients_optimizer_match_a_deepspeed_engine(path, overrides, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", ENGINE_BYTES, path, f"train.output_dir={tmp_path}", *overrides],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BYTES ")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    measured = json.loads(lines[-1][len("BYTES "):])
    plan = make_plan(load_config(os.path.join(ROOT, path), overrides), world=1)
    for kind, planned in (("weights", plan.weights), ("gradients", plan.gradients), ("optimizer", plan.optimizer)):
        assert abs(planned - measured[kind]) <= 0.2 * measured[kind], (kind, planned, measured[kind])


# ---------------------------------------------------------------- memory: activations

@pytest.mark.parametrize("path, overrides, latent", [
    ("configs/tiny.yaml", [], None),
    ("configs/tiny_moe.yaml", [], None),
    ("configs/tiny_moe.yaml", ["train.precision=bf16", "data.micro_batch_size=2", "model.moe.top_k=3"], (3, 8, 24)),
])
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
        model(torch.randn(b, m.in_channels, *plan.latent, dtype=dtype), torch.rand(b) * 1000,
              torch.randn(b, cfg.data.text_len, m.text_dim, dtype=dtype))
    assert abs(held - meter.bytes) <= 0.2 * meter.bytes, (held, meter.bytes)


def test_parallel_sizes_divide_what_they_should():
    cfg = load_config(os.path.join(ROOT, "configs/wan2.2_ti2v_5b_moe.yaml"))
    one = make_plan(cfg, 32, Layout(1, 1, 1, 1, "all"))
    split = make_plan(cfg, 32, Layout(2, 2, 8, 2, "all"))
    p = one.params
    dense = p.total - p.routed_experts
    assert one.weights == 2 * p.total
    assert split.weights == 2 * (dense - p.tensor_parallel / 2 + p.routed_experts / 8)
    # ZeRO-2 shards gradients and optimizer state over the 16 data x context ranks / the 4 expert-data ranks.
    local = (dense - p.tensor_parallel / 2) / 16 + p.routed_experts / 8 / 4
    assert split.gradients == pytest.approx(2 * local) and split.optimizer == pytest.approx(12 * local)
    # Sequence parallelism and CP split the tokens: activations shrink about 4x.
    assert 3.5 < one.activations_by_checkpointing["none"][0] / split.activations_by_checkpointing["none"][0] < 4.5
    assert one.all_to_all == 0 and split.all_to_all > 0


# ---------------------------------------------------------------- verdicts on the 5B configs

def test_every_config_in_configs_validates():
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        name = os.path.relpath(path, ROOT)
        validate(load_config(path), world_size=8 * PLANNED_NODES[name] if name in PLANNED_NODES else 2)


@pytest.mark.parametrize("path", sorted(PLANNED_NODES))
def test_planner_accepts_the_5b_configs_at_their_node_counts(path, capsys):
    assert main(["--config", os.path.join(ROOT, path), "--nodes", str(PLANNED_NODES[path]), "--gpus-per-node", "8"]) == 0
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
    assert main(["--config", path, "--nodes", "4", "data.path=/shards", "data.buckets=[]"]) == 2  # size unknown
    assert "data.buckets" in capsys.readouterr().err
    assert main(["--config", path, "--nodes", "4", "data.path=/shards", "data.buckets=[]", "--latent", "21,30,52"]) == 0
    assert "latent 21x30x52 -> 8190 tokens" in capsys.readouterr().out
    assert make_plan(load_config(path), 32).total / GB < 80
