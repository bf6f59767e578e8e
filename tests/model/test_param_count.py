"""The Wan2.2-TI2V-5B config must build the 5B model, counted without allocating it (meta device)."""

import pytest
import torch

from megamoe.config import load_config
from megamoe.model.dit import build_model, count_parameters
from megamoe.model.weights import diffusers_config

CONFIG = "configs/wan2.2_ti2v_5b.yaml"


@pytest.fixture(scope="module")
def cfg(request):
    return load_config(str(request.config.rootpath / CONFIG)).model


def test_5b_config_has_5b_parameters(cfg):
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    n = count_parameters(model)
    print(f"{CONFIG}: {n:,} parameters ({n / 1e9:.4f}B)")
    assert abs(n - 5.0e9) / 5.0e9 < 0.01


def test_5b_count_equals_diffusers(cfg):
    diffusers = pytest.importorskip("diffusers")
    kwargs = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**kwargs)
    ours = build_model(cfg, device="meta")
    assert count_parameters(ours) == sum(p.numel() for p in ref.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
