"""Write a tiny random Wan VAE and umT5 text encoder, to try raw-video training without real weights.

    python data/make_random_encoders.py --out /tmp/encoders
    # then: data.vae_path=/tmp/encoders/vae data.text_encoder_path=/tmp/encoders
    #       model.in_channels=4 model.out_channels=4 model.text_dim=32 (the line it prints)

The folder has the layout of a diffusers Wan pipeline (vae/, text_encoder/, tokenizer/), so the
same settings later point at the real Wan2.2-TI2V-5B-Diffusers. Needs the `video` extra
(diffusers, transformers). See megamoe/tools/random_encoders.py.
"""

from __future__ import annotations

import argparse
import sys

from megamoe.tools.random_encoders import DEFAULT_WORDS, write_random_encoders


def fail(message: str):
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", required=True, help="new (or empty) directory to write vae/, text_encoder/, tokenizer/"
    )
    parser.add_argument("--z-dim", type=int, default=4, help="VAE latent channels = model.in_channels (default 4)")
    parser.add_argument("--text-dim", type=int, default=32, help="text encoder width = model.text_dim (default 32)")
    parser.add_argument("--words", help="space-separated tokenizer vocabulary; other words become <unk>")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.z_dim < 1:
        fail(f"--z-dim must be >= 1, got {args.z_dim}")
    if args.text_dim < 2 or args.text_dim % 2:
        fail(f"--text-dim must be even and >= 2 (two attention heads), got {args.text_dim}")
    words = args.words.split() if args.words else DEFAULT_WORDS
    try:
        paths = write_random_encoders(args.out, args.z_dim, args.text_dim, words, seed=args.seed)
    except FileExistsError as exc:
        fail(str(exc))
    print(
        f"data.vae_path={paths['vae']} data.text_encoder_path={paths['text_encoder']} "
        f"model.in_channels={args.z_dim} model.out_channels={args.z_dim} model.text_dim={args.text_dim}"
    )
    return paths


if __name__ == "__main__":
    main()
