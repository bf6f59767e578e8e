"""Write the synthetic moving-shapes dataset as latent WebDataset shards, optionally with a preview.

    python data/make_synthetic.py --out /tmp/shapes --preview /tmp/shapes.mp4

Training generates this dataset by itself when `data.path` is null; this tool is for looking at
the data, or for writing a variant (more clips, other sizes) to point `data.path` at.
The defaults are those of configs/tiny.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from megamoe.tools.latent_shards import decode_sample, read_shard
from megamoe.tools.mp4_writer import clip_to_uint8, write_video
from megamoe.tools.synthetic_data import dataset_params, unproject_channels, write_synthetic_dataset


def write_preview(shard: str, path: str, num_clips: int, fps: float, loops: int) -> list[str]:
    """The first clips of `shard` side by side, separated by grey lines, looped; returns the captions."""
    samples = [decode_sample(key, members, shard) for key, members in read_shard(shard)[:num_clips]]
    tiles = []
    for s in samples:
        latents = s["latents"]
        rgb = latents if latents.shape[0] == 3 else unproject_channels(latents)
        tiles.append(clip_to_uint8(rgb))
    frames, _, _, _ = tiles[0].shape
    gap = np.full((frames, tiles[0].shape[1], 1, 3), 128, dtype=np.uint8)
    row = np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=2)
    write_video(path, np.concatenate([row] * loops), fps)
    return [s["caption"] for s in samples]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write shard-*.tar and manifest.json into")
    parser.add_argument("--num-clips", type=int, default=512)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", type=int, default=16, help="height and width in pixels")
    parser.add_argument("--channels", type=int, default=3, help="3 = RGB; others are fixed mixes of RGB")
    parser.add_argument("--text-len", type=int, default=8)
    parser.add_argument("--text-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="content seed (training's embedded dataset uses 0)")
    parser.add_argument("--preview", metavar="FILE.mp4", help="also write the first clips side by side to this mp4")
    parser.add_argument("--preview-clips", type=int, default=8)
    parser.add_argument("--fps", type=float, default=4.0)
    args = parser.parse_args(argv)
    for name in ("num_clips", "frames", "size", "channels", "text_len", "text_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")

    params = dataset_params(
        args.num_clips, args.frames, args.size, args.channels, args.text_len, args.text_dim, seed=args.seed
    )
    start = time.perf_counter()
    try:
        manifest = write_synthetic_dataset(args.out, params)
    except FileExistsError as exc:
        sys.exit(f"error: {exc}")
    elapsed = time.perf_counter() - start
    total = sum(s["bytes"] for s in manifest["shards"])
    print(
        f"wrote {args.num_clips} clips [{args.channels}, {args.frames}, {args.size}, {args.size}] + text "
        f"[{args.text_len}, {args.text_dim}] in {len(manifest['shards'])} shards, {total / 1e6:.1f} MB, "
        f"{elapsed:.2f} s, to {args.out}"
    )
    for s in manifest["shards"]:
        print(f"  {s['name']}  {s['num_samples']:5d} clips  sha256 {s['sha256'][:16]}")
    if args.preview:
        first = os.path.join(args.out, manifest["shards"][0]["name"])
        captions = write_preview(first, args.preview, args.preview_clips, args.fps, loops=4)
        print(f"preview {args.preview}, left to right:")
        for caption in captions:
            print(f"  {caption}")


if __name__ == "__main__":
    main()
