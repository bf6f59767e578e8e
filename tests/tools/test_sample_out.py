"""launcher/sample.py refuses an --out PyAV cannot write (no .mp4 extension, a missing folder) with one
line, before it reads the checkpoint or samples anything."""

import av
import numpy as np
import pytest

from launcher.sample import main as sample
from megamoe.tools.mp4_writer import write_video


def test_out_without_mp4_is_refused_before_sampling(tmp_path, capsys):
    out = tmp_path / "clip"
    with pytest.raises(ValueError):  # what the user met after sampling: PyAV cannot pick a container
        write_video(str(out), np.zeros((1, 16, 16, 3), np.uint8), fps=8)
    code = sample(["--checkpoint", str(tmp_path / "none"), "--caption", "a red circle", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == f"error: --out '{out}' does not end in .mp4 (the clips are written as mp4); e.g. --out {out}.mp4"
    assert not any(tmp_path.iterdir())


def test_out_in_a_missing_folder_is_refused_before_sampling(tmp_path, capsys):
    out = tmp_path / "missing" / "clip.mp4"
    code = sample(["--checkpoint", str(tmp_path / "none"), "--caption", "a red circle", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: --out '{out}': folder '{out.parent}' does not exist; create it or pick another"


def test_write_video_accepts_an_upper_case_extension(tmp_path):
    out = tmp_path / "clip.MP4"
    write_video(str(out), np.zeros((2, 16, 16, 3), np.uint8), fps=8)
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["--frames", "3"],
            "gives the latent (3, 16, 16), not divisible by model.patch_size=[5, 2, 2]; e.g. --frames 5",
        ),
        (["--frames", "0"], "--frames 0 and --size 16 must be at least 1"),
        (["--size", "15"], "not divisible by model.patch_size=[5, 2, 2]; e.g. --frames 5 --size 14"),
        (["--size", "200"], "beyond model.rope_max_seq_len=64 on one axis; e.g. --frames 5 --size 128"),
    ],
)
def test_a_latent_the_model_cannot_take_is_refused_before_loading_weights(tmp_path, capsys, args, needle):
    """tiny.yaml's tubelets are 5 frames deep: --frames 3 was a traceback from inside the model."""
    from megamoe.config import load_config
    from tests.train.test_checkpoint_checks import fake_checkpoint

    checkpoint = fake_checkpoint(tmp_path, 4, load_config("configs/tiny.yaml"))  # no weights: never loaded
    code = sample(["--checkpoint", str(checkpoint), "--caption", "a red circle", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
