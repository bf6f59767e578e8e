"""Write raw video WebDataset shards (video + caption per sample) and an index of their metadata.

    python data/make_shards.py --videos /data/clips --out /data/raw-shards --shard-size 256
    python data/make_shards.py --index /data/clips.csv --out /data/raw-shards     # columns path,caption
    python data/make_shards.py --index /data/clips.jsonl --out /data/raw-shards   # {"path", "caption"}
    python data/make_shards.py --videos /data/films --out /data/raw-shards --split-scenes \
        --segment-captions /data/films-segments.jsonl       # {"video", "start", "end", "caption"}

With --videos, each video (mp4, webm, mov, mkv; searched recursively) takes its caption from a
sidecar `<stem>.txt`. Unreadable videos, videos without a caption and captions that are not UTF-8
(cause 'bad_caption', as the loader counts them) are skipped, listed in `skipped.jsonl` and counted
by cause. `index.jsonl` holds key, shard, source, frames, height, width,
fps, duration and codec per sample. The layout is described in megamoe/tools/raw_shard_writer.py.

With --split-scenes, each video is cut at its shot boundaries (PySceneDetect) and each scene
becomes a sample of its own, `<video key>_s<NNN>`, re-encoded as its own mp4 so that no training
clip can span a cut; its json member and index row hold the scene's start and end (seconds in the
source). A scene takes the caption of the --segment-captions line that overlaps it longest, else
its video's caption. Scenes too short for --min-frames frames at --fps are counted, not written;
segment captions that start after their video ends are counted in a warning on the summary line.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace

from megamoe.config import DataConfig
from megamoe.tools.raw_shard_writer import collect_inputs, summary, write_raw_shards
from megamoe.tools.scene_split import DEFAULT_THRESHOLD, SplitOptions, match_captions_to_videos, read_segment_captions


def fail(message: str):
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", help="folder of videos with sidecar <stem>.txt captions")
    source.add_argument("--index", help='CSV (path,caption) or JSONL ({"path", "caption"}) listing the videos')
    parser.add_argument("--out", required=True, help="directory to write shard-*.tar, index.jsonl, skipped.jsonl")
    parser.add_argument("--shard-size", type=float, default=256.0, help="target shard size in MB (default 256)")
    parser.add_argument(
        "--caption-format",
        choices=("txt", "json"),
        default="txt",
        help='store captions as <key>.txt or <key>.json {"caption": ...}',
    )
    scenes = parser.add_argument_group("scene segments")
    scenes.add_argument(
        "--split-scenes", action="store_true", help="cut each video at its shot boundaries, one sample per scene"
    )
    scenes.add_argument(
        "--scene-threshold",
        type=float,
        help=f"PySceneDetect ContentDetector threshold; lower finds softer cuts (default {DEFAULT_THRESHOLD:g})",
    )
    scenes.add_argument(
        "--segment-captions", help='JSON lines {"video": file name or path, "start": s, "end": s, "caption": ...}'
    )
    scenes.add_argument(
        "--min-frames",
        type=int,
        help=f"scenes too short for this many frames at --fps are not written (default data.video_frames, {DataConfig.video_frames})",
    )
    scenes.add_argument(
        "--fps", type=float, help=f"the training clip frame rate (default data.video_fps, {DataConfig.video_fps:g})"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.shard_size <= 0:
        fail("--shard-size must be > 0 (MB)")
    scene_flags = {"--scene-threshold": args.scene_threshold, "--segment-captions": args.segment_captions}
    scene_flags.update({"--min-frames": args.min_frames, "--fps": args.fps})
    given = [flag for flag, value in scene_flags.items() if value is not None]
    if given and not args.split_scenes:
        fail(f"{', '.join(given)} set how scenes are cut: add --split-scenes")
    for flag, value in (("--scene-threshold", args.scene_threshold), ("--fps", args.fps)):
        if value is not None and not (math.isfinite(value) and value > 0):
            fail(f"{flag} must be a finite number > 0, got {value:g}")
    if args.min_frames is not None and args.min_frames < 1:
        fail(f"--min-frames must be >= 1, got {args.min_frames}")
    try:
        inputs = collect_inputs(folder=args.videos, index=args.index)
    except UnicodeDecodeError as exc:
        fail(f"{args.index}: not UTF-8 (byte {exc.start}: {exc.reason}); save it as UTF-8")
    except (OSError, ValueError, KeyError) as exc:
        fail(str(exc))
    if not inputs:
        fail(f"no videos found in '{args.videos or args.index}'")
    split = None
    if args.split_scenes:
        split = SplitOptions(
            threshold=DEFAULT_THRESHOLD if args.scene_threshold is None else args.scene_threshold,
            min_frames=DataConfig.video_frames if args.min_frames is None else args.min_frames,
            fps=DataConfig.video_fps if args.fps is None else args.fps,
        )
        if args.segment_captions:
            try:
                captions = read_segment_captions(args.segment_captions)
                paths = [path for path, _ in inputs]
                split = replace(split, captions=match_captions_to_videos(captions, paths, args.segment_captions))
            except (OSError, ValueError) as exc:
                fail(str(exc))
    log = (lambda msg: None) if args.quiet else print
    try:
        report = write_raw_shards(inputs, args.out, args.shard_size, args.caption_format, log=log, scenes=split)
    except FileExistsError as exc:
        fail(str(exc))
    print(summary(report, args.out, split))
    return report


if __name__ == "__main__":
    main()
