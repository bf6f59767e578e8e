"""Routing traces hold what the layers routed: each traced row equals the router's own output for
that token in the same forward, its position decodes to the patch the token was embedded from,
and under context parallelism the ranks' traces together are the one-process trace."""

import dataclasses

import pytest
import torch

from megamoe.config import CheckpointConfig, Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from megamoe.model.dit import build_model
from megamoe.moe.routing_trace import RoutingTracer, load_traces, moe_layer_labels, trace_path
from megamoe.train import moe_step_hooks
from tests.distributed.launch_helpers import spawn

B, GRID = 2, (2, 3, 4)  # latents [B, 4, 2, 6, 8] with patch (1, 2, 2): 24 tokens per sample, H' != W'
LENGTH = GRID[0] * GRID[1] * GRID[2]


def model_cfg(router: str = "linear", **moe) -> ModelConfig:
    return ModelConfig(
        dim=32,
        num_layers=2,
        num_heads=4,
        ffn_dim=64,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=16,
        rope_max_seq_len=32,
        moe=MoEConfig(num_experts=4, top_k=2, router=router, layers="all", **moe),
    )


def inputs(seed: int = 0):
    """latents, per-token timesteps [B, L] (all distinct), text."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, 4, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=g)
    timestep = torch.rand(B, 1, generator=g) * 600 + torch.linspace(0, 300, LENGTH)
    return latents, timestep, torch.randn(B, 5, 24, generator=g)


def traced_forward(model, tmp_path, trace_tokens: int, step: int = 7, rank: int = 0):
    """One forward with the tracer on; returns the trace and what each router returned (by label)."""
    seen = {}
    hooks = [
        layer.router.register_forward_hook(lambda mod, args, out, label=label: seen.update({label: (args, out)}))
        for label, layer in moe_layer_labels(model)
    ]
    tracer = RoutingTracer(model, trace_tokens, tmp_path, rank)
    tracer.start()
    model(*inputs())
    tracer.capture(step)
    tracer.stop()
    tracer.write(step)
    for h in hooks:
        h.remove()
    (trace,) = load_traces(tmp_path)
    return trace, seen


@pytest.mark.parametrize("router", ["linear", "expert_choice"])  # k experts per token; 0..E per token
def test_traced_rows_are_the_routers_output_for_those_tokens(tmp_path, router):
    torch.manual_seed(0)
    model = build_model(model_cfg(router)).train()
    trace, seen = traced_forward(model, tmp_path, trace_tokens=10)
    assert (trace.step, trace.rank, trace.grid) == (7, 0, GRID) and list(trace.layers) == ["layer00", "layer01"]
    latents, timestep, _ = inputs()
    for label, t in trace.layers.items():
        (tokens, ctx), out = seen[label]
        assert len(t.sample) == 10
        ids = t.sample.long() * LENGTH + t.position
        assert torch.equal(ids, ids.unique())  # distinct tokens, ascending
        for i in range(10):
            b, p = int(t.sample[i]), int(t.position[i])
            row = b * LENGTH + p  # one process: the local token index is the global one
            cols = out.routing_map[row].nonzero().flatten()
            k = len(cols)
            assert t.experts[i, :k].tolist() == cols.tolist() and (t.experts[i, k:] == -1).all()
            assert torch.equal(t.weights[i, :k], out.probs[row, cols].detach()) and (t.weights[i, k:] == 0).all()
            assert t.timestep[i] == timestep[b, p]
            # The token at `position` is the patch embedding of the latent patch at (frame, row, col).
            f, h, w = int(t.frame[i]), int(t.row[i]), int(t.col[i])
            patch = latents[b, :, f : f + 1, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2]
            conv = model.patch_embedding
            embedded = (conv.weight * patch).sum((1, 2, 3, 4)) + conv.bias
            first_block_input = model.patch_embedding(latents).flatten(2).transpose(1, 2)[b, p]
            torch.testing.assert_close(embedded, first_block_input)
            assert p == (f * GRID[1] + h) * GRID[2] + w


def test_sample_is_deterministic_per_step_and_layer_and_zero_means_all(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_cfg()).train()
    first, _ = traced_forward(model, tmp_path / "a", trace_tokens=10)
    again, _ = traced_forward(model, tmp_path / "b", trace_tokens=10)
    other_step, _ = traced_forward(model, tmp_path / "c", trace_tokens=10, step=8)
    for label in first.layers:
        assert torch.equal(first.layers[label].position, again.layers[label].position)
    assert not torch.equal(first.layers["layer00"].position, first.layers["layer01"].position)
    assert not torch.equal(first.layers["layer00"].position, other_step.layers["layer00"].position)
    every, _ = traced_forward(model, tmp_path / "d", trace_tokens=0)
    assert all(len(t.sample) == B * LENGTH for t in every.layers.values())


def test_hooks_trace_only_the_asked_steps_and_not_a_skipped_one(tmp_path, monkeypatch):
    # One process without a process group: the sum over token shards is the identity.
    monkeypatch.setattr(moe_step_hooks, "sum_over_token_shards", lambda parallel: lambda x: x)
    torch.manual_seed(0)
    cfg = Config(
        model=model_cfg(trace_every=2, trace_tokens=4, diagnostics_every=0),
        train=TrainConfig(output_dir=str(tmp_path)),
        checkpoint=CheckpointConfig(),
    )
    model = build_model(cfg.model).train()
    hooks = moe_step_hooks.MoEStepHooks(cfg, model)
    recording = []
    for step in range(1, 7):
        for micro in (0, 1):
            hooks.before_forward(step, micro == 1)
            recording.append([layer.record for _, layer in moe_layer_labels(model)])
            model(*inputs(step))
            hooks.after_forward(step, micro == 1)
        hooks.after_skipped_step(step) if step == 4 else hooks.after_step(step)
    assert [t.step for t in load_traces(tmp_path)] == [2, 6]
    assert trace_path(tmp_path, 2, 0).exists()
    # Recording is on only for the last micro-batch of a traced step: untraced steps cost nothing.
    assert [any(r) for r in recording] == [step % 2 == 0 and micro == 1 for step in range(1, 7) for micro in (0, 1)]


def _context_parallel_worker(rank, world, out_dir):
    from megatron.core import parallel_state as ps

    from megamoe.parallel.parallelize import build_sharded_model
    from megamoe.parallel.topology import init_distributed

    parallel = ParallelConfig(context_parallel_size=2)
    init_distributed(parallel, torch.device("cpu"))
    model = build_sharded_model(Config(model=model_cfg(), parallel=parallel), "cpu").train()
    traced_forward(model, f"{out_dir}/rank{rank}", trace_tokens=24, rank=rank)
    ps.destroy_model_parallel()


def rows(trace) -> dict:
    """{(layer, sample, position): (frame, row, col, timestep, experts, weights)} of a trace."""
    found = {}
    for label, t in trace.layers.items():
        for i in range(len(t.sample)):
            fields = (t.frame[i], t.row[i], t.col[i], t.timestep[i], t.experts[i], t.weights[i])
            found[(label, int(t.sample[i]), int(t.position[i]))] = tuple(x.tolist() for x in fields)
    return found


@pytest.mark.distributed
def test_context_parallel_traces_together_are_the_one_process_trace(tmp_path):
    spawn(_context_parallel_worker, 2, str(tmp_path))
    single, _ = traced_forward(build_model(model_cfg(), seed=0).train(), tmp_path / "single", trace_tokens=24)
    (first,), (second,) = load_traces(tmp_path / "rank0"), load_traces(tmp_path / "rank1")
    expected, got = rows(single), rows(first) | rows(second)
    assert rows(first) and rows(second) and not rows(first).keys() & rows(second).keys()
    assert got.keys() == expected.keys()
    positions = {p for _, _, p in rows(first)}
    assert max(positions) < LENGTH // 2 <= min(p for _, _, p in rows(second))  # rank 1's chunk: global positions
    for key, (*where, weights) in expected.items():
        assert got[key][:-1] == tuple(where), key
        torch.testing.assert_close(torch.tensor(got[key][-1]), torch.tensor(weights), rtol=0, atol=1e-5)


def test_trace_settings_are_checked():
    from megamoe.config import ConfigError
    from megamoe.config_checks import validate

    base = Config(model=model_cfg())
    with pytest.raises(ConfigError, match="trace_tokens=5 has no effect"):
        validate(dataclasses.replace(base, model=model_cfg(trace_tokens=5)))
    with pytest.raises(ConfigError, match="trace_every must be >= 0"):
        validate(dataclasses.replace(base, model=model_cfg(trace_every=-1)))


def test_load_traces_refuses_a_directory_that_is_not_there(tmp_path):
    assert load_traces(tmp_path) == []  # a run that traced nothing yet
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_traces(tmp_path / "typo")
