"""Streaming `train.init_from` and the sharded weights export, at EP2, TP2 and TP2 x EP2 on 2 gloo ranks.

The source is a dense model written in bf16 as a sharded diffusers folder (index + 2 files).
Loaded into an MoE config (fine-grained experts: the 4 slices of each dense FFN, so every EP
rank's experts differ; a shared expert with noise), every rank reads only its blocks and
upcycles them; the full state dict gathered from every layout must equal, bit for bit, `launcher/upcycle.py --mode train` output at the same
seed loaded into a one-process model (the reference; the one-process `init_from` is checked
against it too). Each layout then writes the sharded export: it must hold exactly the reference
weights, load back in megamoe, and be refused by diffusers (an MoE model). A dense model at TP2
is exported as well, and diffusers' own `from_pretrained` must load it to the same weights.
Traffic: each rank sends at most its own shard, and all ranks together send exactly
sum over split tensors T of |T| (G_T - 1) / G_T.
"""

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from megamoe.config import ModelConfig, MoEConfig, ParallelConfig
from tests.distributed.launch_helpers import spawn

DENSE = ModelConfig(
    dim=32,
    num_layers=2,
    num_heads=4,
    ffn_dim=64,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=16,
    rope_max_seq_len=32,
)
MOE = dataclasses.replace(
    DENSE,
    moe=MoEConfig(
        num_experts=4,
        expert_ffn_dim=16,
        top_k=2,
        num_shared_experts=1,
        shared_init="noise",
        shared_init_std=0.05,
        diagnostics_every=0,
    ),
)
SEED = 7
LAYOUTS = {
    "ep2": dict(expert_parallel_size=2),
    "tp2": dict(tensor_parallel_size=2, sequence_parallel=True),
    "tp2_ep2": dict(tensor_parallel_size=2, expert_parallel_size=2, sequence_parallel=True),
}


def write_dense_source(directory) -> dict:
    """A random dense WanDiT as a bf16 diffusers folder sharded over two files; returns its tensors."""
    from megamoe.model.dit import WanDiT
    from megamoe.model.weights import INDEX_NAME, write_config

    torch.manual_seed(0)
    model = WanDiT(DENSE)
    state = {k: (v + 0.1 * torch.randn_like(v)).bfloat16() for k, v in model.state_dict().items()}
    keys = sorted(state)
    parts = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    directory.mkdir()
    for name, part in parts.items():
        save_file({k: state[k] for k in part}, str(directory / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}
    (directory / INDEX_NAME).write_text(json.dumps(index))
    write_config(DENSE, directory)
    return state


def _worker(rank, world, dense_dir, out_dir):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megamoe.model.dit import build_model
    from megamoe.parallel.parallelize import full_state_dict, parallelize
    from megamoe.parallel.sharded_weights import export_weights, init_from
    from megamoe.parallel.topology import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    results = {}
    for name, layout in [*LAYOUTS.items(), ("dense_tp2", LAYOUTS["tp2"])]:
        parallel = ParallelConfig(**layout)
        init_distributed(parallel, torch.device("cpu"))
        torch.manual_seed(100 + rank)  # a different random init on every rank: loading must overwrite it all
        model = parallelize(build_model(DENSE if name == "dense_tp2" else MOE), parallel)
        init_from(model, dense_dir, SEED)
        full = full_state_dict(model)
        stats = export_weights(model, f"{out_dir}/{name}")
        everyone = [None] * world
        dist.all_gather_object(
            everyone, {**stats, "shard_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}
        )
        if rank == 0:
            results[name] = {"state": {k: v.clone() for k, v in full.items()}, "traffic": everyone}
        parallel_state.destroy_model_parallel()
    if rank == 0:
        torch.save(results, f"{out_dir}/results.pt")
    destroy_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_weights")
    dense = write_dense_source(tmp / "dense")
    spawn(_worker, 2, str(tmp / "dense"), str(tmp))
    return tmp, dense, torch.load(tmp / "results.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory):
    """launcher/upcycle.py --mode train at the same seed, loaded into a one-process model."""
    from launcher.upcycle import main
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights

    tmp, _, _ = runs
    config = tmp / "moe.yaml"
    config.write_text(json.dumps({"model": dataclasses.asdict(MOE)}))  # JSON is YAML
    assert (
        main(
            [
                "--config",
                str(config),
                "--dense",
                str(tmp / "dense"),
                "--out",
                str(tmp / "upcycled"),
                "--mode",
                "train",
                "--seed",
                str(SEED),
            ]
        )
        == 0
    )
    model = build_model(MOE)
    load_diffusers_weights(model, tmp / "upcycled")
    return model.state_dict()


def assert_equal_states(got, want):
    assert got.keys() == want.keys()
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_streaming_upcycle_equals_upcycle_launcher(runs, reference, layout):
    assert_equal_states(runs[2][layout]["state"], reference)


def test_one_process_init_from_equals_upcycle_launcher(runs, reference):
    from megamoe.model.dit import build_model
    from megamoe.parallel.sharded_weights import init_from

    model = build_model(MOE)
    assert "upcycled" in init_from(model, runs[0] / "dense", SEED)
    assert_equal_states(model.state_dict(), reference)
    # Not trivially: the laws hold (expert 2 = hidden slice 2 of the dense FFN, b2 / 4) and the noise is there.
    dense = runs[1]
    w_in, w_out = dense["blocks.0.ffn.net.0.proj.weight"].float(), dense["blocks.0.ffn.net.2.weight"].float()
    assert torch.equal(reference["blocks.0.ffn.experts.w1"][2], w_in[32:48].t())
    assert torch.equal(reference["blocks.0.ffn.experts.w2"][2], w_out[:, 32:48].t())
    assert torch.equal(reference["blocks.0.ffn.experts.b2"][1], (dense["blocks.0.ffn.net.2.bias"] / 4).float())
    noise = reference["blocks.1.ffn.shared.net.2.weight"]
    assert noise.std().item() == pytest.approx(0.05, rel=0.15)
    other_seed = build_model(MOE)
    init_from(other_seed, runs[0] / "dense", SEED + 1)
    assert not torch.equal(
        other_seed.state_dict()["blocks.0.ffn.router.gate.weight"], reference["blocks.0.ffn.router.gate.weight"]
    )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_moe_export_is_sharded_loads_in_megamoe_and_diffusers_refuses_it(runs, reference, layout):
    from megamoe.model.dit import build_model
    from megamoe.model.weights import INDEX_NAME, load_diffusers_weights, read_state_dict

    export = runs[0] / layout
    files = json.loads((export / INDEX_NAME).read_text())["weight_map"]
    assert len(set(files.values())) == 2  # both ranks wrote a shard
    assert_equal_states(read_state_dict(export), reference)
    model = build_model(MOE)
    load_diffusers_weights(model, export)
    assert_equal_states(model.state_dict(), reference)

    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    with pytest.raises(ValueError, match="megamoe Mixture-of-Experts"):
        diffusers.WanTransformer3DModel.from_pretrained(export)


def test_dense_tp2_export_loads_in_diffusers(runs):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    tmp, dense, results = runs
    assert_equal_states(results["dense_tp2"]["state"], {k: v.float() for k, v in dense.items()})
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp / "dense_tp2").state_dict()
    assert_equal_states(loaded, {k: v.float() for k, v in dense.items()})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_rank_sends_its_share_not_the_model(runs, reference, layout):
    """Closed form of the traffic, from the full tensors: a tensor split over G ranks sends (G-1)/G of itself."""
    traffic = runs[2][layout]["traffic"]
    ep, tp = (2 if "ep2" in layout else 1), (2 if "tp2" in layout else 1)
    expected = 0
    for key, value in reference.items():
        tp_split = re.search(r"\.(to_[qkv]|norm_[qk]|net\.0\.proj)\.", key) or key.endswith(
            ("to_out.0.weight", "net.2.weight")
        )
        group = ep if ".ffn.experts." in key else tp if tp_split else 1
        expected += value.numel() * value.element_size() * (group - 1) // group
    print(layout, traffic)
    assert sum(t["sent_bytes"] for t in traffic) == expected
    assert all(t["sent_bytes"] <= t["shard_bytes"] for t in traffic)
    largest = max(v.numel() * v.element_size() for v in reference.values())
    assert all(t["largest_held_bytes"] <= largest for t in traffic)
    assert sum(t["written_bytes"] for t in traffic) == sum(v.numel() * v.element_size() for v in reference.values())
