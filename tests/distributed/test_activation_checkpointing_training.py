"""Activation checkpointing under model parallelism: the recomputation in backward repeats the
layer's collectives (TP/SP gathers, Ulysses and expert all-to-alls) and must still count the
routers' statistics once. Checkpointed parallel runs match the single-process run without
checkpointing (losses, gradient norms, final weights, aux-free biases included)."""

import dataclasses

import pytest

from megamoe.config import ParallelConfig
from tests.distributed.parallel_training_harness import SMALL_MOE, make_config, run
from tests.distributed.test_parallel_training import assert_same_run

# Aux-free bias balancing gathers load counts in forward; the balance loss (like z) reduces its
# statistics over the sequence shards, in the recomputed forward too.
BIASED = dataclasses.replace(
    SMALL_MOE, moe=dataclasses.replace(SMALL_MOE.moe, bias_balancing=True, bias_update_rate=0.01, balance_loss=0.1)
)


@pytest.mark.parametrize(
    "parallel, spec",
    [
        ({"tensor_parallel_size": 2}, "all"),  # TP + SP: gathers and reduce-scatters recomputed
        ({"context_parallel_size": 2, "expert_parallel_size": 2}, "every_2"),  # Ulysses + expert all-to-all
    ],
    ids=["tp2_all", "cp2_ep2_every_2"],
)
def test_checkpointed_parallel_run_matches_the_plain_single_process_run(parallel, spec, tmp_path):
    cfg = make_config(parallel, model=BIASED, steps=3)
    checkpointed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=spec))
    parallel_run = run(checkpointed, 2, 2, tmp_path / "parallel.pt")
    reference = run(dataclasses.replace(cfg, parallel=ParallelConfig()), 1, 2, tmp_path / "reference.pt")
    assert_same_run(parallel_run, reference, steps=3)
