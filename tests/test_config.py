"""Bad configs fail before start-up with one line that names the key, and exit code 2."""

import dataclasses
import math
import os

import pytest

from launcher.pretrain import main
from megamoe.config import Config, ConfigError, from_yaml_text, load_config, merge_config, to_yaml
from megamoe.config_checks import validate

TINY = "configs/tiny.yaml"
WAN_PATCH = "model.patch_size=[1,2,2]"
"""Wan's patch, in place of tiny.yaml's 5x2x2 tubelets: the token-count cases below are written for it."""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_yaml_and_overrides_merge_onto_defaults():
    cfg = load_config(TINY, ["model.num_layers=4", "optim.betas=[0.8,0.9]", "data.path=/x"])
    assert cfg.model.num_layers == 4 and cfg.model.dim == 128  # override and YAML
    assert cfg.optim.betas == [0.8, 0.9] and cfg.data.path == "/x"
    assert cfg.train.grad_accum == Config().train.grad_accum  # default kept
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_every_shipped_config_validates():
    for path, world in [
        ("configs/tiny.yaml", 2),
        ("configs/wan2.2_ti2v_5b.yaml", 64),
        ("configs/tiny_moe.yaml", 2),
        ("configs/wan2.2_ti2v_5b_moe.yaml", 64),
    ]:
        validate(load_config(path), world_size=world)


@pytest.mark.parametrize(
    "overrides, key_in_message",
    [
        (["model.hidden=3"], "model.hidden"),
        (["modle.dim=3"], "modle.dim"),
        (["model.dim=wide"], "model.dim"),
        (["train.steps=1.5"], "train.steps"),
        (["model.num_heads=5"], "model.num_heads"),
        (["model.num_heads=32"], "model.num_heads"),  # head dim 2 cannot hold 3D RoPE
        (["train.precision=fp16"], "train.precision"),
        (["optim.zero_stage=3"], "optim.zero_stage"),
        (["train.precision=bf16", "optim.zero_stage=0"], "optim.zero_stage=0 cannot save its optimizer state"),
        (["diffusion.timestep_sampling=cosine"], "diffusion.timestep_sampling"),
        (["data.synthetic_size=15"], "data.synthetic_size"),
        (["parallel.tensor_parallel_size=2"], "parallel.tensor_parallel_size"),
        (["parallel.expert_parallel_size=2"], "parallel.expert_parallel_size"),
        (["parallel.expert_parallel_size=0"], "parallel.expert_parallel_size"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["model.num_layers"], "model.num_layers"),
        (["model.moe.num_experts=4", "model.moe.router=topk"], "model.moe.router"),
        (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k"),
        (["model.moe.num_experts=4", "model.moe.layers=0,9"], "model.moe.layers"),
        (["model.moe.num_experts=4", "model.moe.score_func=relu"], "model.moe.score_func"),
        (["model.moe.num_experts=4", "model.moe.balance_loss=-1"], "model.moe.balance_loss"),
        (["model.moe.num_experts=4", "model.moe.expert_choice_scope=global"], "model.moe.expert_choice_scope"),
        (["model.moe.experts=4"], "model.moe.experts"),
        (["model.moe.num_experts=4", "model.moe.router=sinkhorn", "model.moe.num_null_experts=1"], "num_null_experts"),
        (
            ["model.moe.num_experts=4", "model.moe.router=expert_race", "model.moe.bias_balancing=true"],
            "bias_balancing",
        ),
        (["model.moe.num_experts=4", "model.moe.router=promoe", "model.moe.top_k=4"], "promoe"),
        (["model.block_router.enabled=true"], "pretraining cannot train block routers"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, key_in_message, capsys, tmp_path):
    code = main(["--config", TINY, f"train.output_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert key_in_message in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_experts_not_divisible_by_expert_parallel_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["--config", "configs/tiny_moe.yaml", "parallel.expert_parallel_size=4", "model.moe.num_experts=6"])
    err = capsys.readouterr().err
    assert code == 2 and "model.moe.num_experts=6 is not divisible by parallel.expert_parallel_size=4" in err
    monkeypatch.setenv("WORLD_SIZE", "6")
    assert main(["--config", "configs/tiny_moe.yaml", "parallel.expert_parallel_size=4"]) == 2
    assert "world size 6 is not divisible by parallel.expert_parallel_size=4" in capsys.readouterr().err


def test_world_size_not_divisible_by_parallel_sizes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code = main(["--config", TINY, "parallel.tensor_parallel_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and "world size 3 is not divisible" in err and "parallel" in err


def test_missing_and_malformed_config_files(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert main(["--config", str(scalar)]) == 2
    assert "mapping" in capsys.readouterr().err


def test_validate_raises_config_error_directly():
    with pytest.raises(ConfigError, match="model.num_heads=7 does not divide model.dim=64"):
        validate(merge_config({"model": {"dim": 64, "num_heads": 7}}))


CENTERED = "model.moe.bias_update_centered"
ALF = ["model.moe.num_experts=4", "model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.01"]


@pytest.mark.parametrize("value", ["2", "1", "0", "yes", "on", "off", "y", "'true'", "null"])
def test_bool_keys_refuse_anything_but_true_or_false(value):
    """OmegaConf alone reads 2, 1, yes, on and y as true; a bool key takes true or false only."""
    shown = {"null": "None", "'true'": "'true'"}.get(value, value if value.isdigit() else f"'{value}'")
    with pytest.raises(ConfigError) as info:
        merge_config(None, [*ALF, f"{CENTERED}={value}"])
    assert str(info.value) == f"bad value for '{CENTERED}': {shown} is not a boolean; write true or false"


def test_bool_key_with_a_number_stops_the_launcher(capsys, tmp_path):
    code = main(["--config", TINY, f"train.output_dir={tmp_path}", "train.steps=1", *ALF, f"{CENTERED}=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: bad value for '{CENTERED}': 2 is not a boolean; write true or false"
    assert not any(tmp_path.iterdir())


def test_bool_keys_accept_true_and_false_from_overrides_and_files(tmp_path):
    for text, expected in [("true", True), ("false", False), ("True", True), ("FALSE", False)]:
        assert merge_config(None, [*ALF, f"{CENTERED}={text}"]).model.moe.bias_update_centered is expected
        config = tmp_path / f"{text}.yaml"
        config.write_text(f"model:\n  moe:\n    bias_update_centered: {text}\n")
        assert load_config(str(config)).model.moe.bias_update_centered is expected


def test_bool_keys_refuse_yes_and_numbers_in_files_and_section_overrides(tmp_path):
    """A YAML file reads booleans as YAML 1.2 does (true/false): `yes` is a string there, not true."""
    for text, shown in [("yes", "'yes'"), ("on", "'on'"), ("2", "2")]:
        config = tmp_path / "bad.yaml"
        config.write_text(f"logging:\n  tensorboard: {text}\n")
        with pytest.raises(ConfigError) as info:
            load_config(str(config))
        assert str(info.value) == f"bad value for 'logging.tensorboard': {shown} is not a boolean; write true or false"
    with pytest.raises(ConfigError, match=f"bad value for '{CENTERED}': 'yes' is not a boolean"):
        merge_config(None, ["model.moe={bias_update_centered: yes}"])
    with pytest.raises(ConfigError, match="bad value for 'parallel.sequence_parallel': 1 is not a boolean"):
        merge_config({"parallel": {"sequence_parallel": 1}})


@pytest.mark.parametrize(
    "world, overrides, message",
    [
        (
            8,
            ["parallel.tensor_parallel_size=2", "parallel.context_parallel_size=4"],
            "model.num_heads=4 is not divisible by parallel.tensor_parallel_size x parallel.context_parallel_size = 8",
        ),
        (
            2,
            ["parallel.tensor_parallel_size=2", "model.ffn_dim=513"],
            "model.ffn_dim=513 is not divisible by parallel.tensor_parallel_size=2",
        ),
        (
            2,
            ["parallel.tensor_parallel_size=2", "model.moe.num_experts=4", "parallel.sequence_parallel=false"],
            "needs parallel.sequence_parallel=true",
        ),
        (
            2,
            ["parallel.context_parallel_size=2", "data.synthetic_size=6"],
            "data.synthetic_frames/data.synthetic_size gives 45 tokens per sample, not divisible by "
            "parallel.context_parallel_size = 2",
        ),
        (
            4,
            [
                "parallel.tensor_parallel_size=2",
                "parallel.context_parallel_size=2",
                "data.synthetic_size=6",
                "data.synthetic_frames=2",
            ],
            "gives 18 tokens per sample, not divisible by parallel.context_parallel_size x "
            "parallel.tensor_parallel_size (sequence parallel) = 4",
        ),
        (
            2,
            ["parallel.context_parallel_size=2", "data.path=/shards", "data.buckets=[[4,8,8],[5,6,6]]"],
            "data.buckets entry [5, 6, 6] gives 45 tokens per sample",
        ),
        (
            2,
            ["parallel.expert_parallel_size=2", "model.moe.num_experts=4", "optim.zero_stage=0"],
            "optim.zero_stage=0 with parallel.expert_parallel_size > 1 clips by a wrong gradient norm",
        ),
    ],
)
def test_model_parallel_layout_errors(world, overrides, message, monkeypatch, capsys, tmp_path):
    """Each bad tensor/context-parallel layout is one line naming the key, before any process group."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(["--config", TINY, f"train.output_dir={tmp_path}", WAN_PATCH, *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_model_parallel_layouts_that_divide_validate():
    validate(load_config(TINY, ["parallel.tensor_parallel_size=2", "parallel.context_parallel_size=2"]), world_size=8)
    validate(
        load_config("configs/tiny_moe.yaml", ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=4"]),
        world_size=4,
    )
    # EMA is kept per shard under every layout (tests/distributed/test_parallel_training.py)
    validate(
        load_config(
            "configs/tiny_moe.yaml",
            [
                "parallel.tensor_parallel_size=2",
                "parallel.expert_parallel_size=2",
                "parallel.context_parallel_size=2",
                "train.ema_decay=0.99",
            ],
        ),
        world_size=8,
    )
    # Without sequence parallelism a dense model's tokens are split by CP only (45 tokens under TP=2 is fine).
    validate(
        load_config(
            TINY,
            [WAN_PATCH, "parallel.tensor_parallel_size=2", "parallel.sequence_parallel=false", "data.synthetic_size=6"],
        ),
        world_size=2,
    )


# ---------------------------------------------------------------- one source of truth for config rules


def moe_config(**moe):
    """A tiny config with an MoE model; `moe` entries set model.moe keys."""
    return merge_config(
        {
            "model": {
                "dim": 32,
                "num_heads": 2,
                "num_layers": 2,
                "ffn_dim": 64,
                "moe": {"num_experts": 4, "top_k": 2, **moe},
            }
        }
    )


def refusal(cfg, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


# (router, the setting it does not read): each is refused, not accepted and ignored.
UNREAD = [
    ("sinkhorn", "z_loss", 0.1),
    ("sinkhorn", "balance_loss", 0.1),
    ("expert_race", "balance_loss", 0.1),
    ("expert_race", "z_loss", 0.1),
    ("expert_choice", "balance_loss", 0.1),
    ("expert_choice", "z_loss", 0.1),
    ("promoe", "z_loss", 0.1),
    ("promoe", "similarity_loss", 0.1),
    ("linear", "similarity_loss", 0.1),
    ("mlp", "contrastive_loss", 0.1),
    ("linear", "contrastive_loss", 0.1),
    ("cross_attention", "contrastive_loss", 0.1),
    ("expert_choice", "contrastive_loss", 0.1),
    ("expert_race", "contrastive_loss", 0.1),
    ("sinkhorn", "contrastive_loss", 0.1),
    ("expert_choice", "score_func", "sigmoid"),
    ("expert_race", "score_func", "sigmoid"),
    ("promoe", "score_func", "sigmoid"),
    ("expert_choice", "renormalize", False),
    ("expert_race", "renormalize", False),
    ("linear", "router_hidden_dim", 64),
    ("sinkhorn", "router_hidden_dim", 64),
    ("linear", "capacity_factor", 2.0),
    ("linear", "expert_choice_scope", "batch"),
    ("linear", "race_threshold_decay", 0.5),
    ("linear", "sinkhorn_iterations", 5),
    ("linear", "num_prototypes_per_expert", 2),
    ("sinkhorn", "bias_balancing", True),
    ("expert_choice", "num_null_experts", 1),
]


@pytest.mark.parametrize("router, key, value", UNREAD)
def test_a_setting_the_router_does_not_read_is_refused(router, key, value):
    from megamoe.moe.routers import build_router

    cfg = moe_config(router=router, **{key: value})
    message = refusal(cfg)
    assert f"model.moe.{key}=" in message and router in message, message
    with pytest.raises(ConfigError) as info:  # the constructor runs the same check
        build_router(8, cfg.model.moe, layer_reg_out_dim=4)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "cfg, key",
    [
        (moe_config(bias_update_rate=0.01), "model.moe.bias_update_rate"),  # without bias_balancing
        (moe_config(balance_scope="sequence"), "model.moe.balance_scope"),  # without balance_loss
        (moe_config(shared_ffn_dim=32), "model.moe.shared_ffn_dim"),  # without shared experts
        (moe_config(num_experts=0, router="expert_race"), "model.moe.router"),  # dense model
        (moe_config(num_experts=0, balance_loss=0.1), "model.moe.balance_loss"),
        (moe_config(num_experts=0, layers="0,x"), "model.moe.layers"),  # a typo is caught on a dense model too
        (
            merge_config({"model": {"num_layers": 1, "moe": {"num_experts": 4, "layers": "every_other"}}}),
            "model.moe.layers",
        ),  # selects no block: the model would be dense
        (merge_config({"diffusion": {"timestep_sampling": "uniform", "logit_std": 2.0}}), "diffusion.logit_std"),
        (merge_config({"data": {"path": "/shards", "vae_path": "/vae"}}), "data.vae_path"),
        (merge_config({"data": {"video_fps": 8.0}}), "data.video_fps"),
        (merge_config({"data": {"format": "video"}}), "data.format"),  # the synthetic data is latent
    ],
)
def test_other_settings_that_would_take_no_effect_are_refused(cfg, key):
    assert key in refusal(cfg)


def test_refused_setting_end_to_end_is_one_line_and_exit_2(tmp_path):
    """launcher/pretrain.py as a user runs it: tiny_moe.yaml weights the token-choice losses,
    which the sinkhorn router does not compute."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "launcher/pretrain.py",
            "--config",
            "configs/tiny_moe.yaml",
            "model.moe.router=sinkhorn",
            f"train.output_dir={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: model.moe.balance_loss=0.01 has no effect with model.moe.router=sinkhorn (only cross_attention, dynmole, "
        "linear, mlp, timestep_band read it); remove it or set it back to 0.0"
    ], done.stderr
    assert not out.exists()


def test_sinkhorn_with_zero_iterations_is_plain_top_k():
    """sinkhorn_iterations: 0 validates, and routes as a naive per-token top-k of the same logits."""
    import torch

    from megamoe.moe.routers import RoutingContext, build_router

    n, dim, e, k = 24, 8, 4, 2
    tokens = torch.randn(n, dim, generator=torch.Generator().manual_seed(0)) + 1.0  # shared offset: unbalanced
    ctx = RoutingContext(batch_size=2, seq_len=n // 2)
    for score_func, renormalize in (("softmax", True), ("sigmoid", False)):
        cfg = moe_config(
            router="sinkhorn",
            num_experts=e,
            top_k=k,
            sinkhorn_iterations=0,
            score_func=score_func,
            renormalize=renormalize,
        )
        validate(cfg)
        torch.manual_seed(1)
        router = build_router(dim, cfg.model.moe)
        out = router(tokens, ctx)
        logits = (tokens @ router.gate.weight.t()).tolist()
        for t in range(n):  # reference: sort the token's scores, keep the k best
            scores = [
                math.exp(x) / sum(math.exp(y) for y in logits[t]) if score_func == "softmax" else 1 / (1 + math.exp(-x))
                for x in logits[t]
            ]
            best = sorted(range(e), key=lambda i: -scores[i])[:k]
            total = sum(scores[i] for i in best) if renormalize else 1.0
            want = [scores[i] / total if i in best else 0.0 for i in range(e)]
            assert out.routing_map[t].tolist() == [i in best for i in range(e)]
            assert out.probs[t].tolist() == pytest.approx(want, rel=1e-5)
        balanced = build_router(dim, dataclasses.replace(cfg.model.moe, sinkhorn_iterations=3))
        balanced.load_state_dict(router.state_dict())
        assert not torch.equal(balanced(tokens, ctx).routing_map, out.routing_map)  # the iterations do matter here


def test_moe_layers_is_checked_by_the_models_parser():
    """'0,4,' passed validation and failed at model build; validation now runs the model's parser."""
    from megamoe.moe.layer import moe_layer_indices

    cfg = merge_config({"model": {"num_layers": 6, "moe": {"num_experts": 4, "layers": "0,4,"}}})
    assert "model.moe.layers='0,4,'" in refusal(cfg)
    with pytest.raises(ConfigError, match=r"model\.moe\.layers='0,4,'"):
        moe_layer_indices(cfg.model)
    cfg.model.moe.layers = "0, 4"
    validate(cfg)
    assert moe_layer_indices(cfg.model) == {0, 4}


@pytest.mark.parametrize("spec", ["none", " all ", "every_2", "every_02", "every_0", "every_²", "every_x", "every_"])
def test_activation_checkpointing_validates_exactly_what_the_model_accepts(spec):
    from megamoe.model.activation_checkpointing import checkpointed_blocks

    cfg = merge_config({"train": {"activation_checkpointing": spec}})
    try:
        checkpointed_blocks(spec, cfg.model.num_layers)
    except ConfigError as exc:  # the model refuses it: validation gives the same line
        assert refusal(cfg) == str(exc)
    else:
        validate(cfg)


def test_every_registered_router_validates_by_name():
    """Router names come from the registry: also a router registered after config.py was written."""
    from megamoe.moe.routers import ROUTERS, register_router
    from megamoe.moe.routers.token_choice import LinearRouter

    for name in ROUTERS:
        validate(moe_config(router=name, **ROUTER_BASE.get(name, {})))  # a router that needs more keys gets them
    register_router("test_only_linear")(type("TestOnlyLinear", (LinearRouter,), {}))
    try:
        validate(moe_config(router="test_only_linear", z_loss=0.1))
        assert "test_only_linear" in refusal(moe_config(router="nope"))
    finally:
        del ROUTERS["test_only_linear"]


# A value different from the default (or, for settings on in the baseline, off) for every key a router may read.
CHANGED = {
    "top_k": 1,
    "layer_reg_loss": 0.0,
    "score_func": "sigmoid",
    "renormalize": False,
    "num_null_experts": 1,
    "bias_balancing": False,
    "bias_update_rate": 0.5,
    "balance_loss": 0.0,
    "balance_scope": "sequence",
    "z_loss": 0.0,
    "router_hidden_dim": 8,
    "expert_choice_scope": "batch",
    "capacity_factor": 2.0,
    "race_threshold_decay": 0.5,
    "similarity_loss": 0.0,
    "sinkhorn_iterations": 1,
    "num_prototypes_per_expert": 2,
    "contrastive_loss": 0.0,
    "capacity_loss": 0.0,
    "diffmoe_threshold_decay": 0.5,
    "timestep_band_boundaries": [500.0],
    "timestep_band_router": "linear",
    "ssr_probability": 0.0,
    "ssr_noise_std": 1.0,
    "ssr_seed": 0,
    "dynmole_q": 2.0,
    "dynmole_entropy_threshold": 0.0,
    "dynmole_top_p": 0.01,
    "dynmole_min_experts": 2,
    "tsallis_loss": 0.0,
    "bias_update_schedule": "inverse_time",
    "bias_freeze_step": 2,
    "bias_update_centered": True,
    "bias_update_form": "proportional",
    "race_score_func": "sigmoid",
    "race_gate": "mlp",
    "race_scope": "global",
}
# Keys that a router reads only together with others: set in both runs, where the router reads them.
REQUIRES = {
    "bias_freeze_step": {"bias_update_schedule": "frozen", "bias_freeze_step": 1},
    "router_hidden_dim": {"race_gate": "mlp"},
    # odd E: each sign step sums to an odd multiple of eta_t; with eta = rate, rate / 2 the two steps
    # cannot cancel, so the uncentred biases never sum to zero and centring always moves them
    "bias_update_centered": {"num_experts": 3, "bias_update_schedule": "inverse_time"},
}
# Keys whose effect needs several data-parallel ranks (refused on one by validate(); tested on gloo ranks).
MULTI_RANK_KEYS = {"race_scope"}
# Read by the MoE layer, the loop or upcycling, not by routers.
LAYER_KEYS = {
    "num_experts",
    "layers",
    "expert_ffn_dim",
    "num_shared_experts",
    "shared_ffn_dim",
    "router",
    "shared_init",
    "shared_init_std",
    "diagnostics_every",
    "trace_every",
    "trace_tokens",
    "merged_from",
}


# Where a router's defaults read fewer keys than it may: the inner router that reads all of them.
# (timestep_band: 2 bands of 3 experts, so top-2 leaves the balance loss something to balance.)
ROUTER_BASE = {"timestep_band": dict(timestep_band_router="cross_attention", num_experts=6)}


def _router_behaviour(cfg) -> list:
    """Everything a router produces over two training steps and one inference forward."""
    import torch

    from megamoe.moe.routers import RoutingContext, build_router

    torch.manual_seed(0)
    router = build_router(16, cfg, layer_reg_out_dim=4).train()
    g = torch.Generator().manual_seed(1)
    ctx = RoutingContext(
        batch_size=2,
        seq_len=8,
        temb=torch.randn(2, 16, generator=g),
        text=torch.randn(2, 3, 16, generator=g),
        is_null=torch.tensor([False, True]),
        timestep=torch.tensor([300.0, 800.0]),
    )
    seen = []
    for _ in range(2):
        out = router(torch.randn(16, 16, generator=g) + 1.0, ctx)
        seen += [sorted(out.aux), out.probs, out.routing_map, *(out.aux[k] for k in sorted(out.aux))]
        router.after_step(lambda t: t)
    out = router.eval()(torch.randn(16, 16, generator=g), ctx)
    return seen + [out.probs, out.routing_map, sorted(router.state_dict()), *router.state_dict().values()]


def _same(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        for x, y in zip(a, b)
    )


def test_every_key_a_router_accepts_changes_what_it_does():
    """The other half of 'refuse what is ignored': each key in a router's config_keys must change
    its routing, losses or state; and every model.moe field is read by the layer or some router."""
    from megamoe.config import MoEConfig
    from megamoe.moe.routers import ROUTERS

    read = set().union(*(cls.config_keys for cls in ROUTERS.values()))
    assert {f.name for f in dataclasses.fields(MoEConfig)} == LAYER_KEYS | read
    for name, cls in ROUTERS.items():
        on = {key: 0.5 for key in cls.config_keys if key.endswith("_loss")}
        on.update({"bias_balancing": True} if "bias_balancing" in cls.config_keys else {})
        base = MoEConfig(**{"num_experts": 4, "top_k": 2, "router": name, **on, **ROUTER_BASE.get(name, {})})
        reference = _router_behaviour(base)
        for key in sorted(cls.config_keys - MULTI_RANK_KEYS):
            needs = {k: v for k, v in REQUIRES.get(key, {}).items() if k in cls.config_keys | LAYER_KEYS}
            start = dataclasses.replace(base, **needs)
            changed = dataclasses.replace(start, **{key: CHANGED[key]})
            expected = _router_behaviour(start) if needs else reference
            assert not _same(_router_behaviour(changed), expected), f"{name} ignores model.moe.{key}"


def test_buckets_that_do_not_fit_the_model_or_the_layout_are_refused(tmp_path, monkeypatch, capsys):
    """Video buckets (pixels, through the VAE's compression read from data.vae_path/config.json),
    latent buckets and the synthetic clip are checked by the rule the loader skips samples with; a
    misfit would otherwise kill the run, and every resume of it, when its first sample arrives."""
    import json

    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"scale_factor_temporal": 4, "scale_factor_spatial": 16}))
    video = ["data.format=video", "data.path=/shards", f"data.vae_path={vae}", "data.text_encoder_path=/text"]
    cases = [  # world size, overrides, message
        (
            2,
            video + ["parallel.context_parallel_size=2", "data.buckets=[[17,96,128],[17,96,160]]"],
            "data.buckets entry [17, 96, 160] gives 75 tokens per sample, not divisible by "
            "parallel.context_parallel_size = 2",
        ),  # latent (5, 6, 10), patch grid (5, 3, 5)
        (
            1,
            video + ["data.buckets=[[17,2304,2304]]"],
            "gives the patch grid (5, 72, 72), beyond model.rope_max_seq_len=64",
        ),
        (1, video + ["data.buckets=[[17,100,160]]"], "is not 4k+1 frames with sides that are multiples of 16 pixels"),
        (
            1,
            ["data.path=/shards", "data.buckets=[[4,16,16],[4,160,16]]"],
            "data.buckets entry [4, 160, 16] gives the patch grid (4, 80, 8), beyond model.rope_max_seq_len=64",
        ),
        (
            1,
            ["data.synthetic_size=160"],
            "data.synthetic_frames/data.synthetic_size gives the patch grid (5, 80, 80), beyond model.rope_max_seq_len=64",
        ),
    ]
    for world, overrides, message in cases:
        with pytest.raises(ConfigError) as info:
            validate(load_config(TINY, [WAN_PATCH, *overrides]), world_size=world)
        assert message in str(info.value)
    # Under a VAE that compresses 8x, [17, 96, 160] is (5, 12, 20) latents: 300 tokens, which do split.
    (vae / "config.json").write_text(json.dumps({"scale_factor_spatial": 8}))
    validate(load_config(TINY, [WAN_PATCH, *cases[0][1]]), world_size=2)
    # Through the launcher: one line, exit 2, nothing written.
    code = main(
        [
            "--config",
            TINY,
            f"train.output_dir={tmp_path / 'run'}",
            WAN_PATCH,
            "train.steps=1",
            "data.synthetic_size=160",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and cases[-1][2] in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "yaml_text, overrides, key, form, fix",
    [
        (
            "model:\n  mod:\n    layers: [1, 3]\n",
            [],
            "model.mod.layers",
            "model.mod.layers is a string like '1,3', not a list: write layers: '1,3' in YAML, "
            "model.mod.layers=1,3 as an override",
            "model.mod.layers=1,3",
        ),
        (
            "model:\n  lora:\n    targets: q,k\n",
            [],
            "model.lora.targets",
            "model.lora.targets is a list: write targets: [q, k] in YAML, model.lora.targets=[q,k] as an override",
            "model.lora.targets=[q,k]",
        ),
        (
            None,
            ["model.mod.router_features=noise_level"],
            "model.mod.router_features",
            "model.mod.router_features is a list: write router_features: [noise_level] in YAML, "
            "model.mod.router_features=[noise_level] as an override",
            "model.mod.router_features=[noise_level]",
        ),
        (
            None,
            ["model.mod.layers="],
            "model.mod.layers",
            "the value is empty; give one, e.g. its default model.mod.layers=none",
            "model.mod.layers=none",
        ),
    ],
)
def test_a_value_of_the_wrong_shape_gets_the_accepted_form(yaml_text, overrides, key, form, fix, tmp_path):
    """A list where a string goes, one value where a list goes, an empty value: the line names the key and
    shows the form it takes, built from the value given; that form is then accepted."""
    path = None
    if yaml_text:
        path = tmp_path / "config.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path and str(path), overrides)
    assert str(info.value) == f"bad value for '{key}': {form}"
    load_config(None, [fix])
