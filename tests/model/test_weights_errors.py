"""Loading a checkpoint that does not fit fails with one line naming the key or path and the fix."""

import dataclasses
import json
import os

import pytest
import torch

from megamoe.config import ModelConfig
from megamoe.model.dit import WanDiT
from megamoe.model.weights import WeightsError, diffusers_config, load_diffusers_weights, save_diffusers_weights

CFG = ModelConfig(
    dim=24,
    num_layers=2,
    num_heads=2,
    ffn_dim=64,
    in_channels=4,
    out_channels=4,
    text_dim=8,
    freq_dim=8,
    rope_max_seq_len=16,
)


def load_error(model, source) -> str:
    with pytest.raises(WeightsError) as info:
        load_diffusers_weights(model, source)
    message = str(info.value)
    print(message)
    assert "\n" not in message
    return message


@pytest.fixture
def state():
    torch.manual_seed(0)
    return WanDiT(CFG).state_dict()


def test_missing_key(state):
    del state["blocks.1.attn2.to_k.bias"]
    assert "blocks.1.attn2.to_k.bias" in load_error(WanDiT(CFG), state)


def test_unexpected_key(state):
    state["blocks.0.attn2.norm_added_k.weight"] = torch.ones(24)
    assert "blocks.0.attn2.norm_added_k.weight" in load_error(WanDiT(CFG), state)


def test_unexpected_prefix_suggests_stripping(state):
    message = load_error(WanDiT(CFG), {"model." + k: v for k, v in state.items()})
    assert "model.blocks.0.attn1." in message and "prefix" in message


def test_shape_mismatch_names_key_and_field():
    small = WanDiT(dataclasses.replace(CFG, ffn_dim=32)).state_dict()
    message = load_error(WanDiT(CFG), small)
    assert "blocks.0.ffn.net.0.proj.weight of shape (32, 24)" in message
    assert "expects (64, 24)" in message and "model.ffn_dim=32" in message


def test_layer_count_mismatch_names_field():
    deeper = WanDiT(dataclasses.replace(CFG, num_layers=3)).state_dict()
    message = load_error(WanDiT(CFG), deeper)
    assert "blocks.2." in message and "model.num_layers=3" in message


def test_config_json_mismatch_names_field(tmp_path):
    # Same tensor shapes, different head count: only config.json can catch it.
    save_diffusers_weights(WanDiT(dataclasses.replace(CFG, num_heads=4)), tmp_path)
    message = load_error(WanDiT(CFG), tmp_path)
    assert "config.json" in message and "model.num_heads=4" in message


def test_nonexistent_path(tmp_path):
    path = str(tmp_path / "nope.safetensors")
    assert path in load_error(WanDiT(CFG), path)
    assert str(tmp_path / "nodir") in load_error(WanDiT(CFG), tmp_path / "nodir")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(diffusers_config(CFG)))
    assert str(tmp_path) in load_error(WanDiT(CFG), tmp_path)


def test_garbage_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(os.urandom(4096))
    assert str(path) in load_error(WanDiT(CFG), path)


def test_failed_load_leaves_model_untouched():
    model = WanDiT(CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = WanDiT(CFG).state_dict()
    del bad["proj_out.bias"]
    load_error(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_follow_the_umask(state, tmp_path, umask):
    """weights/ files get the mode of any new file (0644 under umask 022), like the rest of a checkpoint."""
    old = os.umask(umask)
    try:
        save_diffusers_weights(WanDiT(CFG), tmp_path / "weights")
        with open(tmp_path / "plain", "w"):  # the reference: a file made the ordinary way
            pass
    finally:
        os.umask(old)
    want = os.stat(tmp_path / "plain").st_mode & 0o777
    assert want == 0o666 & ~umask
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert os.stat(tmp_path / "weights" / name).st_mode & 0o777 == want, name


ROUTED = dataclasses.replace(CFG, num_layers=3)


def routed(lora=None, mod=None) -> ModelConfig:
    from megamoe.config import LoRAConfig, MixtureOfDepthsConfig

    return dataclasses.replace(ROUTED, lora=LoRAConfig(**(lora or {})), mod=MixtureOfDepthsConfig(**(mod or {})))


@pytest.mark.parametrize(
    "saved, loading, message",
    [
        (routed(lora={"num_experts": 4}), routed(), "has LoRA-Mixer adapters (model.lora.num_experts=4): set it, or "),
        (routed(lora={"num_experts": 4}), routed(lora={"num_experts": 2}), "have model.lora.num_experts=4: set that"),
        (routed(lora={"num_experts": 4}), routed(lora={"num_experts": 4, "rank": 2}), "have model.lora.rank=8: set"),
        (
            routed(lora={"num_experts": 4, "targets": ["q", "o"]}),
            routed(lora={"num_experts": 4}),
            "have model.lora.targets=[q,o]: set that",
        ),
        (routed(mod={"layers": "0,2"}), routed(), "has mixture-of-depths routers (model.mod.layers=0,2): set it"),
        (routed(mod={"layers": "0,2"}), routed(mod={"layers": "1"}), "have model.mod.layers=0,2: set that"),
        (
            routed(mod={"layers": "1", "router_features": ["position"]}),
            routed(mod={"layers": "1", "router_features": ["noise_level"]}),
            "have model.mod.router_features=[position]: set that",
        ),
        (
            routed(),
            routed(mod={"layers": "1"}),
            "has no mixture-of-depths routers: it is a base, which train.init_from",
        ),
    ],
)
def test_a_routing_mismatch_names_the_setting(tmp_path, saved, loading, message):
    """A checkpoint saved with other routing modules (LoRA-Mixer adapters, mixture-of-depths routers)
    than the model's: the message names the setting the checkpoint was saved with."""
    from megamoe.model.dit import build_model

    save_diffusers_weights(build_model(saved), str(tmp_path / "saved"))
    assert message in load_error(build_model(loading, initialize=False), str(tmp_path / "saved"))
