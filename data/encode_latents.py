"""Encode raw video shards into latent shards: Wan VAE latents + umT5 text embeddings per sample.

    python data/encode_latents.py --raw /data/raw-shards --out /data/latent-shards \
        --vae /models/Wan2.2-TI2V-5B-Diffusers/vae --text-encoder /models/Wan2.2-TI2V-5B-Diffusers \
        --frames 81 --fps 16 --height 480 --width 832 --text-len 512 --device cuda --dtype bfloat16

Models load from local directories only (nothing is downloaded): --vae holds an AutoencoderKLWan,
--text-encoder a UMT5EncoderModel with its tokenizer (or a diffusers pipeline directory with
text_encoder/ and tokenizer/). Each raw shard gives a latent shard of the same name, in the layout
the loader reads (megamoe/tools/latent_shards.py); bad samples are skipped and counted by cause. The
frame window of each sample is drawn from (--seed, key), so reruns give the same latents.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megamoe.data.shards import resolve_shards
from megamoe.data.video import FrameSpec
from megamoe.data.wan_encoders import load_text_encoder, load_vae
from megamoe.tools.latent_encoding import encode_raw_shards

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", required=True, help="raw shards: a directory, a .tar, a glob or a brace pattern")
    parser.add_argument("--out", required=True, help="directory for the latent shards and manifest.json")
    parser.add_argument("--vae", required=True, help="local AutoencoderKLWan directory")
    parser.add_argument("--text-encoder", required=True, help="local UMT5EncoderModel + tokenizer directory")
    parser.add_argument("--frames", type=int, default=81, help="frames per clip, 4k+1 (default 81)")
    parser.add_argument("--fps", type=float, default=16.0, help="frame rate clips are resampled to (default 16)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--text-len", type=int, default=512, help="text tokens per caption (Wan: 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frame windows")
    parser.add_argument("--batch-size", type=int, default=1, help="clips per VAE call")
    parser.add_argument(
        "--decode-timeout",
        type=float,
        default=60.0,
        help="seconds a video may take to decode before it is skipped; 0 decodes inline",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype")
    args = parser.parse_args(argv)
    try:
        spec = FrameSpec(args.frames, args.fps, args.height, args.width)
    except ValueError as exc:
        parser.error(str(exc))
    if args.text_len < 1 or args.batch_size < 1:
        parser.error("--text-len and --batch-size must be >= 1")
    try:
        shards = resolve_shards(args.raw)
        vae = load_vae(args.vae, args.device, DTYPES[args.dtype])
        encoder, tokenizer = load_text_encoder(args.text_encoder, args.device, DTYPES[args.dtype])
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    report = encode_raw_shards(
        shards,
        args.out,
        vae,
        encoder,
        tokenizer,
        spec,
        args.text_len,
        seed=args.seed,
        batch_size=args.batch_size,
        timeout_s=args.decode_timeout or None,
    )
    skipped = ", ".join(f"{n} {cause}" for cause, n in sorted(report["skipped"].items())) or "none"
    print(f"{report['samples']} samples in {len(report['shards'])} latent shards in {args.out}; skipped: {skipped}")
    return report


if __name__ == "__main__":
    main()
