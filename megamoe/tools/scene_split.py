"""Cutting a long video at its shot boundaries into one self-contained video file per scene.

Shot boundaries come from PySceneDetect's ContentDetector (`detect_cuts`): a cut is a frame whose
HSV difference from the previous frame exceeds `threshold` (PySceneDetect's default 27 suits hard
cuts; lower finds softer ones). Every cut it finds is kept (min_scene_len 1 frame): PySceneDetect's
own default merges shots shorter than 15 frames into a neighbour, which would put a cut inside a
segment. A flash therefore gives a short segment, which the minimum length drops.

`split_video` decodes the video once and re-encodes each scene's frames with PyAV into its own mp4,
at the source's frame rate and time base, its timestamps shifted so the segment starts at 0, and
with the source's display rotation (video only: audio is not kept). Training then draws clips from one segment file at a time,
so a clip can never span a cut. Segment times are in seconds from the source's first frame, as
PySceneDetect reports them.

Segment captions (`read_segment_captions`) are JSON lines {"video", "start", "end", "caption"}.
A segment takes the caption whose [start, end) interval overlaps its own [start, end) for the
longest time (a tie goes to the caption listed first), if that covers at least half of the
segment; otherwise it takes the video's own caption (`caption_for`).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

from megamoe.config import DataConfig
from megamoe.data.errors import CORRUPT_VIDEO, SampleError
from megamoe.data.video import clip_fits
from megamoe.tools.mp4_writer import _pick_codec

DEFAULT_THRESHOLD = 27.0  # PySceneDetect ContentDetector's default


@dataclass(frozen=True)
class Segment:
    """One scene of a source video, written as its own mp4 (`data`).

    start, end: seconds from the source's first frame: `start` is this scene's first frame, `end`
    the next scene's first frame (the last scene: its last frame plus one average frame period).
    `last`: the time of its last frame. `frames`: how many source frames it holds.
    """

    index: int
    start: Fraction
    end: Fraction
    last: Fraction
    frames: int
    data: bytes

    @property
    def span(self) -> float:
        """Seconds from its first frame to its last: what a clip must fit in (variable frame rate too)."""
        return float(self.last - self.start)

    def long_enough(self, num_frames: int, fps: float) -> bool:
        """Whether a clip of `num_frames` frames at `fps` fits, by the loader's own rule (`clip_fits`)."""
        return clip_fits(self.span, num_frames, fps)


@dataclass(frozen=True)
class SegmentCaption:
    """One line of a segment caption file: `caption` for [start, end) seconds of a video."""

    start: float
    end: float
    caption: str
    line: int


@dataclass(frozen=True)
class SplitOptions:
    """How make_shards cuts videos into scene segments."""

    threshold: float = DEFAULT_THRESHOLD
    """ContentDetector threshold: the frame-to-frame HSV difference that makes a cut."""
    min_frames: int = DataConfig.video_frames
    """A segment must give a clip of this many frames at `fps` (data.video_frames); shorter ones are not written."""
    fps: float = DataConfig.video_fps
    """The training clip's frame rate (data.video_fps)."""
    captions: dict[str, list[SegmentCaption]] = field(default_factory=dict)
    """Segment captions by source video path (match_captions_to_videos)."""


def detect_cuts(path: str, threshold: float = DEFAULT_THRESHOLD) -> list[Fraction]:
    """Times (seconds from the first frame, exact) of the first frames of every scene after the first.

    Decodes with PyAV (PySceneDetect's `pyav` backend, without its OpenCV fallback, so the frames
    and timestamps are the ones `split_video` sees). Raises PySceneDetect's VideoOpenFailure or
    OSError for a file it cannot open.
    """
    from scenedetect import ContentDetector, SceneManager
    from scenedetect.backends.pyav import VideoStreamAv

    video = VideoStreamAv(path, suppress_output=True)  # True: keep FFmpeg's log lines off stderr
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=1))
    manager.detect_scenes(video)
    scenes = manager.get_scene_list(start_in_scene=True)
    return [Fraction(start.pts) * Fraction(start.time_base) for start, _ in scenes[1:]]


def split_video(path: str, cuts: list[Fraction]) -> Iterator[Segment]:
    """Decode `path` once and yield one Segment per scene, cut before each time in `cuts`.

    A frame belongs to the last scene whose first frame time (0 or a cut) is at or before its own
    time, measured like PySceneDetect's (pts less the stream's start time). Each segment is an mp4
    (libx264 crf 18 preset veryfast, or mpeg4 where FFmpeg lacks libx264) with the source's time base and frame
    rate, its first frame at time 0. Odd frame sides lose their last row or column (4:2:0 needs
    even sides). Raises av.error.FFmpegError for a stream that cannot be decoded.
    """
    import av

    bounds = sorted(cuts)
    with av.open(path) as source:
        stream = source.streams.video[0]
        time_base = Fraction(stream.time_base)
        rate = stream.average_rate or stream.guessed_rate
        start_pts = stream.start_time or 0
        writer: _SegmentWriter | None = None
        for frame in source.decode(stream):
            if frame.pts is None:
                continue  # no timestamp: its place among the cuts is unknown
            t = (frame.pts - start_pts) * time_base
            scene = sum(1 for b in bounds if b <= t)
            if writer is None or scene != writer.index:
                if writer is not None:
                    yield writer.close(end=bounds[writer.index])
                writer = _SegmentWriter(scene, t, frame.pts, time_base, rate, frame)
            writer.add(frame, t)
        if writer is not None:
            yield writer.close(end=writer.last + 1 / Fraction(rate))


def scene_segments(path: str, threshold: float = DEFAULT_THRESHOLD) -> Iterator[Segment]:
    """detect_cuts then split_video; a file it cannot read raises SampleError(CORRUPT_VIDEO)."""
    import av
    from scenedetect import VideoOpenFailure

    try:
        yield from split_video(path, detect_cuts(path, threshold))
    except (av.error.FFmpegError, VideoOpenFailure, OSError) as e:
        raise SampleError(
            CORRUPT_VIDEO, detail=f"while cutting into scenes: {type(e).__name__}: {str(e)[:200]}"
        ) from None


class _SegmentWriter:
    """Encodes one scene's frames into an in-memory mp4."""

    def __init__(self, index: int, start: Fraction, first_pts: int, time_base: Fraction, rate, first_frame):
        import av

        self.index, self.start, self.first_pts = index, start, first_pts
        self.frames, self.last = 0, start
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        self.stream = self.container.add_stream(_pick_codec(), rate=rate)
        self.stream.time_base = time_base
        self.stream.codec_context.time_base = time_base
        self.height, self.width = first_frame.height // 2 * 2, first_frame.width // 2 * 2
        self.stream.height, self.stream.width = self.height, self.width
        self.stream.pix_fmt = "yuv420p"
        if self.stream.codec_context.name == "libx264":
            self.stream.options = {"crf": "18", "preset": "veryfast"}
        rotation = getattr(first_frame, "rotation", 0)  # the source's display matrix, as PyAV reads it
        if rotation:
            self.stream.set_display_rotation(rotation)

    def add(self, frame, t: Fraction) -> None:
        import av

        pts = frame.pts - self.first_pts
        if (frame.height, frame.width) != (self.height, self.width):  # crop, where the encoder would scale
            image = frame.to_ndarray(format="rgb24")[: self.height, : self.width]
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = pts, self.stream.codec_context.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1
        self.last = t

    def close(self, end: Fraction) -> Segment:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        return Segment(self.index, self.start, end, self.last, self.frames, self.buffer.getvalue())


# --- segment captions ----------------------------------------------------------------------


def read_segment_captions(path: str) -> dict[str, list[SegmentCaption]]:
    """{video name: [SegmentCaption, ...]} from JSON lines {"video", "start", "end", "caption"}.

    start and end are seconds (finite, 0 <= start < end); the caption a non-empty string (its
    whitespace collapsed). Blank lines are ignored. Raises ValueError('<path>:<line>: ...') at the
    first bad line, one that is not UTF-8 included.
    """
    out: dict[str, list[SegmentCaption]] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte {e.start}: {e.reason}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: not a JSON object")
            missing = [k for k in ("video", "start", "end", "caption") if k not in record]
            if missing:
                raise ValueError(
                    f'{where}: missing {", ".join(missing)}; each line needs "video", "start", "end", "caption"'
                )
            video, start, end, caption = (record[k] for k in ("video", "start", "end", "caption"))
            if not isinstance(video, str) or not video:
                raise ValueError(f'{where}: "video" must be a non-empty string (a video key or file name)')
            numbers_ok = all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (start, end)
            )
            if not numbers_ok or not 0 <= start < end:
                raise ValueError(
                    f'{where}: "start" and "end" must be seconds with 0 <= start < end, got {start!r}, {end!r}'
                )
            if not isinstance(caption, str) or not caption.split():
                raise ValueError(f'{where}: "caption" must be a non-empty string')
            out.setdefault(video, []).append(
                SegmentCaption(float(start), float(end), " ".join(caption.split()), number)
            )
    return out


def caption_for(start: float, end: float, captions: list[SegmentCaption]) -> str | None:
    """The caption that overlaps [start, end) for the longest time (the first listed on a tie),
    if it covers at least half of it; else None. The half keeps a caption whose times are a little
    off from labelling the neighbouring scene it grazes."""
    best, best_overlap = None, 0.0
    for c in captions:
        overlap = min(end, c.end) - max(start, c.start)
        if overlap > best_overlap:
            best, best_overlap = c.caption, overlap
    return best if best_overlap >= 0.5 * (end - start) else None


def match_captions_to_videos(
    captions: dict[str, list[SegmentCaption]], paths: list[str], source: str
) -> dict[str, list[SegmentCaption]]:
    """Segment captions by video path. A caption's "video" names a path of `paths` by its file name
    ("bikes.mp4"), its stem ("bikes") or a tail of its path ("sub/bikes.mp4", "./sub/bikes.mp4"):
    names and paths are compared normalised (os.path.normpath). Raises
    ValueError('<source>:<line>: ...') for a name that matches no video or more than one."""
    by_path: dict[str, list[SegmentCaption]] = {}
    normal = {p: os.path.normpath(p) for p in paths}
    for name, entries in captions.items():
        tail = os.path.normpath(name).strip("/")
        matches = sorted(
            {
                p
                for p, q in normal.items()
                if q == tail or q.endswith("/" + tail) or os.path.splitext(os.path.basename(q))[0] == tail
            }
        )
        where = f"{source}:{entries[0].line}"
        if not matches:
            raise ValueError(f'{where}: "video" {name!r} names none of the input videos; give its file name or path')
        if len(matches) > 1:
            shown = ", ".join(matches[:3])
            raise ValueError(
                f'{where}: "video" {name!r} names {len(matches)} input videos ({shown}); give more of its path'
            )
        by_path.setdefault(matches[0], []).extend(entries)
    return {p: sorted(entries, key=lambda c: c.line) for p, entries in by_path.items()}


def captions_past_end(captions: list[SegmentCaption], end: Fraction | float) -> list[SegmentCaption]:
    """The captions that start at or after `end` (the video's end, seconds): they can label no scene,
    which usually means wrong times or the wrong video."""
    return [c for c in captions if c.start >= float(end)]
