"""A step skipped for a non-finite loss leaves no trace: every router family (and the aux-free
bias, null experts, routing diagnostics) ends exactly where a run that never saw the bad step ends.

The step below is the training loop's: micro-batches through the real objective, a non-finite
loss poisons the gradients, and a skipped step calls `routers_discard_step` (and the diagnostics'
`discard_step`) where an applied one calls `routers_after_step`. The reference run is the same
sequence of good steps without the bad one.
"""

import numpy as np
import pytest
import torch

from megamoe.config import ModelConfig, MoEConfig, load_config
from megamoe.model.dit import build_model
from megamoe.moe.diagnostics import RoutingDiagnostics
from megamoe.moe.layer import moe_layers, routers_after_step, routers_discard_step
from megamoe.moe.routers import ROUTERS
from megamoe.train.objective import training_loss
from megamoe.train.resilience import local_grads_finite, poison_if_nonfinite

# Each family with the options that give it per-step state or losses; every registered router is covered.
EXTRAS = {
    "linear": dict(bias_balancing=True, bias_update_rate=0.01, balance_loss=0.01, z_loss=0.001),
    "mlp": dict(bias_balancing=True, bias_update_rate=0.01, router_hidden_dim=16),
    "cross_attention": dict(bias_balancing=True, bias_update_rate=0.01, router_hidden_dim=16),
    "expert_race": dict(similarity_loss=0.01, race_threshold_decay=0.5),
    "promoe": dict(contrastive_loss=0.01),
    "diffmoe": dict(diffmoe_threshold_decay=0.5),
    # Top-1 of each band's 2 experts, so the inner router's balance loss acts.
    "timestep_band": dict(timestep_band_router="linear", timestep_band_boundaries=[500.0], balance_loss=0.01, top_k=1),
}
CASES = {name: dict(router=name, **EXTRAS.get(name, {})) for name in ROUTERS}
CASES["linear_null_experts"] = dict(
    router="linear", num_null_experts=2, score_func="sigmoid", bias_balancing=True, bias_update_rate=0.01
)


def config(moe: dict):
    cfg = load_config("configs/tiny.yaml")
    cfg.model = ModelConfig(
        dim=32,
        num_layers=2,
        num_heads=2,
        ffn_dim=64,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=16,
        rope_max_seq_len=32,
        moe=MoEConfig(**{"num_experts": 4, "top_k": 2, **moe}),
    )
    return cfg


def micro_batch(seed: int, nan: bool = False):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 2, 4, 4, generator=gen)
    return torch.full_like(latents, float("nan")) if nan else latents, torch.randn(2, 5, 24, generator=gen)


class Run:
    """A model, its optimizer and its diagnostics, stepped like the training loop does."""

    def __init__(self, cfg):
        self.cfg = cfg
        torch.manual_seed(0)
        self.model = build_model(cfg.model).train()
        with torch.no_grad():
            self.model.proj_out.weight.normal_(0, 0.05)  # the zero-initialised head would give the trunk no gradient
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.diagnostics = RoutingDiagnostics(self.model, cfg.model.moe)
        self.reports = []

    def step(self, micro_batches) -> bool:
        """One optimizer step over (seed, nan) micro-batches, recording the last for diagnostics;
        returns whether it was applied."""
        for i, (seed, nan) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            self.diagnostics.enable_recording(last)
            latents, text = micro_batch(seed, nan)
            loss, _ = training_loss(
                self.model, self.model, latents, text, self.cfg, torch.Generator().manual_seed(seed)
            )
            self.diagnostics.enable_recording(False)
            if last:
                self.diagnostics.snapshot_router_params()
            poison_if_nonfinite(loss).backward()
        applied = local_grads_finite(self.model)
        if applied:
            self.optimizer.step()
            routers_after_step(self.model, lambda t: t)  # one process: the data-parallel sum is the identity
            self.diagnostics.measure_bf16_loss()
            self.reports.append(self.diagnostics.compute(len(self.reports) + 1))
        else:
            routers_discard_step(self.model)
            self.diagnostics.discard_step()
        self.optimizer.zero_grad()
        return applied

    def router_state(self) -> list[dict]:
        """Per MoE layer: the router's buffers and every plain tensor or number it keeps (the
        statistics gathered for its next update), so state a router adds later is compared too."""
        states = []
        for layer in moe_layers(self.model):
            router = layer.router
            scratch = {
                k: v
                for k, v in vars(router).items()
                if k != "training" and (v is None or isinstance(v, (torch.Tensor, int, float)))
            }
            states.append({**scratch, **{f"buffer.{k}": v for k, v in router.named_buffers()}})
        return states

    def diagnostics_state(self) -> dict:
        """What the diagnostics carry from step to step: recordings, snapshot, streaks, warnings."""
        d = self.diagnostics
        recorded = [
            (layer.last_routing and layer.last_routing[:2], layer.last_output_norms) for layer in moe_layers(self.model)
        ]
        carried = {k: v for k, v in vars(d).items() if k not in ("layers", "labels", "t", "reduce")}
        return {"recorded": recorded, **carried}

    @torch.no_grad()
    def inference(self) -> torch.Tensor:
        """The eval-mode output on a fixed batch: Expert Race routes by its threshold there."""
        self.model.eval()
        latents, text = micro_batch(99)
        out = self.model(latents, torch.tensor([300.0, 800.0]), text)
        self.model.train()
        return out


def assert_same(a, b, path):
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{path}: {a} != {b}"
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs: {a} vs {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


@pytest.mark.parametrize("case", list(CASES))
def test_skipped_step_leaves_router_state_as_if_never_seen(case):
    cfg = config(CASES[case])
    good = [[(1, False), (2, False)], [(3, False), (4, False)], [(5, False), (6, False)]]
    bad = [(7, False), (8, True)]  # a finite micro-batch, then a NaN one (recorded for diagnostics): all skipped

    reference, skipping = Run(cfg), Run(cfg)
    assert reference.step(good[0]) and skipping.step(good[0])
    assert not skipping.step(bad)
    assert_same(skipping.router_state(), reference.router_state(), "router state after the skipped step")
    assert_same(skipping.diagnostics_state(), reference.diagnostics_state(), "diagnostics after the skipped step")
    for micro_batches in good[1:]:
        assert reference.step(micro_batches) and skipping.step(micro_batches)

    assert_same(skipping.router_state(), reference.router_state(), "router state")
    assert_same(skipping.model.state_dict(), reference.model.state_dict(), "weights")
    assert_same(skipping.inference(), reference.inference(), "eval output")
    for got, want in zip(skipping.reports, reference.reports, strict=True):
        assert_same(got.scalars, want.scalars, f"diagnostics of step {want.step}")
        assert (got.load_matrix == want.load_matrix).all()
    for state in skipping.router_state():  # the compared state is live, not still at its initial value
        if "buffer.threshold" in state:
            assert torch.isfinite(state["buffer.threshold"]).all() and bool(state["buffer.threshold_initialized"])
        if "buffer.expert_bias" in state:
            assert state["buffer.expert_bias"].abs().sum() > 0
