"""End to end: `torchrun launcher/pretrain.py ... parallel.tensor_parallel_size=2` trains, checkpoints,
and exports whole (unsharded) weights that load into the single-process model.

With TP=2 on 2 ranks the data-parallel size is 1, so the data loader gives both ranks exactly the
stream a 1-process run reads: the two runs must log the same losses and gradient norms. The
balance loss is off because a sequence-parallel rank computes it on its shard of the tokens (see
train/objective.py); the z-loss, a token mean, stays on.
"""

import torch

from tests.distributed.launch_helpers import REPO, pretrain, pretrain_in_process, read_metrics

ARGS = [
    "--config",
    str(REPO / "configs" / "tiny_moe.yaml"),
    "model.dim=64",
    "model.num_layers=2",
    "model.ffn_dim=256",
    "model.moe.num_experts=4",
    "model.moe.balance_loss=0",
    "data.micro_batch_size=4",
    "optim.warmup_steps=1",
    "optim.grad_clip=0.5",
    "optim.zero_stage=2",
    "train.steps=3",
    "logging.every_steps=1",
    "checkpoint.every_steps=3",
    "model.moe.diagnostics_every=3",
    "logging.val_every=3",
    "logging.val_batches=2",
    "logging.sample_every=3",
]
WEIGHTS = "checkpoints/step_00000003/weights"


def test_tensor_parallel_launch_matches_single_process(tmp_path, data_cache):
    common = [*ARGS, f"data.cache_dir={data_cache}"]
    pretrain([*common, "parallel.tensor_parallel_size=2", f"train.output_dir={tmp_path / 'tp2'}"], nproc=2)
    pretrain_in_process([*common, f"train.output_dir={tmp_path / 'single'}"])
    tp2, single = read_metrics(tmp_path / "tp2"), read_metrics(tmp_path / "single")
    assert sorted(tp2) == [1, 2, 3]
    for step in tp2:
        assert abs(tp2[step]["loss"] - single[step]["loss"]) < 1e-5, step
        assert abs(tp2[step]["grad_norm"] - single[step]["grad_norm"]) < 1e-5, step
    # The validation loss under TP runs the same forward on both ranks (and the sample grid, which
    # must not hang): the same figure, up to the TP forward's rounding, as the training losses.
    assert tp2[3]["val"].keys() == single[3]["val"].keys()
    for name, value in tp2[3]["val"].items():
        assert abs(value - single[3]["val"][name]) < 1e-5, name

    from megamoe.config import load_config
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights

    cfg = load_config(ARGS[1], ARGS[2:])
    model = build_model(cfg.model)
    load_diffusers_weights(model, tmp_path / "tp2" / WEIGHTS)  # raises on any missing key or wrong shape
    reference = build_model(cfg.model)
    load_diffusers_weights(reference, tmp_path / "single" / WEIGHTS)
    worst = max(
        (a - b).abs().max().item() for a, b in zip(model.state_dict().values(), reference.state_dict().values())
    )
    assert worst < 1e-5, worst
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
