"""Dr.LLM block routers (megamoe/model/block_routing.py) against the plain model and a naive loop over
the blocks: "always execute" is the plain model bit for bit; skip and repeat equal running, for each
sample alone, the plain model whose block list spells out that sample's path."""

import contextlib
import dataclasses
import re

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megamoe.config import BlockRouterConfig, ModelConfig, MoEConfig
from megamoe.model.block_routing import block_flops, decide, fixed_paths, recorded_inputs, router_flops, window_means
from megamoe.model.dit import build_model

ROUTED = BlockRouterConfig(enabled=True, windows=3, hidden_dim=16)
DENSE = ModelConfig(
    dim=32,
    num_layers=3,
    num_heads=4,
    ffn_dim=64,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=16,
    rope_max_seq_len=32,
    block_router=ROUTED,
)
MOE = dataclasses.replace(DENSE, moe=MoEConfig(num_experts=4, top_k=2, layers="every_other", diagnostics_every=0))


def inputs(batch: int, seed: int = 0, per_token_timestep: bool = False):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 2, 8, 8, generator=g)  # 2 x 4 x 4 = 32 tokens
    timestep = torch.rand(batch, 32 if per_token_timestep else 1, generator=g).squeeze(1) * 1000
    return latents, timestep, torch.randn(batch, 5, 24, generator=g)


def routed_and_plain(cfg: ModelConfig, seed: int = 0):
    """The routed model (routers with random output layers, so they do not just execute) and the plain
    model holding the same base weights."""
    routed = build_model(cfg, seed=seed)
    with torch.no_grad():
        routed.proj_out.weight.normal_(std=0.1)  # a zero head would hide every difference
        for router in routed.block_paths.routers:
            router.fc2.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(7))
    plain = build_model(dataclasses.replace(cfg, block_router=BlockRouterConfig()), initialize=False)
    missing, unexpected = plain.load_state_dict(routed.state_dict(), strict=False)
    assert not missing and all(k.startswith("block_paths.") for k in unexpected)
    return routed.eval(), plain.eval()


def naive(plain: nn.Module, counts: torch.Tensor, latents, timestep, text) -> torch.Tensor:
    """Each sample alone through the plain model with its blocks listed as often as its path runs them."""
    blocks, out = plain.blocks, []
    try:
        for i in range(len(latents)):
            plain.blocks = nn.ModuleList(b for b, n in zip(blocks, counts[i].tolist()) for _ in range(n))
            out.append(plain(latents[i : i + 1], timestep[i : i + 1], text[i : i + 1]))
    finally:
        plain.blocks = blocks
    return torch.cat(out)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@torch.no_grad()
def test_always_execute_is_the_plain_model_bit_for_bit(cfg):
    routed, plain = routed_and_plain(cfg)
    latents, timestep, text = inputs(3)
    expected = plain(latents, timestep, text)
    with fixed_paths(routed, torch.ones(3, cfg.num_layers, dtype=torch.long)):
        assert torch.equal(routed(latents, timestep, text), expected)
    untrained = build_model(cfg, seed=0)  # zero output layers: every router executes
    assert torch.equal(untrained(latents, timestep, text), build_model(plain.cfg, seed=0)(latents, timestep, text))
    assert torch.equal(untrained.block_paths.last_counts, torch.ones(3, cfg.num_layers, dtype=torch.long))


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@torch.no_grad()
def test_skip_and_repeat_equal_a_naive_loop_over_the_blocks(cfg):
    routed, plain = routed_and_plain(cfg)
    latents, timestep, text = inputs(4, per_token_timestep=cfg is MOE)
    counts = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 1, 1], [0, 0, 0]])  # mixed passes, a full and an empty one
    with fixed_paths(routed, counts):
        got = routed(latents, timestep, text)
    assert torch.equal(routed.block_paths.last_counts, counts)
    torch.testing.assert_close(got, naive(plain, counts, latents, timestep, text), rtol=0, atol=1e-6)
    assert (got[3] - plain(latents, timestep, text)[3]).abs().max() > 1e-3  # skipping everything changes it


@torch.no_grad()
def test_routers_decide_from_windowed_means_and_noise_level():
    """The routed forward takes the path its routers give on the inputs recorded along that path, each
    router's input being the naive per-window means; the same path fixed gives the same output."""
    routed, plain = routed_and_plain(DENSE, seed=1)
    latents, timestep, text = inputs(6, seed=1)
    with recorded_inputs(routed) as recorded:
        out = routed(latents, timestep, text)
    counts = routed.block_paths.last_counts
    assert len(set(counts.flatten().tolist())) == 3  # skip, execute and repeat all occur
    torch.testing.assert_close(out, naive(plain, counts, latents, timestep, text), rtol=0, atol=1e-6)
    for i, (windows, noise) in enumerate(recorded):
        assert torch.equal(decide(routed.block_paths.routers[i](windows, noise)), counts[:, i])
    temb = routed.condition_embedder(timestep[:, None], text)[0][:, 0]
    assert torch.equal(recorded[0][1], temb)
    x = routed.patch_embedding(latents).flatten(2).transpose(1, 2)
    window = torch.arange(32) * 3 // 32  # token p in window floor(3p / 32): 11, 11 and 10 tokens
    naive_means = torch.stack([x[:, window == w].mean(1) for w in range(3)], dim=1)
    torch.testing.assert_close(recorded[0][0], naive_means, rtol=0, atol=1e-6)


def test_block_and_router_flops_equal_the_counted_flops_of_a_path():
    """The closed forms against torch's FlopCounterMode on the routed forward: a fixed path costs its
    block runs times block_flops over the all-skip forward; the routers' own choice adds their MLPs."""
    model = with_routers(build_model(DENSE))
    latents, timestep, text = inputs(2)

    def counted(counts=None):
        counter = FlopCounterMode(display=False)
        paths = fixed_paths(model, counts) if counts is not None else contextlib.nullcontext()
        # The math backend: FlopCounterMode does not count the CPU flash-attention kernel at all.
        with counter, torch.no_grad(), paths, sdpa_kernel(SDPBackend.MATH):
            model(latents, timestep, text)
        return counter.get_total_flops()

    stem_and_head = counted(torch.zeros(2, 3, dtype=torch.long))
    counts = torch.tensor([[2, 0, 1], [1, 1, 0]])
    assert counted(counts) - stem_and_head == block_flops(DENSE, 32, 5) * int(counts.sum())
    routed = counted() - stem_and_head
    runs = int(model.block_paths.last_counts.sum())
    assert routed == block_flops(DENSE, 32, 5) * runs + router_flops(DENSE) * 3 * 2


def test_window_means_of_chunks_add_up_to_the_whole_sequence():
    """What context parallelism does: each chunk's window sums, added, are the sums of the whole sequence."""
    x = torch.randn(2, 30, 8)
    whole = window_means(x, 0, 30, 4)
    expected = torch.stack([x[:, (p := torch.arange(30) * 4 // 30) == w].mean(1) for w in range(4)], dim=1)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-6)
    counts = torch.bincount(p, minlength=4).float()[:, None]
    chunks = sum(window_means(x[:, o : o + 10], o, 30, 4) * counts for o in (0, 10, 20))
    torch.testing.assert_close(chunks / counts, whole, rtol=0, atol=1e-6)
    assert window_means(x[:, :2], 0, 2, 4).shape == (2, 2, 8)  # never an empty window


def test_decide_prefers_execute_on_ties():
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.5, 2.0], [3.0, 3.0, 3.0]])
    assert decide(logits).tolist() == [1, 0, 2, 1]


LAYOUTS = {
    "cp2_ep2": {"context_parallel_size": 2, "expert_parallel_size": 2},  # one sample's tokens on both ranks
    "dp2_ep2": {"expert_parallel_size": 2},  # other samples on each rank, the experts' all-to-all spanning both
}
DP_PATHS = torch.tensor([[1, 2, 1], [0, 2, 1], [1, 0, 1], [2, 0, 0]])
"""Fixed paths of the dp2_ep2 case: rank 0's samples run MoE block 1 twice, rank 1's never, so rank 1
must join both of its all-to-all passes with a discarded one."""


def with_routers(model):
    """Random router output layers (the same on every rank) and a non-zero head."""
    with torch.no_grad():
        model.proj_out.weight.copy_(
            torch.randn(model.proj_out.weight.shape, generator=torch.Generator().manual_seed(3))
        )
        for i, router in enumerate(model.block_paths.routers):
            router.fc2.weight.copy_(torch.randn(router.fc2.weight.shape, generator=torch.Generator().manual_seed(i)))
    return model.eval()


def _layouts_worker(rank, world, out_file):
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megamoe.config import Config, ParallelConfig
    from megamoe.parallel.parallelize import build_sharded_model
    from megamoe.parallel.topology import destroy_distributed, init_distributed

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    latents, timestep, text = inputs(4, per_token_timestep=True)
    results = {}
    for name, layout in LAYOUTS.items():
        parallel = ParallelConfig(**layout)
        init_distributed(parallel, torch.device("cpu"))
        model = with_routers(build_sharded_model(Config(model=MOE, parallel=parallel), "cpu"))
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        rows = slice(dp_rank * 4 // dp_size, (dp_rank + 1) * 4 // dp_size)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if name == "dp2_ep2":
                stack.enter_context(fixed_paths(model, DP_PATHS[rows]))
            out = model(latents[rows], timestep[rows], text[rows])
        gathered = [None] * world
        dist.all_gather_object(gathered, (dp_rank, out, model.block_paths.last_counts))
        results[name] = sorted(gathered, key=lambda item: item[0])[:: world // dp_size]
        ps.destroy_model_parallel()
    if rank == 0:
        torch.save(results, out_file)
    destroy_distributed()


@pytest.mark.distributed
def test_context_and_expert_parallel_paths_equal_one_process(tmp_path):
    """CP=2 x EP=2: each rank pools half of each sample's tokens (and per-token timesteps), the window
    sums are added over the two, and both ranks take the one-process decisions and output. DP=2 x EP=2
    with paths that differ by rank: the rank without work in an MoE pass joins its all-to-all anyway
    (a hang otherwise) and every sample's output is the one-process output."""
    from tests.distributed.launch_helpers import spawn

    spawn(_layouts_worker, 2, str(tmp_path / "out.pt"))
    results = torch.load(tmp_path / "out.pt", weights_only=False)
    model = with_routers(build_model(MOE, seed=0))
    latents, timestep, text = inputs(4, per_token_timestep=True)
    with torch.no_grad():
        expected = model(latents, timestep, text)
        counts = model.block_paths.last_counts
        with fixed_paths(model, DP_PATHS):
            expected_dp = model(latents, timestep, text)
    assert len(set(counts.flatten().tolist())) >= 2  # the routers do route
    (_, out, got_counts), *_ = results["cp2_ep2"]
    assert torch.equal(got_counts, counts)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    out = torch.cat([o for _, o, _ in results["dp2_ep2"]])
    torch.testing.assert_close(out, expected_dp, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.block_router.windows=2"], "no effect while model.block_router.enabled=false"),
        (["model.block_router.enabled=true", "model.block_router.budget=0"], "must be in (0, 2]"),
        (["model.block_router.enabled=true", "model.block_router.balance_beta=1.0"], "must be in [0, 1)"),
    ],
)
def test_config_checks_name_the_key_and_the_fix(overrides, message):
    from megamoe.config import ConfigError, load_config
    from megamoe.config_checks import validate

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load_config("configs/tiny.yaml", overrides))
