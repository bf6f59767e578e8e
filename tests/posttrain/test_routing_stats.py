"""The post-training foundation against naive references: routing statistics (a per-token loop over the
routing the layers executed), the fingerprint that ties statistics to one model, the fixed-level
held-out loss (the flow objective written out) and the FLOP count (closed form of what MoE adds)."""

import dataclasses

import pytest
import torch

from megamoe.config import Config, DataConfig, ModelConfig, MoEConfig
from megamoe.diffusion.flow import TIMESTEP_SCALE
from megamoe.model.dit import build_model
from megamoe.moe.layer import moe_layers
from megamoe.posttrain.evaluation import flops_per_token, parameter_bytes, validation_loss
from megamoe.posttrain.routing_stats import collect_routing_stats, load_routing_stats, save_routing_stats
from megamoe.posttrain.trained_model import PostTrainError, data_batches, load_trained_model
from megamoe.tools.synthetic_data import HELD_OUT_SEED, ensure_synthetic_dataset
from megamoe.train.validation import validation_noise


def model_config(**moe) -> ModelConfig:
    base = dict(num_experts=4, top_k=2, num_shared_experts=1)
    base.update(moe)
    return ModelConfig(
        dim=32,
        num_layers=2,
        num_heads=2,
        ffn_dim=64,
        in_channels=3,
        out_channels=3,
        text_dim=16,
        freq_dim=16,
        rope_max_seq_len=32,
        moe=MoEConfig(**base),
    )


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 5, 16, generator=g)) for _ in range(n)]


def test_statistics_equal_a_per_token_loop_over_the_executed_routing():
    cfg = Config(model=model_config(num_null_experts=1))
    model = build_model(cfg.model, seed=1).eval()
    data = batches()
    stats = collect_routing_stats(model, data, cfg, sample_tokens=10)

    # Reference: rerun the same noised inputs with recording on, and count token by token.
    executed = {i: [] for i in range(2)}
    layers = moe_layers(model)
    for layer in layers:
        layer.record = True
    with torch.no_grad():
        for i, (latents, text) in enumerate(data):
            g = torch.Generator().manual_seed(i)
            s = (torch.arange(2) + 0.5) / 2
            noise = torch.randn(latents.shape, generator=g)
            xs = (1 - s.view(-1, 1, 1, 1, 1)) * latents + s.view(-1, 1, 1, 1, 1) * noise
            model(xs, s * TIMESTEP_SCALE, text)
            for b, layer in enumerate(layers):
                executed[b].append(layer.last_routing[:2])
    for b, layer_stats in stats.layers.items():
        counts = torch.zeros(4, dtype=torch.float64)
        weights = torch.zeros(4, dtype=torch.float64)
        pairs = torch.zeros(4, 4, dtype=torch.float64)
        tokens = computed = 0
        for probs, routing_map in executed[b]:
            for t in range(routing_map.shape[0]):
                chosen = [e for e in range(4) if routing_map[t, e]]  # the null column 4 is left out
                computed += len(chosen)
                tokens += 1
                for e in chosen:
                    counts[e] += 1
                    weights[e] += float(probs[t, e])
                    for f in chosen:
                        pairs[e, f] += 1
        assert torch.equal(layer_stats.counts, counts)
        assert torch.allclose(layer_stats.weight_sums, weights, rtol=1e-6)
        assert torch.equal(layer_stats.coactivation, pairs)
        assert layer_stats.num_tokens == tokens
        assert layer_stats.experts_per_token == pytest.approx(computed / tokens)
        assert layer_stats.experts_per_token < 2  # the null expert took some of the top-2 picks
        assert layer_stats.router_logits.shape == (10, 4) and layer_stats.inputs.shape == (10, 32)
        sampled = torch.cat([m[torch.linspace(0, m.shape[0] - 1, 5).long(), :4] for _, m in executed[b]])
        assert torch.equal(layer_stats.routing_map, sampled)


def test_saved_statistics_load_only_on_their_model(tmp_path):
    cfg = Config(model=model_config())
    model = build_model(cfg.model, seed=1).eval()
    stats = collect_routing_stats(model, batches(1), cfg, sample_tokens=8)
    path = str(tmp_path / "stats.safetensors")
    save_routing_stats(stats, path)
    loaded = load_routing_stats(path, model)
    for b, s in stats.layers.items():
        for name in ("counts", "weight_sums", "coactivation", "router_logits", "inputs", "routing_map"):
            assert torch.equal(getattr(loaded.layers[b], name), getattr(s, name))
        assert loaded.layers[b].experts_per_token == s.experts_per_token
    other = build_model(cfg.model, seed=2)  # same shapes, other router weights
    with pytest.raises(PostTrainError, match="another model.*routers_sha256"):
        load_routing_stats(path, other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PostTrainError, match="not a routing statistics file"):
        load_routing_stats(str(tmp_path / "junk.safetensors"))


def test_validation_loss_is_the_flow_loss_at_fixed_levels_and_noise():
    model = build_model(model_config(), seed=3).eval()
    data = batches()
    first = validation_loss(model, data, levels=(0.25, 0.75), seed=5)
    assert first == validation_loss(model, data, levels=(0.25, 0.75), seed=5)  # deterministic
    with torch.no_grad():
        for j, level in enumerate((0.25, 0.75)):
            total = 0.0
            for i, (x0, text) in enumerate(data):
                noise = torch.stack([validation_noise(5, 2 * i + b, j, x0.shape[1:]) for b in range(2)])
                pred = model((1 - level) * x0 + level * noise, torch.full((2,), level * 1000), text)
                total += float(((pred - (noise - x0)) ** 2).mean())
            assert first[f"s={level:.2f}"] == pytest.approx(total / 2, rel=1e-6)
    assert first["mean"] == pytest.approx((first["s=0.25"] + first["s=0.75"]) / 2)


def test_flops_per_token_count_only_the_experts_a_token_visits():
    """MoE minus dense, per token and MoE layer: top_k routed experts and the shared expert replace one
    FFN of the same width (2 GEMMs of dim x ffn each), plus the linear router [dim -> E] and the
    second-bias product probs @ b2 [E -> dim]: 2 FLOPs per multiply-add."""
    dense_cfg = dataclasses.replace(model_config(), moe=MoEConfig())
    moe_cfg = model_config()
    data = batches(1)
    dense = flops_per_token(build_model(dense_cfg), data)
    moe = flops_per_token(build_model(moe_cfg), data)
    d, w, e, k, layers = 32, 64, 4, 2, 2
    per_layer = 2 * (2 * d * w) * (k + 1 - 1) + 2 * d * e + 2 * e * d
    assert moe - dense == pytest.approx(layers * per_layer, rel=1e-9)
    sizes = parameter_bytes(build_model(moe_cfg))
    assert sizes["experts"] == 4 * e * (d * w + w + w * d + d) * layers  # fp32 bytes of w1, b1, w2, b2


def test_trained_checkpoint_and_its_data(trained_moe, tmp_path):
    model, cfg = load_trained_model(trained_moe)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    cal, val = data_batches(cfg, 2), data_batches(cfg, 2, held_out=True)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(cal, data_batches(cfg, 2), strict=True))  # same stream
    assert not any(torch.equal(c[0], v[0]) for c in cal for v in val)  # held out: other clips
    with pytest.raises(PostTrainError, match="dense model"):
        dense_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=MoEConfig()))
        _fake_dense_checkpoint(trained_moe, tmp_path / "dense", dense_cfg)
        load_trained_model(tmp_path / "dense")
    with pytest.raises(PostTrainError, match="no built-in held-out split"):
        data_batches(dataclasses.replace(cfg, data=DataConfig(path=str(tmp_path))), 1, held_out=True)
    held_out_dir = ensure_synthetic_dataset(cfg.data, cfg.model, HELD_OUT_SEED)  # what --val-data would name
    from_path = data_batches(cfg, 2, held_out=True, path=held_out_dir)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, from_path, strict=True))
    with pytest.raises(PostTrainError, match="no shards found"):
        data_batches(cfg, 1, path=str(tmp_path / "missing"))


def _fake_dense_checkpoint(source, target, cfg):
    """A copy of `source` whose recorded config is dense (what a dense run's checkpoint says)."""
    import json
    import shutil

    from megamoe.config import to_yaml

    shutil.copytree(source, target)
    meta = json.loads((target / "meta.json").read_text())
    meta["config"] = to_yaml(cfg)
    (target / "meta.json").write_text(json.dumps(meta))


def test_output_directory_is_complete_or_absent_and_readable_by_others(tmp_path):
    import os

    from megamoe.posttrain.trained_model import output_directory

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="half way"), output_directory(out) as tmp:
        (tmp / "part.bin").write_bytes(b"x")
        raise RuntimeError("half way")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory
    umask = os.umask(0o022)
    try:
        with output_directory(out) as tmp:
            private = tmp / "weights.bin"
            private.write_bytes(b"x")
            private.chmod(0o600)  # as atomic writes leave a file
    finally:
        os.umask(umask)
    assert (out / "weights.bin").stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755
    with pytest.raises(PostTrainError, match="already exists"), output_directory(out):
        pass
