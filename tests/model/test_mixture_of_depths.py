"""Mixture-of-depths blocks (megamoe/model/mixture_of_depths.py): capacity 1.0 against the plain model
bit for bit, a routed block against a naive per-sample loop, the router's gradient against the closed
form, threshold inference against the training selection, the FLOP count against torch's counter,
the config rules, and training on the tiny config."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megamoe.config import (
    BlockRouterConfig,
    Config,
    ConfigError,
    MixtureOfDepthsConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    load_config,
)
from megamoe.config_checks import validate
from megamoe.model.activation_checkpointing import apply_activation_checkpointing
from megamoe.model.dit import build_model
from megamoe.model.mixture_of_depths import block_flops, collect_mod_aux, routed_block_flops, tokens_per_sample
from megamoe.moe.routers.base import RoutingContext
from megamoe.tools.synthetic_data import embed_caption, make_clip
from megamoe.train.objective import training_loss

BASE = ModelConfig(
    dim=32, num_layers=3, num_heads=4, ffn_dim=64, in_channels=4, out_channels=4, text_dim=24, freq_dim=16,
    rope_max_seq_len=32,
)  # fmt: skip
MOD = MixtureOfDepthsConfig(layers="all", capacity=0.5, router_features=["noise_level", "position"])


def routed(**changes) -> ModelConfig:
    return dataclasses.replace(BASE, mod=dataclasses.replace(MOD, **changes))


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 2, 8, 8, generator=g)  # 2 x 4 x 4 = 32 tokens per sample
    return latents, torch.rand(batch, generator=g) * 1000, torch.randn(batch, 5, 24, generator=g)


def pretrained(cfg: ModelConfig, seed=1):
    """A model whose head is not zero (so the trunk shows in the output and its gradients)."""
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        model.proj_out.weight.copy_(
            0.1 * torch.randn(model.proj_out.weight.shape, generator=torch.Generator().manual_seed(seed))
        )
    return model


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("per_token_timesteps", [False, True])
def test_capacity_one_equals_the_plain_model_bit_for_bit(mode, per_token_timesteps):
    """Every token chosen: the gathered tokens, per-sample RoPE tables and scattered outputs reproduce
    the plain forward exactly, and the straight-through factor is exactly 1. Eval at capacity 1.0 runs
    every token too, whatever threshold a training forward left."""
    plain = pretrained(BASE)
    model = pretrained(routed(capacity=1.0))
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".mod." in key for key in missing)
    latents, t, text = inputs()
    if per_token_timesteps:  # Wan2.2 TI2V: the first frame's tokens at t = 0
        t = t[:, None].repeat(1, 32)
        t[:, :16] = 0
    model(latents, t, text)  # a training forward sets the thresholds
    getattr(model, mode)(), plain.eval()
    assert torch.equal(model(latents, t, text), plain(latents, t, text))


def naive_block(block, x, text, modulation, rope, ctx, capacity, update_scale):
    """The routed block as a loop over samples: score, take the top-k positions in order, run the plain
    block on that sub-sequence with its RoPE rows, write back x + scale * (y - x)."""
    mod, (cos, sin) = block.mod, rope
    s = mod.scores(x, ctx)
    out = x.clone()
    k = tokens_per_sample(capacity, x.shape[1])
    for b in range(x.shape[0]):
        idx = s[b].topk(k).indices.sort().values
        y = block.run(x[b : b + 1, idx], text[b : b + 1], modulation[b : b + 1], (cos[idx], sin[idx]), ctx)[0]
        scale = s[b, idx, None] if update_scale == "score" else 1.0
        out[b, idx] = x[b, idx] + scale * (y - x[b, idx])
    return out


def block_inputs(model, latents, t, text):
    """What WanDiT.forward hands its first block (one process)."""
    grid = model._grid(latents)
    x = model.patch_embedding(latents).flatten(2).transpose(1, 2)
    temb, modulation, text = model.condition_embedder(t[:, None], text)
    ctx = RoutingContext(batch_size=x.shape[0], seq_len=x.shape[1], temb=temb[:, 0], text=text, timestep=t, grid=grid)
    return x, text, modulation, model.rope(grid, x.device), ctx


@pytest.mark.parametrize("update_scale", ["straight_through", "score"])
def test_a_routed_block_equals_a_naive_loop_over_samples(update_scale):
    model = pretrained(routed(update_scale=update_scale, capacity=0.4))
    latents, t, text = inputs(batch=3)
    args = block_inputs(model, latents, t, text)
    block = model.blocks[0]
    with torch.no_grad():
        got = block(*args)
        expected = naive_block(block, *args, capacity=0.4, update_scale=update_scale)
    changed = (got != args[0]).any(-1)
    assert (changed.sum(1) == tokens_per_sample(0.4, 32)).all()  # 13 of 32 tokens per sample run the block
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_router_gradient_is_the_block_update_times_the_score_slope():
    """Straight-through: d loss / d logit_j = <g_j, y_j - x_j> * s_j (1 - s_j) for a chosen token j, 0 for
    the others; checked on the gate's bias, which sums it over tokens, against the naive loop's y."""
    model = pretrained(routed())
    latents, t, text = inputs()
    x, text, modulation, rope, ctx = block_inputs(model, latents, t, text)
    x = x.detach()
    block = model.blocks[0]
    g = torch.randn_like(x)
    (block(x, text.detach(), modulation.detach(), rope, ctx) * g).sum().backward()
    with torch.no_grad():
        y = naive_block(block, x, text, modulation, rope, ctx, MOD.capacity, "straight_through")
        s = block.mod.scores(x, ctx)
        expected = ((g * (y - x)).sum(-1) * s * (1 - s)).sum()
    assert block.mod.gate.bias.grad.abs().item() > 0
    torch.testing.assert_close(block.mod.gate.bias.grad[0], expected, rtol=1e-4, atol=1e-6)


def test_threshold_inference_equals_the_training_choice_when_scores_straddle_it():
    """Scores that depend on the position only (token weights zeroed) rank the tokens of every sample
    alike, far apart: the learned threshold is the k-th score (an EMA of two equal forwards), and a
    hair below it (1e-4, against a gap of > 1e-3 to the next score) it lets exactly the training
    top-k of every block through: eval equals training."""
    model = pretrained(routed(router_features=["position"]))
    with torch.no_grad():
        for block in model.blocks:
            block.mod.gate.weight[:, :32] = 0
            block.mod.gate.weight[:, 32:] = torch.tensor([1.0, 4.0, 2.0])  # frame, row, column: distinct sums
    latents, t, text = inputs()
    trained = model(latents, t, text)
    model(latents, t, text)
    s = model.blocks[0].mod.scores(torch.zeros(1, 32, 32), RoutingContext(1, 32, grid=(2, 4, 4)))[0]
    ranked = s.sort(descending=True).values
    assert model.blocks[0].mod.threshold.item() == pytest.approx(ranked[15].item(), abs=1e-7)
    assert ranked[15] - ranked[16] > 1e-3  # the 16th and 17th scores are far apart: no tie at the threshold
    for block in model.blocks:  # exactly at the k-th score, a rounding of the EMA would decide
        block.mod.threshold -= 1e-4
    model.eval()
    torch.testing.assert_close(model(latents, t, text), trained, rtol=0, atol=0)


def test_threshold_inference_does_not_depend_on_the_batch():
    """Per-sample counts differ with the noise level (a router that mostly reads it): in eval exactly
    the tokens whose score reaches the threshold run the block, and each sample of a batch gets what
    it gets alone, whatever the other samples choose."""
    model = pretrained(routed(router_features=["noise_level"], threshold_decay=0.5))
    g = torch.Generator().manual_seed(0)  # not the global RNG, which an earlier import may have reseeded
    with torch.no_grad():
        for block in model.blocks:
            block.mod.gate.weight[:, :32] = torch.randn(32, generator=g) * 0.5
            block.mod.gate.weight[:, 32] = 3.0
    latents, t, text = inputs(batch=3)
    model(latents, t, text)  # learn the thresholds
    model.eval()
    t = torch.tensor([50.0, 500.0, 950.0])
    together = model(latents, t, text)
    block = model.blocks[0]
    with torch.no_grad():
        args = block_inputs(model, latents, t, text)
        counts = (block.mod.scores(args[0], args[-1]) >= block.mod.threshold).sum(1)
        changed = (block(*args) != args[0]).any(-1).sum(1)
    assert len(set(counts.tolist())) == 3, counts  # three different counts: the per-sample path
    assert changed.tolist() == counts.tolist()  # exactly the tokens at or above the threshold ran the block
    for i in range(3):
        alone = model(latents[i : i + 1], t[i : i + 1], text[i : i + 1])
        # 1e-5: one sample's matmuls round differently from three's (~1e-6 here); another routing
        # of a single token would differ by ~1e-2.
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_the_threshold_is_an_ema_of_the_kth_score():
    model = pretrained(routed(threshold_decay=0.75))
    mod = model.blocks[0].mod
    kth = []
    for seed in (0, 1):
        latents, t, text = inputs(seed)
        x, _, _, _, ctx = block_inputs(model, latents, t, text)
        with torch.no_grad():
            kth.append(mod.scores(x, ctx).topk(16, dim=1).values[:, -1].mean().item())
            model(latents, t, text)
    assert mod.threshold.item() == pytest.approx(0.75 * kth[0] + 0.25 * kth[1], abs=1e-6)


def test_checkpointed_routed_blocks_give_the_same_gradients_and_thresholds():
    """Two forwards, then one backward through both: the recomputed blocks replay their choice, and
    their recomputation does not step the threshold EMA again (it would, between the two forwards'
    values, and differ from the run without checkpointing)."""
    grads, thresholds = [], []
    for spec in ("none", "all"):
        model = pretrained(routed(threshold_decay=0.5))
        apply_activation_checkpointing(model, spec)
        loss = sum(model(*inputs(seed)).square().sum() for seed in (0, 1))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        thresholds.append([b.mod.threshold.item() for b in model.blocks])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert thresholds[0] == thresholds[1]


def math_attend(q, k, v):
    """Softmax attention as two explicit products, which FlopCounterMode counts (it misses CPU SDPA)."""
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v


def test_flop_count_matches_torchs_counter():
    """The analytic count of a plain and of a routed block equals FlopCounterMode's count of their forwards."""
    model = pretrained(routed(capacity=0.25))
    latents, t, text = inputs(batch=2)
    block = model.blocks[0]
    block.attn1.attend = block.attn2.attend = math_attend
    with torch.no_grad():
        args = block_inputs(model, latents, t, text)
        with FlopCounterMode(display=False) as plain:
            block.run(*args)
        with FlopCounterMode(display=False) as counted:
            block(*args)
    assert plain.get_total_flops() == 2 * block_flops(32, 64, 32, 5)
    assert counted.get_total_flops() == 2 * routed_block_flops(model.cfg, 32, 5)
    assert routed_block_flops(model.cfg, 32, 5) < 0.35 * block_flops(32, 64, 32, 5)


def test_sparsity_loss_pulls_the_mean_score_to_its_target():
    model = pretrained(routed(sparsity_loss=1.0, sparsity_target=0.2))
    latents, t, text = inputs()
    model(latents, t, text)
    x, _, _, _, ctx = block_inputs(model, latents, t, text)
    with torch.no_grad():
        mean = model.blocks[0].mod.scores(x, ctx).mean()
    assert model.blocks[0].mod.aux["mod_sparsity"].item() == pytest.approx((mean.item() - 0.2) ** 2, rel=1e-5)
    assert collect_mod_aux(model)["mod_sparsity"].item() == pytest.approx(
        sum(b.mod.aux["mod_sparsity"].item() for b in model.blocks), rel=1e-6
    )


@pytest.mark.parametrize(
    "model, parallel, message",
    [
        (routed(capacity=0.0), {}, "model.mod.capacity must be in"),
        (routed(layers="3"), {}, "model.mod.layers='3'"),
        (routed(layers="1,1"), {}, r"model.mod.layers='1,1' names block\(s\) \[1\] more than once"),
        (routed(update_scale="gate"), {}, "model.mod.update_scale"),
        (routed(router_features=["attention"]), {}, "model.mod.router_features"),
        (routed(sparsity_target=0.3), {}, "model.mod.sparsity_target=0.3 has no effect"),
        (dataclasses.replace(BASE, mod=MixtureOfDepthsConfig(capacity=0.3)), {}, "model.mod.capacity=0.3 has no"),
        (
            dataclasses.replace(routed(layers="0,1"), moe=MoEConfig(num_experts=4, layers="1")),
            {},
            r"blocks \[1\] are in both",
        ),
        (routed(), {"tensor_parallel_size": 2}, "model.mod .mixture-of-depths. does not support"),
        (
            dataclasses.replace(routed(), block_router=BlockRouterConfig(enabled=True)),
            {},
            "model.block_router.enabled=true cannot be combined",
        ),
    ],
)
def test_config_rules(model, parallel, message):
    with pytest.raises(ConfigError, match=message):
        validate(Config(model=model, parallel=ParallelConfig(**parallel)), world_size=2)


def test_mod_in_the_dense_blocks_of_an_moe_model_validates():
    model = dataclasses.replace(routed(layers="0,2"), moe=MoEConfig(num_experts=4, layers="1"))
    validate(Config(model=model))
    built = build_model(model)
    assert [b.mod is not None for b in built.blocks] == [True, False, True]


def test_training_the_tiny_config_with_mod_lowers_the_loss():
    """configs/tiny.yaml's model and diffusion, routed blocks 1 and 3 at capacity 0.5 with the
    sparsity loss on; 20 AdamW steps on one batch of 2 synthetic clips: the loss falls."""
    cfg = load_config(
        "configs/tiny.yaml",
        ["model.mod.layers=1,3", "model.mod.capacity=0.5", "model.mod.router_features=[noise_level,position]",
         "model.mod.sparsity_loss=0.01", "model.mod.sparsity_target=0.5", "diffusion.text_dropout=0.0"],
    )  # fmt: skip
    validate(cfg)
    m, d = cfg.model, cfg.data
    clips = [make_clip(0, i, d.synthetic_frames, d.synthetic_size, m.in_channels) for i in range(2)]
    latents = torch.from_numpy(np.stack([c for c, _ in clips])).float()
    text = torch.from_numpy(np.stack([embed_caption(cap, d.text_len, m.text_dim) for _, cap in clips])).float()
    torch.manual_seed(0)
    model = build_model(m, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, router_grads = [], []
    for step in range(20):
        loss, parts = training_loss(model, model, latents, text, cfg, torch.Generator().manual_seed(step % 4))
        optimizer.zero_grad()
        loss.backward()
        router_grads.append(model.blocks[1].mod.gate.weight.grad.abs().sum().item())
        optimizer.step()
        losses.append(parts["flow"].item())
    assert "mod_sparsity" in parts
    print(f"flow loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert min(router_grads) > 0  # the router trains from the first step on (block update and sparsity loss)


def test_a_capacity_that_does_not_split_over_the_context_shards_is_refused_before_start(tmp_path, capsys, monkeypatch):
    """tiny with 2x2 patches: 5 x 8 x 8 = 320 tokens per sample; capacity 0.503 routes 161, which 2 shards cannot split.
    launcher/pretrain.py (rank 0 of 2) refuses it in one line, exit 2, before any process group exists."""
    import torch.distributed as dist

    from launcher.pretrain import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = [
        "--config",
        "configs/tiny.yaml",
        "model.patch_size=[1,2,2]",
        "model.mod.layers=1,3",
        "parallel.context_parallel_size=2",
    ]
    code = main([*args, "model.mod.capacity=0.503", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not dist.is_initialized(), err
    assert "model.mod.capacity=0.503 routes 161 of the 320 tokens per sample" in err, err
    assert "e.g. model.mod.capacity=0.5 (160 tokens)" in err, err
    validate(load_config("configs/tiny.yaml", args[2:] + ["model.mod.capacity=0.5"]), world_size=2)  # 160: fine


def test_init_from_a_pretrained_base_draws_the_routers_as_the_seed_does(tmp_path):
    """A checkpoint without mixture-of-depths routers (a dense pretrained model) is a base: its weights
    load as they are and the routers (gates and threshold buffers) equal build_model(seed)'s."""
    from megamoe.model.mixture_of_depths import is_mod_key
    from megamoe.model.weights import save_diffusers_weights
    from megamoe.parallel.sharded_weights import init_from

    save_diffusers_weights(pretrained(BASE), str(tmp_path / "base"))
    cfg = routed(layers="0,2")
    model = build_model(cfg, seed=5)
    for block in (model.blocks[0], model.blocks[2]):  # as a model that has routed before would hold them
        block.mod.threshold.fill_(0.7)
        block.mod.threshold_initialized.fill_(True)
    assert "mixture-of-depths routers drawn from seed 3" in init_from(model, str(tmp_path / "base"), seed=3)
    fresh, base = build_model(cfg, seed=3).state_dict(), pretrained(BASE).state_dict()
    state = model.state_dict()
    assert sum(map(is_mod_key, state)) == 8 and state.keys() == fresh.keys()
    for key, value in state.items():
        assert torch.equal(value, fresh[key] if is_mod_key(key) else base[key]), key


def test_the_launcher_converts_a_pretrained_checkpoint_to_mixture_of_depths(tmp_path):
    """README's ARank -> convert workflow: `pretrain.py model.mod.layers=0,3 train.init_from=<ckpt>/weights`
    on a dense tiny checkpoint's export starts and trains (one step)."""
    from megamoe.model.weights import save_diffusers_weights
    from tests.distributed.launch_helpers import pretrain_in_process, read_metrics

    save_diffusers_weights(build_model(load_config("configs/tiny.yaml").model, seed=1), str(tmp_path / "weights"))
    out = tmp_path / "out"
    pretrain_in_process(
        ["--config", "configs/tiny.yaml", "model.mod.layers=0,3", f"train.init_from={tmp_path / 'weights'}",
         "train.steps=1", "data.synthetic_num_clips=4", "data.micro_batch_size=2", f"data.cache_dir={tmp_path}",
         f"train.output_dir={out}"]
    )  # fmt: skip
    assert np.isfinite(read_metrics(out)[1]["loss_flow"])
