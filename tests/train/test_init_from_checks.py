"""A `train.init_from` that cannot be loaded is refused by launcher/pretrain.py in one line, exit code 2,
before any process group exists (main() returns here, in this process, without one): shapes
that do not fit the config, an index naming a missing shard, a truncated file. Only headers are
read; the files are left as they were."""

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from launcher.pretrain import main
from megamoe.config import MoEConfig, load_config
from megamoe.model.dit import WanDiT
from megamoe.model.weights import INDEX_NAME, WEIGHTS_NAME, write_config, write_diffusers_weights

CONFIG = "configs/tiny_moe.yaml"
SMALL = ["model.dim=32", "model.num_layers=2", "model.num_heads=4", "model.ffn_dim=64", "model.moe.num_experts=4"]


def dense_model_config(*overrides):
    return dataclasses.replace(load_config(CONFIG, [*SMALL, *overrides]).model, moe=MoEConfig())


def run(tmp_path, capsys, source):
    code = main(["--config", CONFIG, *SMALL, f"train.output_dir={tmp_path / 'out'}", f"train.init_from={source}"])
    err = capsys.readouterr().err.strip()
    print(err)
    assert not dist.is_initialized()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(n in err for n in needles), err


def sharded(tmp_path, cfg):
    """A dense diffusers folder sharded over two files; returns (folder, second shard)."""
    state = WanDiT(cfg).state_dict()
    keys = sorted(state)
    folder = tmp_path / "dense"
    folder.mkdir()
    parts = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, part in parts.items():
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": {k: n for n, p in parts.items() for k in p}}))
    write_config(cfg, folder)
    return folder, folder / "b.safetensors"


def test_dense_source_of_other_shape(tmp_path, capsys):
    cfg = dense_model_config("model.ffn_dim=128")
    write_diffusers_weights(WanDiT(cfg).state_dict(), cfg, tmp_path / "wide")
    assert_one_line_error(*run(tmp_path, capsys, tmp_path / "wide"), str(tmp_path / "wide"), "model.ffn_dim=128")
    (tmp_path / "wide" / "config.json").unlink()  # the tensor shapes alone name the key and the field
    assert_one_line_error(
        *run(tmp_path, capsys, tmp_path / "wide"),
        "blocks.0.ffn.net.0.proj.weight of shape (128, 32)",
        "model.ffn_dim=128",
    )


def test_index_naming_a_missing_shard(tmp_path, capsys):
    folder, second = sharded(tmp_path, dense_model_config())
    second.unlink()
    assert_one_line_error(
        *run(tmp_path, capsys, folder), "names shard 'b.safetensors', which does not exist", "re-download"
    )


@pytest.mark.parametrize("cut", [1, 4096])
def test_truncated_safetensors_file(tmp_path, capsys, cut):
    folder, second = sharded(tmp_path, dense_model_config())
    data = second.read_bytes()
    second.write_bytes(data[:-cut])
    before = {p: p.read_bytes() for p in folder.iterdir()}
    assert_one_line_error(*run(tmp_path, capsys, folder), f"{second}' is truncated", "re-download")
    assert before == {p: p.read_bytes() for p in folder.iterdir()}


def test_single_file_and_checkpoint_directory_are_accepted_sources(tmp_path, capsys):
    """The checks pass (and main goes on to train) for a good source; here the run itself is not
    wanted, so the check function is called as main calls it."""
    from megamoe.parallel.sharded_weights import open_init_source

    cfg = load_config(CONFIG, SMALL).model
    dense = dense_model_config()
    write_diffusers_weights(WanDiT(dense).state_dict(), dense, tmp_path / "ckpt" / "weights")
    (tmp_path / "ckpt" / "meta.json").write_text("{}")
    source, upcycle = open_init_source(tmp_path / "ckpt", cfg)  # a megamoe checkpoint: its weights/ export
    assert upcycle and source.what == f"checkpoint '{tmp_path / 'ckpt' / 'weights'}'"
    source, upcycle = open_init_source(tmp_path / "ckpt" / "weights" / WEIGHTS_NAME, dense)
    assert not upcycle and len(source.shapes) == len(WanDiT(dense).state_dict())
    assert torch.equal(source.read("proj_out.bias", (slice(1, 3),)), torch.zeros(2))
