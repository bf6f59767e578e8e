"""A checkpoint written at one parallel layout resumes at another, with every expert's state by value.

One run on 4 gloo ranks with expert parallelism 2 (ZeRO-2, so the optimizer state is partitioned
too) trains 5 steps and saves at step 3. At save time every rank also hands the live engine to
an independent gatherer (DeepSpeed's public getters + an all-gather of the expert slices), which
writes the full state: model weights, fp32 master weights, exp_avg, exp_avg_sq and EMA of every
parameter with all experts in global order, Adam's step counts and the LR schedule position.

That checkpoint is resumed on 2 ranks with EP=1, on 2 ranks with EP=2, on 4 ranks with EP=4 and
on 4 ranks with tensor parallelism 2 (+ sequence parallelism) and EP=2. Right after loading, the
same gatherer runs again (joining TP blocks too): its dump must equal the saved one exactly.

Then two more steps run, and their losses are compared with a run that had the same state:
- 4 ranks, EP=4: data-parallel size 4 as when saved, so every rank continues the saved data
  stream and draws the saved noise; the reference is the uninterrupted saved run's steps 4-5.
  Only expert placement differs (the same experts compute on other ranks), so the losses agree
  to rounding (1e-5, as in test_expert_parallel_training.py).
- 2 ranks, or 4 ranks with TP=2: another data-parallel size, so the data stream restarts
  (data.restart_stream_on_resume) and the noise is keyed by other data-parallel ranks: no run at
  the saved layout saw these batches. The reference is a run at the same new layout that took the same state another way:
  straight from the save-time dump through DeepSpeed's public setters (no files, no DCP, no
  resharding). Same layout, same state, same batches: the losses must be identical.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from tests.distributed.launch_helpers import REPO, free_port, spawn

CONFIG = str(REPO / "configs" / "tiny_moe.yaml")
SAVED_STEP, STEPS = 3, 5
SMALL = [
    "model.dim=64",
    "model.num_layers=2",
    "model.ffn_dim=256",
    "model.moe.num_experts=4",
    "model.moe.bias_balancing=true",
    "optim.zero_stage=2",
    "optim.warmup_steps=2",
    "optim.grad_clip=1.0",
    "logging.every_steps=1",
    "model.moe.diagnostics_every=0",
    f"train.steps={STEPS}",
    "train.ema_decay=0.7",
]
KINDS = ("model", "master", "exp_avg", "exp_avg_sq", "ema")


def split(param):
    """(group, dim) of a parameter a rank holds a block of: experts over EP, TP weights over TP."""
    from megatron.core import parallel_state

    if getattr(param, "allreduce", True) is False:
        return parallel_state.get_expert_model_parallel_group(), 0
    if getattr(param, "tensor_model_parallel", False):
        return parallel_state.get_tensor_model_parallel_group(), param.partition_dim
    return None


def gathered_state(engine, ema) -> dict:
    """Collective: the full training state of `engine` and `ema`, experts in global order (independent
    of megamoe's checkpoint code)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        values = {
            "model": p.detach().float(),
            "master": safe_get_full_fp32_param(p),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq"),
            "ema": ema.shadow[name],
        }
        if split(p) is not None:
            group, dim = split(p)
            for kind, value in values.items():
                parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, value.contiguous(), group=group)
                values[kind] = torch.cat(parts, dim=dim)
        out[name] = {k: v.cpu().clone() for k, v in values.items()}
    out["buffers"] = {n: b.cpu().clone() for n, b in engine.module.named_buffers() if "expert_bias" in n}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out["adam_steps"] = sorted({float(s["step"]) for s in inner.state.values()})
    out["schedule"] = (engine.lr_scheduler.last_epoch, engine.lr_scheduler.get_last_lr()[0], engine.global_steps)
    return out


@torch.no_grad()
def load_from_dump(engine, ema, dump: dict) -> None:
    """The reference's way in: the save-time dump through DeepSpeed's public setters, sliced by hand."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megamoe.train.sharded_state import ensure_optimizer_state

    ensure_optimizer_state(engine)  # torch creates Adam's state only at the first step
    for name, p in engine.module.named_parameters():
        full = dump[name]
        if split(p) is not None:
            group, dim = split(p)
            n = p.shape[dim]
            full = {k: v.narrow(dim, dist.get_rank(group) * n, n) for k, v in full.items()}
        p.copy_(full["model"])
        safe_set_full_fp32_param(p, full["master"])
        safe_set_full_optimizer_state(p, full["exp_avg"], "exp_avg")
        safe_set_full_optimizer_state(p, full["exp_avg_sq"], "exp_avg_sq")
        ema.shadow[name].copy_(full["ema"])
    for name, b in engine.module.named_buffers():
        if name in dump["buffers"]:
            b.copy_(dump["buffers"][name])
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        state["step"].fill_(dump["adam_steps"][0])
    last_epoch, lr, engine.global_steps = dump["schedule"]
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(
        {**scheduler.state_dict(), "last_epoch": last_epoch, "_last_lr": [lr] * len(scheduler.base_lrs)}
    )


def _train(rank, world, overrides, out, resume, reference_dump):
    """One run of megamoe's real training loop, with the checkpoint calls observed (or, for a
    reference, the load replaced by `load_from_dump`)."""
    from megamoe.config import load_config
    from megamoe.config_checks import validate
    from megamoe.parallel.topology import destroy_distributed, init_distributed
    from megamoe.train import loop
    from megamoe.train.engine import resync_lr

    out = Path(out)
    cfg = load_config(CONFIG, [*SMALL, *overrides, f"train.output_dir={out}"])
    validate(cfg, world_size=world)
    topology = init_distributed(cfg.parallel, torch.device("cpu"))
    real_save, real_load = loop.save_checkpoint, loop.load_checkpoint
    averages = []

    class RecordedEMA(loop.EMA):  # the loop's EMA, for the gatherer
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            averages.append(self)

    def save(engine, cfg, state, *args, **kwargs):
        path = real_save(engine, cfg, state, *args, **kwargs)
        dump = gathered_state(engine, averages[0])
        if rank == 0:
            torch.save(dump, out / f"saved_{state.step}.pt")
        return path

    def load(engine, path, topology, state):
        if reference_dump is None:
            real_load(engine, path, topology, state)
        else:  # what load_checkpoint does after restoring the engine, with the engine restored from the dump
            load_from_dump(engine, state.ema, torch.load(reference_dump, weights_only=True))
            resync_lr(engine)
            state.load_state_dict(torch.load(Path(path) / f"rank_{rank:05d}.pt", weights_only=True))
        dump = gathered_state(engine, state.ema)
        if rank == 0:
            torch.save(dump, out / "loaded.pt")

    originals = loop.save_checkpoint, loop.load_checkpoint, loop.EMA
    loop.save_checkpoint, loop.load_checkpoint, loop.EMA = save, load, RecordedEMA
    try:
        history = loop.train(cfg, topology, resume)
        if rank == 0:
            (out / "history.json").write_text(json.dumps({m["step"]: m for m in history}))
    finally:
        loop.save_checkpoint, loop.load_checkpoint, loop.EMA = originals
        destroy_distributed()


def _train_runs(rank, world, runs, ports):
    """Several runs one after the other on the same ranks (starting ranks costs more than a run),
    each on a store of its own: a second default group on the first one's store would wait forever."""
    for run, port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        _train(rank, world, *run)


def history(out: Path) -> dict[int, dict]:
    return {int(k): v for k, v in json.loads((out / "history.json").read_text()).items()}


def train(world, runs) -> None:
    """`runs` (overrides, output dir, resume from, reference dump) one after the other on `world` new ranks."""
    for _, out, _, _ in runs:
        Path(out).mkdir(parents=True)
    spawn(_train_runs, world, runs, [free_port() for _ in runs])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_cache):
    """The 4-rank EP=2 run: its checkpoint at step 3, the save-time dump and its losses."""
    out = tmp_path_factory.mktemp("saved") / "run"
    train(
        4,
        [
            (
                [
                    f"data.cache_dir={data_cache}",
                    "parallel.expert_parallel_size=2",
                    "data.micro_batch_size=2",
                    f"checkpoint.every_steps={SAVED_STEP}",
                ],
                out,
                None,
                None,
            )
        ],
    )
    return out / "checkpoints" / f"step_{SAVED_STEP:08d}", torch.load(out / f"saved_{SAVED_STEP}.pt"), history(out)


def assert_same_state(loaded: dict, saved: dict):
    params = [k for k in saved if k not in ("buffers", "adam_steps", "schedule")]
    assert sorted(k for k in loaded if k not in ("buffers", "adam_steps", "schedule")) == sorted(params)
    assert any(saved[k]["model"].shape[0] == 4 for k in params if ".experts." in k)  # all 4 experts, gathered
    for name in params:
        for kind in KINDS:
            assert torch.equal(loaded[name][kind], saved[name][kind]), (name, kind)
    assert saved["buffers"] and all(torch.equal(loaded["buffers"][n], b) for n, b in saved["buffers"].items())
    assert loaded["adam_steps"] == saved["adam_steps"] == [float(SAVED_STEP)]
    assert loaded["schedule"] == saved["schedule"]


@pytest.mark.parametrize("world, tp, ep, micro_batch", [(2, 1, 1, 4), (2, 1, 2, 4), (4, 1, 4, 2), (4, 2, 2, 4)])
def test_resume_at_another_layout(world, tp, ep, micro_batch, saved, tmp_path, data_cache):
    """Layouts (ranks, TP, EP): (2, 1, 1), (2, 1, 2), (4, 1, 4) and, tensor parallel with sequence
    parallelism, (4, 2, 2): global batch 8 everywhere."""
    path, saved_dump, uninterrupted = saved
    overrides = [
        f"data.cache_dir={data_cache}",
        f"parallel.expert_parallel_size={ep}",
        f"parallel.tensor_parallel_size={tp}",
        f"data.micro_batch_size={micro_batch}",
        f"checkpoint.every_steps={STEPS}",
    ]
    if world // tp != 4:  # another data-parallel size: the stream restarts
        overrides.append("data.restart_stream_on_resume=true")
    runs = [(overrides, tmp_path / "resumed", path, None)]
    if world // tp != 4:  # and the reference run follows on the same ranks
        dump_file = tmp_path / "saved_dump.pt"
        torch.save(saved_dump, dump_file)
        runs.append((overrides, tmp_path / "reference", path, dump_file))
    train(world, runs)
    resumed = history(tmp_path / "resumed")
    assert_same_state(torch.load(tmp_path / "resumed" / "loaded.pt"), saved_dump)
    assert sorted(resumed) == list(range(SAVED_STEP + 1, STEPS + 1))

    if world // tp == 4:
        for step in resumed:
            for name in ("loss", "grad_norm"):
                assert abs(resumed[step][name] - uninterrupted[step][name]) < 1e-5, (step, name)
    else:
        reference = history(tmp_path / "reference")
        assert_same_state(torch.load(tmp_path / "reference" / "loaded.pt"), saved_dump)
        for step in resumed:
            for name in ("loss", "grad_norm", "lr"):
                assert resumed[step][name] == reference[step][name], (step, name)


def test_convert_to_one_safetensors_file_and_back(saved, tmp_path, capsys):
    """launcher/convert_checkpoint.py, in one process: the checkpoint's full weights (experts gathered
    from the EP=2 layout that wrote them) equal the save-time dump; back to an init_from folder."""
    from safetensors.torch import load_file

    from launcher.convert_checkpoint import main
    from megamoe.config import load_config
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights, read_state_dict

    path, dump, _ = saved
    params = [k for k in dump if k not in ("buffers", "adam_steps", "schedule")]
    assert main(["to-safetensors", str(path), str(tmp_path / "full.safetensors")]) == 0
    full = load_file(tmp_path / "full.safetensors")
    assert all(torch.equal(full[n].float(), dump[n]["model"]) for n in params)
    assert all(torch.equal(full[n], b) for n, b in dump["buffers"].items())
    exported = read_state_dict(path / "weights")  # the sharded export, each tensor written by one rank
    assert exported.keys() == full.keys() and all(torch.equal(exported[k], full[k]) for k in full)
    # The EMA export: the same model (buffers included) with every parameter's EMA, experts in global order.
    averaged = read_state_dict(path / "ema_weights")  # sharded: read through its index
    assert averaged.keys() == full.keys()
    assert all(torch.equal(averaged[n], dump[n]["ema"]) for n in params)
    assert all(torch.equal(averaged[n], b) for n, b in dump["buffers"].items())
    assert not all(torch.equal(dump[n]["ema"], dump[n]["master"]) for n in params)
    assert main(["to-safetensors", str(path), str(tmp_path / "master.safetensors"), "--master"]) == 0
    master = load_file(tmp_path / "master.safetensors")
    assert all(torch.equal(master[n], dump[n]["master"]) for n in params)

    # Back: a checked diffusers folder that train.init_from loads.
    assert (
        main(
            ["from-safetensors", str(tmp_path / "full.safetensors"), str(tmp_path / "init"), "--config", CONFIG, *SMALL]
        )
        == 0
    )
    model = build_model(load_config(CONFIG, SMALL).model)
    load_diffusers_weights(model, tmp_path / "init")
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())

    # The wrong model config is one line naming the fix, and nothing is written.
    capsys.readouterr()
    assert (
        main(["from-safetensors", str(tmp_path / "full.safetensors"), str(tmp_path / "bad"), "--config", CONFIG]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.dim=64" in err and not (tmp_path / "bad").exists()


def test_convert_weights_of_another_router_names_model_moe_router(tmp_path, capsys):
    """A bare .safetensors file records no config: weights of a Selective Sinkhorn model converted with
    the default (linear) router differ only in router tensors, and the one-line error says so and names
    model.moe.router, not 'incomplete or a different Wan variant'."""
    from safetensors.torch import save_file

    from launcher.convert_checkpoint import main
    from megamoe.config import load_config
    from megamoe.model.dit import build_model

    ssr = [
        "model.moe.router=selective_sinkhorn",
        "model.moe.bias_balancing=false",
        "model.moe.balance_loss=0",
        "model.moe.z_loss=0",
    ]
    model = build_model(load_config(CONFIG, [*SMALL, *ssr]).model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ssr.safetensors"))
    convert = ["from-safetensors", str(tmp_path / "ssr.safetensors"), str(tmp_path / "out"), "--config", CONFIG]
    capsys.readouterr()
    code = main([*convert, *SMALL])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "out").exists(), err
    assert "router.coin_step" in err and "model.moe.router=linear" in err and "Wan variant" not in err
    assert main([*convert, *SMALL, *ssr]) == 0  # the fix it names


def test_corrupt_state_file_is_one_error_on_every_rank_and_left_untouched(saved, tmp_path, data_cache):
    """A state file of the right size but garbage inside fails every rank's check before DCP's
    collective load (no rank is left waiting in a collective: the run exits instead of hanging),
    through the real launcher at another layout."""
    import shutil

    from tests.distributed.launch_helpers import pretrain

    path = tmp_path / "run" / "checkpoints" / saved[0].name
    shutil.copytree(saved[0], path)
    victim = max((path / "state").glob("*.safetensors"))
    victim.write_bytes(b"\0" * victim.stat().st_size)  # passes the size check, fails to parse
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    result = pretrain(
        [
            "--config",
            CONFIG,
            *SMALL,
            f"train.output_dir={tmp_path / 'run'}",
            f"data.cache_dir={data_cache}",
            "data.micro_batch_size=4",
            "data.restart_stream_on_resume=true",
            "--resume",
            str(path),
        ],
        nproc=2,
        check=False,
    )
    assert result.returncode != 0
    # Both ranks find it; the stop is agreed, so the line is printed once, by rank 0.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "could not be loaded" in errors[0] and "header" in errors[0], result.stderr[-2000:]
    assert before == {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
