"""launcher/rehearse.py: one process plays one rank of a larger layout on torch's fake process group.

The reference is the planner's closed form (itself checked against a real DeepSpeed engine in
tests/tools/test_layout_planner.py) and the layout arithmetic: rank R of EP=E holds num_experts / E experts per MoE
layer, and ZeRO-2 keeps 1/DP of the rest of the optimizer state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamoe.config import load_config
from megamoe.tools.parameter_counts import config_parameter_counts
from megamoe.tools.random_wan_checkpoint import write_random_wan

REPO = Path(__file__).resolve().parents[1]


def rehearse(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = tmp_path / "rehearsal.json"
    done = subprocess.run(
        [
            sys.executable,
            "launcher/rehearse.py",
            "--json",
            str(out),
            *map(str, args),
            f"train.output_dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "rank, overrides, dense_source",
    [
        (5, ["parallel.expert_parallel_size=4"], True),
        (3, ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=2"], False),
    ],
)
def test_a_rank_of_an_8_gpu_layout_holds_its_shard_and_agrees_with_the_planner(tmp_path, rank, overrides, dense_source):
    extra = []
    if dense_source:  # a sharded bf16 dense checkpoint, upcycled while rank 5 reads its slices
        write_random_wan(
            str(REPO / "configs/tiny.yaml"), str(tmp_path / "dense"), max_shard_gb=0.0005, log=lambda _: None
        )
        extra = ["--init-from", tmp_path / "dense"]
    done, figures = rehearse(
        tmp_path,
        "--config",
        "configs/tiny_moe.yaml",
        "--nodes",
        2,
        "--gpus-per-node",
        4,
        "--rank",
        rank,
        "--latent",
        "5,16,16",
        *extra,
        "optim.zero_stage=2",
        "train.precision=bf16",
        *overrides,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "agrees with the planner" in done.stdout
    assert ("upcycl" in done.stdout) == dense_source, done.stdout
    cfg = load_config(str(REPO / "configs/tiny_moe.yaml"), overrides)
    p, counts = cfg.parallel, config_parameter_counts(cfg.model)
    # The rank's weights: its 1/TP of the TP-sharded parameters, the replicated rest, 1/EP of the experts.
    local = (
        counts.total
        - counts.routed_experts
        - counts.tensor_parallel * (1 - 1 / p.tensor_parallel_size)
        + counts.routed_experts / p.expert_parallel_size
    )
    # bf16. DeepSpeed flattens each optimizer group into one buffer padded to a multiple of 2 x its
    # data-parallel size: a few elements more than the parameters.
    assert 0 <= figures["measured"]["weights"] - 2 * local <= 2 * 2 * 8 * 3, (figures["measured"]["weights"], 2 * local)
    for kind in ("gradients", "optimizer"):
        assert abs(figures["measured"][kind] / figures["planned"][kind] - 1) <= 0.05, kind
    act = figures["activation_bytes_per_token"]
    assert abs(act["measured"] / act["planned"] - 1) <= 0.2, act


def test_bad_input_is_one_line(tmp_path, capsys):
    """In this process: every refusal comes before the fake process group or any model exists."""
    from launcher.rehearse import main

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00")
    for args, needle in [
        (["--rank", 8], "--rank"),
        (["--init-from", tmp_path / "broken"], "safetensors"),
        (["--latent", "1,8"], "--latent"),
        (
            ["--latent", "3,8,8"],
            "--latent '3,8,8' is not a whole number of model.patch_size=[5, 2, 2] patches; e.g. --latent 5,8,8",
        ),
        (["--latent", ""], "--latent '' must be three positive ints"),
        (["--latent", "5,160,160"], "patch grid (1, 80, 80), beyond model.rope_max_seq_len=64"),
        (["model.patch_size=[5,2]"], "model.patch_size must be three positive ints"),  # before --latent's default
        (["model.patch_size=[0,2,2]"], "model.patch_size must be three positive ints"),
        (["--num-layers", 9], "--num-layers"),
        (["parallel.expert_parallel_size=3"], "expert"),
    ]:
        code = main(
            ["--config", str(REPO / "configs/tiny_moe.yaml"), "--nodes", "2", "--gpus-per-node", "4", *map(str, args)]
        )
        err = capsys.readouterr().err
        assert code == 2 and needle in err, (args, err[-500:])
        assert len(err.strip().splitlines()) == 1, err
