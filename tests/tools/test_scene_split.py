"""Scene segments: cuts found where constructed videos cut, one scene per segment file, captions by
overlap, short scenes counted, and the loader's own decode path never giving a clip across a cut.

The reference is the construction: shots of distinct solid colours (a white square moving in each,
so no shot is a still image) with hard cuts at known frames, so every decoded frame tells its shot.
"""

import importlib.util
import io
import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest

from megamoe.data.errors import CORRUPT_VIDEO, MISSING_MEMBER, TOO_SHORT
from megamoe.data.video import FrameSpec, decode_raw_sample, probe_video
from megamoe.tools.latent_shards import read_shard
from megamoe.tools.scene_split import (
    Segment,
    SegmentCaption,
    caption_for,
    detect_cuts,
    match_captions_to_videos,
    split_video,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLOURS = {"red": (220, 40, 40), "green": (40, 140, 40), "blue": (40, 50, 230), "yellow": (180, 170, 20)}
FPS = 25
# (colour, frames): cuts at frames 20, 50 and 60; the blue shot (10 frames, 0.36 s) is too short
# for 9 frames at 16 fps (0.5 s) and is counted, not written.
SHOTS = [("red", 20), ("green", 30), ("blue", 10), ("yellow", 25)]
CUT_FRAMES = [20, 50, 60]


def shot_frames(shots, height=48, width=64) -> list[np.ndarray]:
    frames = []
    for colour, count in shots:
        for i in range(count):
            frame = np.empty((height, width, 3), np.uint8)
            frame[:] = COLOURS[colour]
            x = (i * 3) % (width - 8)
            frame[20:28, x : x + 8] = 255
            frames.append(frame)
    return frames


def write_mp4(path, frames, pts=None, time_base=Fraction(1, FPS), rotation=0, pix_fmt="yuv420p"):
    """libx264 mp4 of uint8 RGB frames; `pts` in `time_base` units (default 0, 1, 2, ...)."""
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.time_base = stream.codec_context.time_base = time_base
        stream.options = {"crf": "12", "preset": "ultrafast"}
        if rotation:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = (i if pts is None else pts[i]), time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def colour_of(image: np.ndarray) -> str:
    """The shot colour nearest to the frame's median colour (the moving square is a small minority)."""
    median = np.median(image.reshape(-1, 3), axis=0)
    return min(COLOURS, key=lambda c: np.abs(median - COLOURS[c]).sum())


def decoded_colours(data: bytes) -> list[str]:
    with av.open(io.BytesIO(data)) as container:
        return [colour_of(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def shots_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("shots") / "shots.mp4"
    write_mp4(path, shot_frames(SHOTS))
    return str(path)


def test_cuts_are_found_within_one_frame_of_the_constructed_ones(shots_video):
    cuts = detect_cuts(shots_video)
    assert len(cuts) == len(CUT_FRAMES)
    for found, frame in zip(cuts, CUT_FRAMES):
        assert abs(found - Fraction(frame, FPS)) <= Fraction(1, FPS), (float(found), frame)


def test_each_segment_holds_the_frames_of_one_scene_at_the_source_timing(shots_video):
    cuts = [Fraction(f, FPS) for f in CUT_FRAMES]
    segments = list(split_video(shots_video, cuts))
    assert [s.frames for s in segments] == [n for _, n in SHOTS]
    starts = [0, *CUT_FRAMES]
    for segment, (colour, count), start in zip(segments, SHOTS, starts):
        assert decoded_colours(segment.data) == [colour] * count
        assert (segment.start, segment.last) == (Fraction(start, FPS), Fraction(start + count - 1, FPS))
        info = probe_video(segment.data)
        assert (info["frames"], info["fps"], info["height"], info["width"]) == (count, FPS, 48, 64)
    assert [s.end for s in segments] == [*cuts, Fraction(sum(n for _, n in SHOTS), FPS)]


def test_segments_keep_variable_frame_timing_and_display_rotation(tmp_path):
    """Frame times of a variable-rate source (ms time base, gaps of 20 to 80 ms) are kept, shifted
    so each segment starts at 0; the display rotation travels with each segment."""
    frames = shot_frames([("red", 6), ("blue", 6)])
    pts = [0, 40, 60, 140, 160, 200, 280, 300, 320, 400, 420, 460]
    path = tmp_path / "vfr.mp4"
    write_mp4(path, frames, pts, Fraction(1, 1000), rotation=90)
    first, second = split_video(str(path), [Fraction(280, 1000)])
    for segment, expect in [(first, pts[:6]), (second, pts[6:])]:
        with av.open(io.BytesIO(segment.data)) as container:
            decoded = list(container.decode(video=0))
        times = [f.pts * f.time_base for f in decoded]
        assert times == [Fraction(p - expect[0], 1000) for p in expect]
        assert {f.rotation for f in decoded} == {90}
    assert (second.start, second.last) == (Fraction(280, 1000), Fraction(460, 1000))


def test_odd_frame_sides_lose_their_last_row_and_column(tmp_path):
    """4:2:0 needs even sides: a 47x63 source (4:4:4) gives 46x62 segments of its top-left pixels.
    Its last row and column are white, so a segment scaled instead of cropped shows white at its edges."""
    frames = [f[:47, :63].copy() for f in shot_frames([("green", 4), ("red", 4)])]
    for frame in frames:
        frame[-1], frame[:, -1] = 255, 255
    path = tmp_path / "odd.mp4"
    write_mp4(path, frames, pix_fmt="yuv444p")
    for segment, colour in zip(split_video(str(path), [Fraction(4, FPS)]), ("green", "red")):
        info = probe_video(segment.data)
        assert (info["height"], info["width"], info["frames"]) == (46, 62, 4)
        with av.open(io.BytesIO(segment.data)) as container:
            for frame in container.decode(video=0):
                image = frame.to_ndarray(format="rgb24").astype(int)
                edges = np.concatenate([image[-1], image[:, -1]])
                assert colour_of(image) == colour and np.abs(edges - COLOURS[colour]).max() < 40


def test_a_segment_is_long_enough_when_the_clip_span_fits_between_its_first_and_last_frames():
    """9 frames at 16 fps span 0.5 s: at 25 fps a scene needs 14 frames (0.52 s), 13 (0.48 s) is short."""

    def scene(frames):
        return Segment(
            0, Fraction(2), Fraction(2) + Fraction(frames, 25), Fraction(2) + Fraction(frames - 1, 25), frames, b""
        )

    assert scene(14).long_enough(9, 16.0) and not scene(13).long_enough(9, 16.0)
    assert scene(8).long_enough(5, 16.0) and not scene(7).long_enough(5, 16.0)  # 0.25 s: 0.28 s fits, 0.24 s not
    assert scene(17).long_enough(9, 12.5) and not scene(16).long_enough(9, 12.5)  # exactly 0.64 s fits


def test_a_segment_takes_the_caption_that_overlaps_it_longest_if_over_half():
    captions = [SegmentCaption(0.0, 1.0, "a", 1), SegmentCaption(0.8, 3.0, "b", 2), SegmentCaption(2.0, 4.0, "c", 3)]
    assert caption_for(0.0, 0.9, captions) == "a"  # a 0.9 s, b 0.1 s
    assert caption_for(0.5, 2.0, captions) == "b"  # a 0.5 s, b 1.2 s
    assert caption_for(2.0, 3.0, captions) == "b"  # a tie of 1 s each: the first listed
    assert caption_for(4.0, 5.0, captions) is None  # touching at 4.0 is no overlap
    assert caption_for(3.0, 6.0, captions) is None  # c covers 1 s of 3: less than half
    assert caption_for(2.5, 4.5, captions) == "c"  # c 1.5 s of 2: b's 0.5 s before it does not count


def load_make_shards():
    spec = importlib.util.spec_from_file_location("make_shards", os.path.join(ROOT, "data", "make_shards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_samples(out):
    samples = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            samples.update({key: (members, str(out / name)) for key, members in read_shard(str(out / name))})
    return samples


def test_make_shards_writes_one_captioned_sample_per_scene_and_counts_short_ones(shots_video, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    os.symlink(shots_video, folder / "film.mp4")
    (folder / "film.txt").write_text("the whole film")
    os.symlink(shots_video, folder / "other.mp4")  # no caption of its own: only its captioned scenes
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    (folder / "broken.txt").write_text("a broken file")
    lines = [
        {"video": "film.mp4", "start": 0.0, "end": 0.9, "caption": "a red   scene"},  # red 0-0.8 s
        {"video": "film", "start": 0.7, "end": 2.1, "caption": "a green scene"},  # green 0.8-2.0 s
        {"video": "other.mp4", "start": 2.5, "end": 3.4, "caption": "a yellow scene"},  # yellow 2.4-3.4 s
        {"video": "./film.mp4", "start": 3.4, "end": 9.0, "caption": "after the end"},  # film ends at 3.4 s
    ]
    captions = tmp_path / "segments.jsonl"
    captions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "raw"
    args = ["--videos", str(folder), "--out", str(out), "--split-scenes", "--segment-captions", str(captions)]
    report = load_make_shards().main([*args, "--min-frames", "9", "--fps", "16", "--quiet"])

    # film: red, green, yellow written (blue short); other: yellow only (red and green have no caption).
    assert report["samples"] == 4 and report["videos"] == 2 and report["skipped"] == {CORRUPT_VIDEO: 1}
    assert report["short_segments"] == 2 and report["uncaptioned_segments"] == 2
    assert report["captions_past_end"] == [4]
    out_line = capsys.readouterr().out
    assert "2 shorter than 9 frames at 16 fps, 2 without a caption" in out_line
    assert "warning: 1 segment caption(s) start after their video ends, so label no scene (lines 4)" in out_line
    samples = read_samples(out)
    film, other = "00000000", "00000001"  # keys in path order: broken.mp4 is skipped before a key
    expected = {
        f"{film}_s000": ("a red scene", "red", 0.0, 0.8),
        f"{film}_s001": ("a green scene", "green", 0.8, 2.0),
        f"{film}_s003": ("the whole film", "yellow", 2.4, 3.4),
        f"{other}_s003": ("a yellow scene", "yellow", 2.4, 3.4),
    }
    assert set(samples) == set(expected)
    index = {row["key"]: row for row in map(json.loads, (out / "index.jsonl").read_text().splitlines())}
    for key, (caption, colour, start, end) in expected.items():
        members, _ = samples[key]
        assert members["txt"].decode() == caption
        assert json.loads(members["json"]) == {"video": key.split("_")[0], "start": start, "end": end}
        assert (index[key]["start"], index[key]["end"]) == (start, end)
        assert set(decoded_colours(members["mp4"])) == {colour}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    # The blue shot: frames 50-59 at 25 fps, first to last 9/25 s; 9 frames at 16 fps span 8/16 s.
    short = [s["detail"] for s in skipped if s["cause"] == TOO_SHORT]
    assert short == ["spans 0.360 s (10 frames); a clip of 9 frames at 16 fps needs 0.500 s"] * 2
    assert sorted((s["cause"], s.get("segment")) for s in skipped) == [
        (CORRUPT_VIDEO, None),
        (MISSING_MEMBER, 0),
        (MISSING_MEMBER, 1),
        (TOO_SHORT, 2),
        (TOO_SHORT, 2),
    ]


def test_the_loader_never_draws_a_clip_across_a_cut(shots_video, tmp_path):
    """Through the loader's decode path (decode_raw_sample), many seeds: every clip of a segment is
    one colour. The unsplit video, decoded the same way, does give clips across a cut."""
    out = tmp_path / "raw"
    index = tmp_path / "index.jsonl"
    index.write_text(json.dumps({"path": shots_video, "caption": "shots"}) + "\n")
    load_make_shards().main(
        ["--index", str(index), "--out", str(out), "--split-scenes", "--min-frames", "9", "--quiet"]
    )
    spec = FrameSpec(num_frames=9, fps=16.0, height=32, width=32)
    rng = np.random.default_rng(0)
    samples = read_samples(out)
    assert len(samples) == 3
    for key, (members, shard) in samples.items():
        for _ in range(8):
            pixels = decode_raw_sample(key, members, shard, spec, rng)["pixels"]
            frames = ((pixels.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            assert len({colour_of(f) for f in frames}) == 1, key
    whole = {"mp4": open(shots_video, "rb").read(), "txt": b"shots"}
    mixed = 0
    for _ in range(8):
        pixels = decode_raw_sample("whole", whole, "none", spec, rng)["pixels"]
        frames = ((pixels.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        mixed += len({colour_of(f) for f in frames}) > 1
    assert mixed > 0


@pytest.mark.parametrize(
    "line, problem",
    [
        ("not json", "not a JSON object"),
        ('{"video": "film.mp4", "start": 1, "caption": "x"}', "missing end"),
        ('{"video": "film.mp4", "start": 2, "end": 1, "caption": "x"}', "0 <= start < end"),
        ('{"video": "film.mp4", "start": 0, "end": 1, "caption": "  "}', '"caption" must be a non-empty string'),
        ('{"video": "nowhere.mp4", "start": 0, "end": 1, "caption": "x"}', "names none of the input videos"),
        ('{"video": "film", "start": 0, "end": 1, "caption": "x"}', "names 2 input videos"),
    ],
)
def test_a_bad_segment_caption_line_stops_with_one_line_naming_file_and_line(tmp_path, capsys, line, problem):
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    for name in ("film.mp4", "sub/film.webm"):
        (folder / name).write_bytes(b"not opened: the caption file is checked first")
    captions = tmp_path / "segments.jsonl"
    captions.write_text(
        json.dumps({"video": "sub/film.webm", "start": 0, "end": 1, "caption": "fine"}) + "\n" + line + "\n"
    )
    args = [
        "--videos",
        str(folder),
        "--out",
        str(tmp_path / "out"),
        "--split-scenes",
        "--segment-captions",
        str(captions),
    ]
    with pytest.raises(SystemExit) as exit_info:
        load_make_shards().main(args)
    assert exit_info.value.code == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith(f"error: {captions}:2: ") and problem in message
    assert not (tmp_path / "out").exists()


def test_scene_flags_without_split_scenes_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_make_shards().main(["--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--min-frames", "9"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --min-frames set how scenes are cut: add --split-scenes"


def test_a_caption_file_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "film.mp4").write_bytes(b"not opened: the caption file is checked first")
    captions = tmp_path / "segments.jsonl"
    good = json.dumps({"video": "film.mp4", "start": 0, "end": 1, "caption": "fine"}).encode()
    captions.write_bytes(good + b"\n" + good.replace(b"fine", "caf\u00e9".encode("latin-1")) + b"\n")
    args = ["--videos", str(folder), "--out", str(tmp_path / "out"), "--split-scenes", "--segment-captions"]
    with pytest.raises(SystemExit) as exit_info:
        load_make_shards().main([*args, str(captions)])
    assert exit_info.value.code == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith(f"error: {captions}:2: not UTF-8 (byte ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value", [("--fps", "inf"), ("--fps", "nan"), ("--fps", "0"), ("--scene-threshold", "inf")]
)
def test_a_rate_or_threshold_that_is_not_a_finite_positive_number_is_refused(tmp_path, capsys, flag, value):
    args = ["--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--split-scenes", flag, value]
    with pytest.raises(SystemExit) as exit_info:
        load_make_shards().main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {flag} must be a finite number > 0, got {value}"


def test_caption_video_names_are_matched_normalised():
    caption = SegmentCaption(0.0, 1.0, "x", 1)
    paths = ["data/film.mp4", "data/sub/film.mp4", "./data/sub/other.mp4"]
    names = {"./sub/film.mp4": [caption], "sub//other.mp4": [caption], "data/./film.mp4": [caption]}
    matched = match_captions_to_videos(names, paths, "captions.jsonl")
    assert matched == {p: [caption] for p in paths}
