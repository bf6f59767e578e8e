"""benchmarks/sample_quality.py's metric, on clips whose answers are known by construction, and the
warning for caption words the synthetic data never uses."""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks import sample_quality as sq
from megamoe.tools.synthetic_data import BACKGROUND, COLOURS, DIRECTIONS, embed_caption, unknown_words


def blank(frames=5, size=16):
    """float [3, F, S, S] in [0, 1] of the background colour."""
    return np.broadcast_to(np.asarray(BACKGROUND)[:, None, None, None], (3, frames, size, size)).copy()


def paint(clip, frame, x, y, w, h, colour="red"):
    """A w x h box with its top-left pixel at (x, y) in one frame."""
    clip[:, frame, y : y + h, x : x + w] = np.asarray(COLOURS[colour])[:, None, None]


def moving_box(dx, dy, colour="red", frames=5):
    clip = blank(frames)
    for f in range(frames):
        paint(clip, f, 6 + dx * f, 6 + dy * f, 4, 4, colour)
    return clip


def test_ground_truth_clips_pass_every_question():
    clips = sq.ground_truth_clips(frames=5, size=16, seeds=1)
    assert len(clips) == 80 and all(len(v) == 1 for v in clips.values())
    for (shape, colour, direction), (clip,) in clips.items():
        s = sq.score_clip(clip, colour, direction)
        assert s["colour"] and s["single"] and s["direction"], (shape, colour, direction, s)


@pytest.mark.parametrize("colour", list(COLOURS))
def test_colour_is_the_palette_colour_of_most_foreground_pixels(colour):
    clip = moving_box(1, 0, colour)
    paint(clip, 0, 0, 0, 2, 2, "green" if colour != "green" else "blue")  # a minority of another colour
    for caption_colour in COLOURS:
        assert sq.score_clip(clip, caption_colour, "right")["colour"] == (caption_colour == colour)
    # Slightly off-palette pixels (a model never hits the colour exactly) still find their colour.
    off = np.clip(clip + 0.1 * (np.arange(16) % 2 - 0.5)[None, None, None, :], 0, 1)
    assert sq.score_clip(off, colour, "right")["colour"]


def test_two_blobs_are_not_a_single_object_and_specks_are_ignored():
    two = moving_box(1, 0)
    for f in range(5):
        paint(two, f, 0, 12, 3, 3)  # a second 9-pixel object in every frame
    s = sq.score_clip(two, "red", "right")
    assert s["objects"] == [2] * 5 and not s["single"]

    specks = moving_box(1, 0)
    paint(specks, 2, 0, 0, 2, 1)  # 2 pixels < MIN_AREA
    assert sq.score_clip(specks, "red", "right")["objects"] == [1] * 5
    # Diagonal neighbours are one component (8-connectivity), so a thin diagonal edge does not split a shape.
    diagonal = blank()
    for f in range(5):
        for i in range(4):
            paint(diagonal, f, 4 + i + f, 4 + i, 1, 1)
    assert sq.score_clip(diagonal, "red", "right")["single"]


def test_single_needs_more_than_half_of_the_frames():
    clip = moving_box(1, 0)
    for f in (0, 1):
        paint(clip, f, 0, 12, 3, 3)
    assert sq.score_clip(clip, "red", "right")["objects"] == [2, 2, 1, 1, 1]
    assert sq.score_clip(clip, "red", "right")["single"]  # 3 of 5 frames
    paint(clip, 2, 0, 12, 3, 3)
    assert not sq.score_clip(clip, "red", "right")["single"]  # 2 of 5


@pytest.mark.parametrize("dx, dy, passes", [(1, 0, "right"), (-1, 0, "left"), (0, 1, "down"), (0, -1, "up")])
def test_direction_is_the_sign_of_the_centroid_travel_along_the_caption_axis(dx, dy, passes):
    clip = moving_box(dx, dy)
    for direction in ("left", "right", "up", "down"):
        s = sq.score_clip(clip, "red", direction)
        assert s["direction"] == (direction == passes), direction
    assert sq.score_clip(clip, "red", passes)["travel"] == pytest.approx(4.0)  # 1 pixel per frame, 4 steps


def test_a_still_object_or_an_empty_clip_passes_nothing_it_should_not():
    still = moving_box(0, 0)
    assert not any(sq.score_clip(still, "red", d)["direction"] for d in ("left", "right", "up", "down"))
    # Under MIN_TRAVEL: a half-pixel drift of the centroid is not motion.
    drift = moving_box(0, 0)
    paint(drift, 4, 10, 6, 1, 4)  # widens the last frame's box by one column: centroid +0.5 px
    assert sq.score_clip(drift, "red", "right")["travel"] == pytest.approx(0.5)
    assert not sq.score_clip(drift, "red", "right")["direction"]
    empty = sq.score_clip(blank(), "red", "right")
    assert empty == {
        "colour": False,
        "single": False,
        "direction": False,
        "objects": [0] * 5,
        "travel": None,
        "motion": None,
    }


def test_motion_is_the_mean_centroid_step_and_how_straight_the_path_is():
    """A straight path keeps its direction (cosine 1); a zig-zag of the same steps reverses it every
    frame (cosine -1); a still object has steps of 0 and no cosine."""
    assert sq.motion(sq.foreground_mask(moving_box(1, 0))) == pytest.approx((1.0, 1.0))
    assert sq.motion(sq.foreground_mask(moving_box(1, 1))) == pytest.approx((2**0.5, 1.0))
    zigzag = blank()
    for f, x in enumerate([6, 8, 6, 8, 6]):
        paint(zigzag, f, x, 6, 4, 4)
    assert sq.motion(sq.foreground_mask(zigzag)) == pytest.approx((2.0, -1.0))
    assert sq.motion(sq.foreground_mask(moving_box(0, 0))) == (0.0, None)
    # Over the vocabulary: the 20 "right" captions move straight, the other 60 zig-zag.
    scores = {k: [sq.score_clip(moving_box(1, 0) if k[2] == "right" else zigzag, "red", k[2])] for k in sq.vocabulary()}
    assert sq.summarise(scores)["motion"] == pytest.approx({"mean_step_px": 1.75, "mean_turn_cosine": -0.5})


def test_ground_truth_mode_meets_the_targets_and_check_fails_on_a_miss(tmp_path, monkeypatch, capsys):
    out = tmp_path / "gt.json"
    assert sq.main(["--ground-truth", "--seeds", "1", "--json", str(out), "--check"]) == 0
    figures = json.loads(out.read_text())
    assert figures["overall"] == {"colour": 1.0, "single": 1.0, "direction": 1.0} and figures["samples"] == 80
    assert figures["missed"] == []

    # The same clips with a second object in every frame: one-object share 0 misses its target.
    real = sq.ground_truth_clips

    def doubled(frames, size, seeds):
        clips = real(frames, size, seeds)
        for v in clips.values():
            for clip in v:
                for f in range(frames):
                    paint(clip, f, 0, 0, 2, 2, "white")
                    paint(clip, f, 14, 14, 2, 2, "white")
        return clips

    monkeypatch.setattr(sq, "ground_truth_clips", doubled)
    assert sq.main(["--ground-truth", "--seeds", "1"]) == 0  # without --check: figures only
    assert sq.main(["--ground-truth", "--seeds", "1", "--check"]) == 1
    assert "missed targets: single" in capsys.readouterr().err


def test_captions_with_unknown_words_warn_naming_them():
    assert unknown_words("A Red circle moving right") == []
    assert unknown_words("a red dog moving right fast dog") == ["dog", "fast"]
    with pytest.warns(UserWarning, match="never uses: dog, fast;"):
        embed_caption("a red dog moving right fast", 8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embed_caption("a red circle moving right", 8, 4)
        embed_caption("a red dog", 8, 4, warn_unknown=False)

    from launcher.sample import load_text_embedding

    cfg = SimpleNamespace(data=SimpleNamespace(text_len=8), model=SimpleNamespace(text_dim=4))
    with pytest.warns(UserWarning, match="never uses: purple;"):
        load_text_embedding(SimpleNamespace(text_embedding=None, caption="a purple circle moving up"), cfg)


class ReadsOneWord(torch.nn.Module):
    """Predicts a velocity of the mean of one caption row (the `row`-th word) everywhere: a model that
    uses that word and no other."""

    def __init__(self, row: int):
        super().__init__()
        self.row = row
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, latents, timestep, text):
        return self.scale * text[:, self.row].mean(1).view(-1, 1, 1, 1, 1).expand_as(latents)


@pytest.mark.parametrize("row, changed", [(1, "colour changed"), (4, "direction reversed")])
def test_word_use_changes_one_word_per_variant(row, changed):
    """Captions are "a <colour> <shape> moving <direction>": the colour is word 1, the direction word 4.
    A model that reads only word `row` sees its loss move only under the variant that changes that word."""
    cfg = SimpleNamespace(
        data=SimpleNamespace(synthetic_frames=5, synthetic_size=16, text_len=8), model=SimpleNamespace(text_dim=32)
    )
    losses = sq.word_use(ReadsOneWord(row), cfg, clips=16, batch=8)
    assert list(losses) == ["caption", "direction reversed", "colour changed", "null"]
    for variant, loss in losses.items():
        same = variant not in (changed, "null")
        assert (loss == losses["caption"]) == same, (variant, loss["loss"], losses["caption"]["loss"])


def test_changed_captions_reverse_the_direction_and_change_only_the_colour():
    keys = sq.vocabulary()
    captions = sq.changed_captions(keys)
    for (shape, colour, direction), reversed_, recoloured in zip(
        keys, captions["direction reversed"], captions["colour changed"]
    ):
        a, b = DIRECTIONS[direction], DIRECTIONS[reversed_.split()[-1]]
        assert a[0] * b[0] + a[1] * b[1] == -1.0, (direction, reversed_)  # the same axis, the other way
        assert reversed_.split()[:-1] == ["a", colour, shape, "moving"]
        new_colour = recoloured.split()[1]
        assert new_colour != colour and new_colour in COLOURS
        assert recoloured.split() == ["a", new_colour, shape, "moving", direction]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--ground-truth", "--word-use"], "--word-use scores a model"),
        (["--ground-truth", "--seeds", "0"], "--seeds 0 must be at least 1"),
        (["--ground-truth", "--steps", "0"], "--steps 0 must be at least 1"),
        (["--ground-truth", "--word-use-clips", "0"], "--word-use-clips 0 must be in 1..4096"),
        (["--ground-truth", "--word-use-clips", "4097"], "--word-use-clips 4097 must be in 1..4096"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(args, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        sq.main(args)
    assert stop.value.code == 2 and needle in capsys.readouterr().err
