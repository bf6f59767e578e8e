"""Tensor (+ sequence), context and expert parallelism of the whole DiT against the single-process model.

Each rank builds its shard as training does (`build_sharded_model`: on the meta device, sharded,
then only what the rank holds allocated and drawn); the shards put together must equal the
one-process build bit for bit. Each layout then runs the training objective (flow loss + router
losses) on gloo ranks and must give the single-process loss and, once every rank's gradients are
reduced the way DeepSpeed reduces them (ordinary parameters: summed over data x context parallel
ranks, divided by the data-parallel size; experts: summed over the expert-data-parallel group,
divided by the data-parallel size) and the TP shards / EP slices are put together, the
single-process gradient of every parameter.

The reference is the single-process model on the global batch: each data-parallel rank takes its
slice (and its own noise generator), the reference loss and gradients are the mean over slices.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megamoe.config import Config, DiffusionConfig, ModelConfig, MoEConfig, ParallelConfig
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


def moe_model(router: str, **losses) -> ModelConfig:
    """Block 0 dense (TP-sharded FFN), block 1 MoE with a shared expert; the per-layer
    regularization on, plus the router's own losses (`losses`): every loss weight the router uses
    is nonzero, and each must equal the unsharded loss for the comparison to hold."""
    return dataclasses.replace(
        DENSE,
        moe=MoEConfig(
            **{
                "num_experts": 4,
                "layers": "every_other",
                "router": router,
                "top_k": 2,
                "num_shared_experts": 1,
                "layer_reg_loss": 0.1,
                **losses,  # also a different top_k
            }
        ),
    )


MOE = moe_model("linear", balance_loss=0.5, z_loss=0.01)
# Routers whose selection or losses span the tokens of a micro-batch (and token choice's
# sequence-wise balance): each must select and score under sharding as one process does.
SPANNING = {
    "linear sequence balance": moe_model("linear", balance_loss=0.5, z_loss=0.01, balance_scope="sequence"),
    "expert_race": moe_model("expert_race", similarity_loss=0.5),
    "expert_choice": moe_model("expert_choice"),
    "expert_choice batch": moe_model("expert_choice", expert_choice_scope="batch"),
    "sinkhorn": moe_model("sinkhorn"),
    "selective_sinkhorn": moe_model("selective_sinkhorn", ssr_probability=1.0),  # the differentiable plan
    "promoe": moe_model("promoe", contrastive_loss=0.5),
    "diffmoe": moe_model("diffmoe"),  # its pool and capacity loss span the shards
    # The inner router's sequence-wise balance over the shards (its token shards come from the band router).
    "timestep_band linear": moe_model(
        "timestep_band",
        timestep_band_router="linear",
        timestep_band_boundaries=[500.0],
        top_k=1,  # of each band's 2 experts, so the balance loss acts
        balance_loss=0.5,
        z_loss=0.01,
        balance_scope="sequence",
    ),
}
SAMPLES_PER_RANK, FRAMES, SIZE, TEXT_LEN = 2, 2, 8, 5  # 2 x 4 x 4 = 32 tokens per sample

LAYOUTS = {  # name: (ranks, ParallelConfig fields, model)
    "tp2": (2, dict(tensor_parallel_size=2, sequence_parallel=False), DENSE),
    "tp2_sp": (2, dict(tensor_parallel_size=2), DENSE),
    "cp2": (2, dict(context_parallel_size=2), DENSE),
    "tp2_cp2_sp": (4, dict(tensor_parallel_size=2, context_parallel_size=2), DENSE),
    "tp2_cp2": (4, dict(tensor_parallel_size=2, context_parallel_size=2, sequence_parallel=False), DENSE),
    "tp2_sp_dp2": (4, dict(tensor_parallel_size=2), DENSE),
    "tp2_sp_moe": (2, dict(tensor_parallel_size=2), MOE),  # experts replicated: summed by the SP hooks
    "tp2_sp_ep2_moe": (2, dict(tensor_parallel_size=2, expert_parallel_size=2), MOE),
    "cp2_ep2_moe": (2, dict(context_parallel_size=2, expert_parallel_size=2), MOE),
    "ep2_moe": (2, dict(expert_parallel_size=2), MOE),
    "tp2_sp_ep2_dp2_moe": (4, dict(tensor_parallel_size=2, expert_parallel_size=2), MOE),
    "cp2_ep2_dp2_moe": (4, dict(context_parallel_size=2, expert_parallel_size=2), MOE),
    "ep4_moe": (4, dict(expert_parallel_size=4), MOE),
    "tp2_cp2_sp_ep4_moe": (4, dict(tensor_parallel_size=2, context_parallel_size=2, expert_parallel_size=4), MOE),
}


class PerTokenTimesteps(nn.Module):
    """Runs the model with one timestep per token (Wan2.2 TI2V style): the sample's timestep
    lowered by a fixed per-token amount, so every token differs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latents, timestep, text):
        length = latents.shape[2] * latents.shape[3] * latents.shape[4] // 4
        offsets = torch.linspace(0, 300, length)
        return self.model(latents, (timestep[:, None] - offsets).clamp_min(0), text)


def build(model_cfg):
    """The one-process model (seed 0)."""
    from megamoe.model.dit import build_model

    return with_trainable_head(build_model(model_cfg, seed=0))


def with_trainable_head(model):
    """proj_out starts at zero, which would leave the trunk without gradient: draw it (it is
    replicated in every layout, so every rank draws the same)."""
    torch.manual_seed(0)
    with torch.no_grad():
        nn.init.normal_(model.proj_out.weight, std=0.1)
        nn.init.normal_(model.proj_out.bias, std=0.1)
    return model


def batch(model_cfg, dp_rank):
    g = torch.Generator().manual_seed(7)
    n = SAMPLES_PER_RANK * 8  # a fixed global pool, so every layout slices the same data
    latents = torch.randn(n, model_cfg.in_channels, FRAMES, SIZE, SIZE, generator=g)
    text = torch.randn(n, TEXT_LEN, model_cfg.text_dim, generator=g)
    text[1] = 0  # one unconditional (CFG-null) sample
    rows = slice(dp_rank * SAMPLES_PER_RANK, (dp_rank + 1) * SAMPLES_PER_RANK)
    return latents[rows], text[rows]


def run_objective(model, model_cfg, dp_rank, per_token):
    """(total loss, flow loss) of one data-parallel rank's slice, backward done."""
    from megamoe.train.objective import training_loss

    cfg = Config(model=model_cfg, diffusion=DiffusionConfig(text_dropout=0.0))
    latents, text = batch(model_cfg, dp_rank)
    runner = PerTokenTimesteps(model) if per_token else model
    total, parts = training_loss(runner, model, latents, text, cfg, torch.Generator().manual_seed(100 + dp_rank))
    total.backward()
    return total.detach(), parts["flow"]


def reference(model, model_cfg, dp_size, per_token):
    """Loss and gradients of the single-process model, averaged over the data-parallel slices."""
    loss, grads = 0.0, {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for d in range(dp_size):
        model.zero_grad()
        total, _ = run_objective(model, model_cfg, d, per_token)
        loss += total / dp_size
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] += p.grad / dp_size
    return loss, grads


def reduced_gradients(model) -> dict:
    """Each parameter's gradient as DeepSpeed leaves it, made whole (TP shards, EP slices)."""
    from megatron.core import parallel_state as ps

    from megamoe.parallel.collectives import gather_along_dim

    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    dp = ps.get_data_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if getattr(p, "allreduce", True) is False:
            dist.all_reduce(g, group=ps.get_expert_data_parallel_group())
            g = gather_along_dim(g / dp, 0, ps.get_expert_model_parallel_group())
        else:
            dist.all_reduce(g, group=dp_cp)
            g = g / dp
            if getattr(p, "tensor_model_parallel", False):
                g = gather_along_dim(g, p.partition_dim, ps.get_tensor_model_parallel_group())
        out[name] = g
    return out


def check_layout(layout, model_cfg, per_token=False, checkpointing=False) -> tuple[float, float, float]:
    """Parallel vs single-process objective on this rank; (loss, |loss diff|, max |grad diff|)."""
    from megatron.core import parallel_state as ps

    from megamoe.parallel.parallelize import build_sharded_model, full_state_dict
    from megamoe.parallel.topology import init_distributed

    parallel = ParallelConfig(**LAYOUTS[layout][1])
    init_distributed(parallel, torch.device("cpu"))
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    single = build(model_cfg)
    model = with_trainable_head(build_sharded_model(Config(model=model_cfg, parallel=parallel), "cpu"))
    if checkpointing:  # the blocks' collectives then run again inside backward
        from megamoe.model.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model, "all")

    full = full_state_dict(model)
    expected = single.state_dict()
    assert list(full) == list(expected), layout
    for name, value in expected.items():
        assert torch.equal(full[name], value), f"{layout}: full_state_dict()[{name}]"

    # Every rank of a TP/CP group computes the whole objective (gathered prediction, router losses
    # from statistics summed over the shards); the data-parallel mean is the step's loss.
    loss, _ = run_objective(model, model_cfg, dp_rank, per_token)
    dist.all_reduce(loss, group=ps.get_data_parallel_group())
    loss = loss / dp_size
    got = reduced_gradients(model)

    ref_loss, ref_grads = reference(single, model_cfg, dp_size, per_token)
    assert (loss - ref_loss).abs() < 1e-5, f"{layout}: loss {loss.item()} vs single-process {ref_loss.item()}"
    for name, value in ref_grads.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=lambda m: f"{layout}: {name}: {m}")
    ps.destroy_model_parallel()
    return (
        loss.item(),
        (loss - ref_loss).abs().item(),
        max((got[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
    )


def sharp_router(num_experts, **moe):
    """A linear router over `num_experts`-dim tokens whose gate is 50 x identity: a token along
    axis e goes to expert e with probability 1 - O(e^-50)."""
    from megamoe.moe.routers import build_router

    router = build_router(num_experts, MoEConfig(num_experts=num_experts, top_k=1, **moe))
    with torch.no_grad():
        router.gate.weight.copy_(50 * torch.eye(num_experts))
    return router


def check_balance_closed_forms() -> tuple[float, float, float]:
    """Two ranks. CP=2: a clip whose first half goes to expert 0 and second half to expert 1 is
    balanced (loss exactly 1), though each rank's half alone is collapsed (2). DP=2, `global`
    scope: the data-parallel mean of the loss and of its gradient is the balance loss of the
    global batch, E * sum_i f_i P_i over both ranks' tokens; with a second micro-batch, f counts
    both micro-batches (P is the second's); after the step the counts start again."""
    from megatron.core import parallel_state as ps

    from megamoe.moe.losses import switch_balance_loss
    from megamoe.moe.routers import RoutingContext, build_router
    from megamoe.moe.token_shards import TokenShards
    from megamoe.parallel.topology import init_distributed

    init_distributed(ParallelConfig(context_parallel_size=2), torch.device("cpu"))
    rank = ps.get_context_parallel_rank()
    router = sharp_router(2, balance_loss=1.0)
    router.token_shards = TokenShards(ps.get_context_parallel_group())
    clip = torch.eye(2).repeat_interleave(2, dim=0)  # 4 tokens: 2 along axis 0, then 2 along axis 1
    sharded = router(clip[2 * rank : 2 * rank + 2], RoutingContext(1, 2)).aux["balance"]
    assert abs(sharded.item() - 1.0) < 1e-6, f"CP=2 balance loss of a balanced clip is {sharded.item()}, not 1"
    ps.destroy_model_parallel()

    init_distributed(ParallelConfig(), torch.device("cpu"))
    world, dp_group = dist.get_world_size(), ps.get_data_parallel_group()
    cfg = MoEConfig(num_experts=4, top_k=2, balance_loss=1.0, balance_scope="global")
    torch.manual_seed(0)
    router = build_router(8, cfg)
    router.token_shards = TokenShards(None, dp_group)
    single = build_router(8, dataclasses.replace(cfg, balance_scope="micro_batch"))
    single.load_state_dict(router.state_dict())
    g = torch.Generator().manual_seed(3)
    micro = [torch.randn(world, 6, 8, generator=g) for _ in range(3)]  # [DP rank, tokens, dim] per micro-batch
    ctx = RoutingContext(2, 3)

    def dp_mean(x):
        x = x.detach().clone()
        dist.all_reduce(x, group=dp_group)
        return x / world

    loss = router(micro[0][rank], ctx).aux["balance"]
    loss.backward()
    got = dp_mean(router.gate.weight.grad)
    expected = single(micro[0].flatten(0, 1), RoutingContext(2 * world, 3)).aux["balance"]
    expected.backward()
    loss_diff = (dp_mean(loss) - expected).abs().item()
    grad_diff = (got - single.gate.weight.grad).abs().max().item()
    assert loss_diff < 1e-6 and grad_diff < 1e-6, ("global scope vs the global batch", loss_diff, grad_diff)

    second = dp_mean(router(micro[1][rank], ctx).aux["balance"])
    with torch.no_grad():
        everything = torch.cat([micro[0], micro[1]]).flatten(0, 1)
        f = torch.zeros(4).index_add_(
            0, (everything @ router.gate.weight.t()).topk(2).indices.flatten(), torch.ones(everything.shape[0] * 2)
        )
        p = (micro[1].flatten(0, 1) @ router.gate.weight.t()).softmax(-1).mean(0)
        closed_form = 4 * (f / f.sum() * p).sum()
    assert (second - closed_form).abs() < 1e-6, ("global scope, second micro-batch", second.item(), closed_form.item())

    router.after_step(lambda x: x)
    third = dp_mean(router(micro[2][rank], ctx).aux["balance"])
    fresh = switch_balance_loss(*_scores(single, micro[2].flatten(0, 1)), 4, 2 * world, 3)
    assert (third - fresh).abs() < 1e-6, ("global scope after the step", third.item(), fresh.item())
    ps.destroy_model_parallel()
    return expected.item(), loss_diff, grad_diff


def _scores(router, tokens):
    """(softmax scores, top-k selection) of a linear router without bias."""
    with torch.no_grad():
        scores = (tokens @ router.gate.weight.t()).softmax(-1)
        return scores, torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(2).indices, True)


def cases_worker(rank, world, cases, results):
    """Every case of one world size in one set of processes (starting ranks costs more than a case).
    A case is (name, check function, keyword arguments); the check returns (loss, |loss diff|,
    max |grad diff|) after asserting."""
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from megamoe.parallel.topology import destroy_distributed

    for name, check, kwargs in cases:
        diffs = check(**kwargs)
        if rank == 0:
            results.put((name, *diffs))
    destroy_distributed()


def run_cases(world, cases):
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    spawn(cases_worker, world, cases, results)
    for _ in cases:
        name, loss, loss_diff, grad_diff = results.get()
        print(f"{name}: loss {loss:.6f}, |loss - ref| = {loss_diff:.2e}, max |grad - ref| = {grad_diff:.2e}")


def layout_case(name, layout, model_cfg, **options):
    return name, check_layout, dict(layout=layout, model_cfg=model_cfg, **options)


def test_two_rank_layouts_match_single_process():
    cases = [layout_case(name, name, LAYOUTS[name][2]) for name in LAYOUTS if LAYOUTS[name][0] == 2]
    cases.append(layout_case("tp2_sp_moe per-token timesteps", "tp2_sp_moe", MOE, per_token=True))
    cases.append(layout_case("tp2_sp_ep2_moe activation checkpointing", "tp2_sp_ep2_moe", MOE, checkpointing=True))
    # Every router family at CP2 x EP2 and TP2+SP, its loss weights on (CP2 alone adds nothing a
    # router can see: the shard group is the same as at CP2 x EP2).
    cases.append(layout_case("cp2 moe", "cp2", MOE))
    for layout in ("cp2_ep2_moe", "tp2_sp_moe"):
        cases += [layout_case(f"{layout} {name}", layout, model_cfg) for name, model_cfg in SPANNING.items()]
    cases.append(("balance closed forms (CP=2, global scope at DP=2)", check_balance_closed_forms, {}))
    run_cases(2, cases)


def test_four_rank_layouts_match_single_process():
    cases = [layout_case(name, name, LAYOUTS[name][2]) for name in LAYOUTS if LAYOUTS[name][0] == 4]
    cases.append(layout_case("tp2_cp2_sp per-token timesteps", "tp2_cp2_sp", DENSE, per_token=True))
    run_cases(4, cases)


def _identity_worker(rank, world):
    from megamoe.parallel.parallelize import build_sharded_model, full_state_dict, parallelize
    from megamoe.parallel.topology import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), torch.device("cpu"))
    model = build(MOE)
    own = with_trainable_head(build_sharded_model(Config(model=MOE), "cpu")).state_dict()
    assert list(own) == list(model.state_dict())
    assert all(torch.equal(value, own[name]) for name, value in model.state_dict().items())
    latents, text = batch(MOE, 0)
    t = torch.tensor([300.0, 700.0])
    before = model(latents, t, text)
    state = model.state_dict()
    parallelize(model, ParallelConfig())
    assert torch.equal(model(latents, t, text), before)
    full = full_state_dict(model)
    assert list(full) == list(state) and all(torch.equal(full[k], state[k]) for k in state)
    destroy_distributed()


def test_one_process_is_left_bit_identical():
    """All sizes 1: the rank's own build is the one-process build, and parallelize changes nothing, to the bit."""
    spawn(_identity_worker, 1)


def _errors_worker(rank, world):
    from megamoe.parallel.parallelize import parallelize
    from megamoe.parallel.topology import destroy_distributed, init_distributed

    parallel = ParallelConfig(tensor_parallel_size=2, context_parallel_size=1)
    init_distributed(parallel, torch.device("cpu"))
    with pytest.raises(ValueError, match="num_heads=3"):
        parallelize(build(dataclasses.replace(DENSE, dim=36, num_heads=3)), parallel)
    with pytest.raises(ValueError, match="sequence_parallel"):
        parallelize(build(MOE), dataclasses.replace(parallel, sequence_parallel=False))
    model = parallelize(build(DENSE), parallel)
    latents = torch.randn(1, 4, 1, 2, 6)  # 3 tokens: not divisible over 2 ranks
    with pytest.raises(ValueError, match="not divisible into 2 shards"):
        model(latents, torch.tensor([500.0]), torch.randn(1, TEXT_LEN, DENSE.text_dim))
    destroy_distributed()


def test_bad_layouts_are_refused():
    spawn(_errors_worker, 2)
