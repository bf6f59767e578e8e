"""The MoE model trains end to end with every router, and upcycling preserves the dense model's loss."""

import json

import pytest

from megamoe.moe.routers import ROUTERS
from tests.distributed.launch_helpers import REPO, pretrain_in_process, read_metrics

TINY_MOE = str(REPO / "configs" / "tiny_moe.yaml")
SMALL = [
    "model.dim=64",
    "model.num_layers=2",
    "model.ffn_dim=256",
    "model.moe.num_experts=4",
    "data.micro_batch_size=4",
    "logging.every_steps=5",
    "optim.warmup_steps=5",
]

# tiny_moe.yaml weights the token-choice losses, which the other routers do not compute.
NO_TOKEN_CHOICE_LOSSES = ["model.moe.balance_loss=0", "model.moe.z_loss=0"]
ROUTER_SETTINGS = {
    "linear": [
        "model.moe.balance_loss=0.01",
        "model.moe.z_loss=0.001",
        *["model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.01"],  # ALF-LB's 1/t proportional update
        *["model.moe.bias_update_schedule=inverse_time", "model.moe.bias_update_form=proportional"],
    ],
    "mlp": ["model.moe.balance_loss=0.01", "model.moe.router_hidden_dim=32"],
    "cross_attention": ["model.moe.balance_loss=0.01", "model.moe.router_hidden_dim=32"],
    "expert_choice": ["model.moe.expert_choice_scope=batch", *NO_TOKEN_CHOICE_LOSSES],
    "expert_race": [
        "model.moe.similarity_loss=0.01",
        "model.moe.layer_reg_loss=0.1",
        *["model.moe.race_gate=mlp", "model.moe.router_hidden_dim=32"],
        *NO_TOKEN_CHOICE_LOSSES,
    ],
    "promoe": ["model.moe.contrastive_loss=0.01", "diffusion.text_dropout=0.3", *NO_TOKEN_CHOICE_LOSSES],
    "sinkhorn": NO_TOKEN_CHOICE_LOSSES,
    "diffmoe": ["model.moe.capacity_loss=0.01", "model.moe.router_hidden_dim=32", *NO_TOKEN_CHOICE_LOSSES],
    # Two bands of 2 experts, the linear router picking top-1 in each (it computes the balance and z losses).
    "timestep_band": [
        "model.moe.timestep_band_router=linear",
        "model.moe.timestep_band_boundaries=[500.0]",
        "model.moe.top_k=1",
    ],
    "selective_sinkhorn": ["model.moe.ssr_noise_std=1.0", *NO_TOKEN_CHOICE_LOSSES],
    "dynmole": ["model.moe.tsallis_loss=0.01", "model.moe.balance_loss=0.01", "model.moe.z_loss=0"],
}
assert sorted(ROUTER_SETTINGS) == sorted(ROUTERS)


def train_one_rank(args, output_dir):
    pretrain_in_process([*args, f"train.output_dir={output_dir}"])
    return [metrics for _, metrics in sorted(read_metrics(output_dir).items())]


@pytest.mark.parametrize("router", sorted(ROUTER_SETTINGS))
def test_every_router_trains_and_the_flow_loss_falls(router, tmp_path, data_cache):
    args = [
        "--config",
        TINY_MOE,
        f"data.cache_dir={data_cache}",
        "train.steps=40",
        f"model.moe.router={router}",
        "model.moe.diagnostics_every=20",
        *SMALL,
        *ROUTER_SETTINGS[router],
    ]
    metrics = train_one_rank(args, tmp_path)
    flow = [m["loss_flow"] for m in metrics]
    assert sum(flow[-2:]) / 2 < 0.8 * sum(flow[:2]) / 2, flow
    for setting in ROUTER_SETTINGS[router]:  # every enabled router loss is logged on its own
        key, value = setting.split("=")
        key = key.split(".")[-1]
        if key.endswith("_loss") and float(value) > 0:
            name = {
                "balance_loss": "balance",
                "z_loss": "z",
                "similarity_loss": "similarity",
                "capacity_loss": "capacity",
                "layer_reg_loss": "layer_reg",
                "contrastive_loss": "contrastive",
                "tsallis_loss": "tsallis",
            }[key]
            assert all(f"loss_{name}" in m for m in metrics), (name, metrics[-1])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert "moe/layer00/max_violation" in tags["scalars"] and tags["images"]
    if "model.moe.bias_balancing=true" in ROUTER_SETTINGS[router]:  # the aux-free update's balance and step size
        ratio = events.Scalars("moe/layer00/bias_max_over_mean_load")
        assert [e.step for e in ratio] == [20, 40] and all(e.value >= 1 for e in ratio)
        eta = [e.value for e in events.Scalars("moe/layer00/bias_step_size")]
        assert eta == pytest.approx([0.01 / 20, 0.01 / 40])
    steps = [e.step for e in events.Scalars("moe/layer01/load_entropy")]
    assert steps == [20, 40]
    summary = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in summary] == [20, 40]
    assert summary[-1]["scalars"]["moe/layer00/load_entropy"] == pytest.approx(
        events.Scalars("moe/layer00/load_entropy")[-1].value, rel=1e-6
    )


def test_null_experts_and_bias_balancing_train(tmp_path, data_cache):
    args = [
        "--config",
        TINY_MOE,
        f"data.cache_dir={data_cache}",
        "train.steps=40",
        "model.moe.num_null_experts=2",
        "model.moe.bias_balancing=true",
        "model.moe.score_func=sigmoid",
        "model.moe.balance_loss=0",
        *SMALL,
    ]
    flow = [m["loss_flow"] for m in train_one_rank(args, tmp_path)]
    assert sum(flow[-2:]) / 2 < 0.8 * sum(flow[:2]) / 2, flow


def test_moe_run_from_a_dense_checkpoint_starts_exactly_where_the_dense_model_is(tmp_path, data_cache):
    """One command from dense to MoE: `train.init_from` = the dense run's weights with the MoE config
    upcycles on the fly; in verify mode (cloned experts, zero shared experts, renormalised top-k)
    the MoE model's first-step loss is the dense model's."""
    dense_cfg = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"data.cache_dir={data_cache}",
        "model.dim=64",
        "model.num_layers=2",
        "model.ffn_dim=256",
        "data.micro_batch_size=4",
    ]
    train_one_rank(dense_cfg + ["train.steps=10", "logging.every_steps=1"], tmp_path / "dense")
    dense_weights = tmp_path / "dense" / "checkpoints" / "step_00000010" / "weights"

    moe_overrides = [
        "model.dim=64",
        "model.num_layers=2",
        "model.ffn_dim=256",
        "model.moe.num_experts=4",
        "model.moe.num_shared_experts=1",
        "model.moe.balance_loss=0",
        "model.moe.z_loss=0",
        "model.moe.shared_init=zero",
        "model.moe.diagnostics_every=0",
    ]
    common = [f"data.cache_dir={data_cache}", "train.steps=1", "logging.every_steps=1", "data.micro_batch_size=4"]
    dense_again = train_one_rank(dense_cfg + common + [f"train.init_from={dense_weights}"], tmp_path / "dense_again")
    moe = train_one_rank(
        ["--config", TINY_MOE, *moe_overrides, *common, f"train.init_from={dense_weights}"], tmp_path / "moe"
    )
    assert moe[0]["loss_flow"] == pytest.approx(dense_again[0]["loss"], rel=1e-5, abs=1e-6)
