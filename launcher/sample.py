"""Generate clips from a megamoe checkpoint and write them as mp4.

    python launcher/sample.py --checkpoint outputs/tiny/checkpoints/step_00000300 \
        --caption "a red circle moving right" --out samples.mp4

--checkpoint may also be a directory written by launcher/quantize_experts.py: its experts are
dequantized (and its top-any masks applied) as `megamoe.posttrain.quantization.load_quantized` does.

The prompt is either a caption, embedded with the synthetic dataset's fixed word
embeddings (for models trained on the embedded default data), or a precomputed text
embedding [L, text_dim] in a .npy or .safetensors file (key 'text').
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from megamoe.config import from_yaml_text
from megamoe.diffusion.sampler import DEFAULT_GUIDANCE, DEFAULT_STEPS
from megamoe.train.checkpoint import CheckpointError, inspect_checkpoint


def load_text_embedding(args, cfg) -> torch.Tensor:
    if args.text_embedding:
        path = Path(args.text_embedding)
        if path.suffix == ".npy":
            text = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            from safetensors.torch import load_file

            text = load_file(path)["text"]
    else:
        from megamoe.tools.synthetic_data import embed_caption

        # Warns, naming them, about words the embedded data never uses (the model knows only its captions).
        text = torch.as_tensor(embed_caption(args.caption, cfg.data.text_len, cfg.model.text_dim))
    if text.dim() != 2 or text.shape[1] != cfg.model.text_dim:
        raise ValueError(f"text embedding has shape {tuple(text.shape)}, expected [L, {cfg.model.text_dim}]")
    return text.float()


def to_frames(clip: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((clip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory written by launcher/pretrain.py, or a launcher/quantize_experts.py output",
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--caption", help="caption, embedded like the synthetic dataset's captions")
    prompt.add_argument("--text-embedding", help=".npy or .safetensors (key 'text') of shape [L, text_dim]")
    p.add_argument("--out", default="samples.mp4", help="output file, ending in .mp4")
    p.add_argument("--num-samples", type=int, default=4, help="clips generated side by side")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the training data's)")
    p.add_argument("--size", type=int, default=None, help="latent height and width (default: the training data's)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Euler steps (default {DEFAULT_STEPS})")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale (1 = off; default {DEFAULT_GUIDANCE:g})",
    )
    p.add_argument(
        "--guidance-per-band",
        type=float,
        nargs="+",
        default=None,
        help="timestep-band experts only: one CFG scale per band, lowest noise first (instead of --guidance)",
    )
    p.add_argument(
        "--weights", choices=["auto", "model", "ema"], default="auto", help="which weights (auto: EMA if saved)"
    )
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # PyAV picks the container by the extension: refuse another before minutes of sampling, not after
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        print(
            f"error: --out '{out}' does not end in .mp4 (the clips are written as mp4); e.g. --out {out}.mp4",
            file=sys.stderr,
        )
        return 2
    if not out.parent.is_dir():
        print(f"error: --out '{out}': folder '{out.parent}' does not exist; create it or pick another", file=sys.stderr)
        return 2
    scales = args.guidance_per_band if args.guidance_per_band is not None else [args.guidance]
    if not all(scale is None or math.isfinite(scale) for scale in scales):
        print(f"error: CFG scales must be finite numbers, got {scales}; e.g. --guidance 4", file=sys.stderr)
        return 2

    from megamoe.data.buckets import shape_problem
    from megamoe.diffusion.sampler import check_guidance_per_band, euler_sample
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights
    from megamoe.posttrain.quantization import MANIFEST, load_quantized, read_run_config
    from megamoe.posttrain.trained_model import PostTrainError, check_not_model_folder
    from megamoe.tools.mp4_writer import write_video

    quantized = (Path(args.checkpoint) / MANIFEST).is_file()
    try:
        check_not_model_folder(args.checkpoint)  # e.g. a merge_experts.py output: trained from, not sampled
        cfg = (
            read_run_config(args.checkpoint)
            if quantized
            else from_yaml_text(inspect_checkpoint(args.checkpoint)["config"])
        )
    except (CheckpointError, PostTrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    frames = cfg.data.synthetic_frames if args.frames is None else args.frames
    size = cfg.data.synthetic_size if args.size is None else args.size
    m = cfg.model
    problem = (
        "must be at least 1"
        if min(frames, size) < 1
        else shape_problem((frames, size, size), False, (1, 1), m.patch_size, 1, m.rope_max_seq_len)
    )
    if problem:
        pt, ph = m.patch_size[:2]
        print(
            f"error: a latent of --frames {frames} and --size {size} {problem}; e.g. --frames {pt * max(1, frames // pt)} "
            f"--size {ph * max(1, min(size // ph, m.rope_max_seq_len))}",
            file=sys.stderr,
        )
        return 2
    if cfg.model.out_channels != 3:
        print(
            f"error: the model predicts {cfg.model.out_channels}-channel latents; only 3-channel (RGB-like) "
            f"latents can be written directly until VAE decoding is added",
            file=sys.stderr,
        )
        return 2
    which = args.weights
    if quantized:
        if which != "auto":
            print(
                f"error: --weights {which} does not apply to a quantized directory (it holds one model); drop it",
                file=sys.stderr,
            )
            return 2
        which = "quantized"
        model = load_quantized(args.checkpoint)
    else:
        if which == "auto":
            which = "ema" if (Path(args.checkpoint) / "ema_weights").is_dir() else "model"
        model = build_model(cfg.model, initialize=False)  # every weight is loaded next
        load_diffusers_weights(model, Path(args.checkpoint) / ("ema_weights" if which == "ema" else "weights"))
        model.eval()

    if args.guidance_per_band is not None:
        try:
            if args.guidance is not None:
                raise ValueError("--guidance and --guidance-per-band are alternatives; give one")
            check_guidance_per_band(cfg.model.moe, args.guidance_per_band)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        bands = dict(guidance_per_band=args.guidance_per_band, band_boundaries=cfg.model.moe.timestep_band_boundaries)
        guidance = f"per band {args.guidance_per_band}"
    else:
        args.guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
        bands, guidance = {}, args.guidance

    text = load_text_embedding(args, cfg).unsqueeze(0).expand(args.num_samples, -1, -1)
    shape = (args.num_samples, cfg.model.in_channels, frames, size, size)
    generator = torch.Generator().manual_seed(args.seed)
    clips = euler_sample(model, shape, text, args.steps, args.guidance, cfg.diffusion.shift, generator, **bands)
    video = np.concatenate([to_frames(c) for c in clips], axis=2)  # side by side
    write_video(args.out, video, fps=args.fps)
    print(f"wrote {args.num_samples} clips ({which} weights, {args.steps} steps, guidance {guidance}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
