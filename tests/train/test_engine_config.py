"""LR schedule and DeepSpeed config against closed forms."""

import math

from megamoe.config import merge_config
from megamoe.train.engine import deepspeed_config, warmup_cosine


def test_warmup_then_cosine_to_min_ratio():
    total, warm, floor = 100, 10, 0.1
    assert warmup_cosine(0, warm, total, floor) == 0.1
    assert warmup_cosine(9, warm, total, floor) == 1.0
    assert warmup_cosine(10, warm, total, floor) == 1.0
    midpoint = warm + (total - warm) // 2
    assert math.isclose(warmup_cosine(midpoint, warm, total, floor), floor + (1 - floor) * 0.5, rel_tol=1e-9)
    assert math.isclose(warmup_cosine(total, warm, total, floor), floor)
    assert math.isclose(warmup_cosine(total + 50, warm, total, floor), floor)


def test_deepspeed_config_follows_megamoe_config():
    cfg = merge_config(
        None,
        [
            "optim.zero_stage=2",
            "train.precision=bf16",
            "train.grad_accum=4",
            "data.micro_batch_size=3",
            "optim.grad_clip=0.5",
            "optim.lr=2e-4",
        ],
    )
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["torch_adam"] is True
