"""Write raw video WebDataset shards (video + caption per sample) and an index of their metadata.

    python data/make_shards.py --videos /data/clips --out /data/raw-shards --shard-size 256
    python data/make_shards.py --index /data/clips.csv --out /data/raw-shards     # columns path,caption
    python data/make_shards.py --index /data/clips.jsonl --out /data/raw-shards   # {"path", "caption"}

With --videos, each video (mp4, webm, mov, mkv; searched recursively) takes its caption from a
sidecar `<stem>.txt`. Unreadable videos, videos without a caption and captions that are not UTF-8
(cause 'bad_caption', as the loader counts them) are skipped, listed in `skipped.jsonl` and counted
by cause. `index.jsonl` holds key, shard, source, frames, height, width,
fps, duration and codec per sample. The layout is described in megamoe/tools/raw_shard_writer.py.
"""

from __future__ import annotations

import argparse
import sys

from megamoe.tools.raw_shard_writer import collect_inputs, write_raw_shards


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
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    if args.shard_size <= 0:
        parser.error("--shard-size must be > 0 (MB)")
    try:
        inputs = collect_inputs(folder=args.videos, index=args.index)
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"error: {exc}")
    if not inputs:
        sys.exit(f"error: no videos found in '{args.videos or args.index}'")
    log = (lambda msg: None) if args.quiet else print
    try:
        report = write_raw_shards(inputs, args.out, args.shard_size, args.caption_format, log=log)
    except FileExistsError as exc:
        sys.exit(f"error: {exc}")
    skipped = ", ".join(f"{n} {cause}" for cause, n in sorted(report["skipped"].items())) or "none"
    print(f"{report['samples']} samples in {len(report['shards'])} shards in {args.out}; skipped: {skipped}")
    return report


if __name__ == "__main__":
    main()
