"""Do a checkpoint's samples show what the caption says? Colour, one object, and its direction.

    python benchmarks/sample_quality.py --checkpoint outputs/tiny/checkpoints/step_00001800 --check
    python benchmarks/sample_quality.py --ground-truth --config configs/tiny.yaml   # check of the metric

For a model trained on the embedded synthetic data (megamoe/tools/synthetic_data.py), it samples
every caption of the vocabulary ("a <colour> <shape> moving <direction>": 5 x 4 x 4 = 80) with
--seeds noise seeds each, with launcher/sample.py's defaults (Euler steps, CFG scale), and scores
each clip on three questions:

  colour      the majority of the foreground pixels' nearest palette colours is the caption's colour
  single      most frames (more than half) hold exactly one foreground component of at least
              --min-area pixels (8-connected, scipy.ndimage.label); specks below it are ignored
  direction   the foreground centroid moves from the first to the last frame by at least
              --min-travel pixels in the caption's direction, along the caption's axis

Foreground is every pixel whose RGB lies farther than FOREGROUND_DISTANCE from the background
colour (the same on every clip; the palette's nearest colour to the background is 0.75 away).
--ground-truth scores real clips of the generator instead (the first --seeds held-out clips of
each caption) the same way: it must score about 100% on all three, or the metric is wrong.

Apart from the caption, it also reports how the objects move (`motion`): the centroid's mean step
between consecutive frames, and the mean cosine between consecutive steps (1 = a straight path). A
model that learned motion but not the direction words shows straight paths and direction at chance.

--word-use also asks whether the model reads each word at all: the held-out flow loss (as training's
validation computes it: fixed noise levels, fixed noise) of the first --word-use-clips held-out clips
with their captions, with the direction word reversed, with the colour word changed, and with the
null caption. A word the model uses raises the loss when it is wrong; one it ignores leaves it equal.

Prints a table (overall, and per colour, shape and direction) and then the figures as JSON
(also written to --json). With --check the exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megamoe.tools.synthetic_data import (  # noqa: E402
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    HELD_OUT_SEED,
    SHAPES,
    clip_spec,
    render_clip_rgb,
)

TARGETS = {"colour": 0.95, "single": 0.80, "direction": 0.80}
"""Shares of samples that must pass each question (issue targets for the README's main command)."""
FOREGROUND_DISTANCE = 0.35
"""RGB distance (channels in [0, 1]) from the background above which a pixel is foreground."""
MIN_AREA = 3
"""Components smaller than this many pixels are specks, not objects."""
MIN_TRAVEL = 1.0
"""Centroid displacement (pixels, first to last frame) that counts as moving; a still object fails."""


def foreground_mask(rgb01: np.ndarray) -> np.ndarray:
    """bool [F, H, W] of a clip float [3, F, H, W] in [0, 1]: far from the background colour."""
    bg = np.asarray(BACKGROUND, dtype=np.float64)[:, None, None, None]
    return np.sqrt(((rgb01 - bg) ** 2).sum(axis=0)) > FOREGROUND_DISTANCE


def nearest_colour(rgb01: np.ndarray, mask: np.ndarray) -> str | None:
    """The palette colour most foreground pixels are nearest to; None without foreground."""
    pixels = rgb01[:, mask].T  # [N, 3]
    if len(pixels) == 0:
        return None
    palette = np.asarray(list(COLOURS.values()))  # [P, 3]
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(axis=-1), axis=1)
    return list(COLOURS)[np.bincount(nearest, minlength=len(palette)).argmax()]


def objects_per_frame(mask: np.ndarray, min_area: int = MIN_AREA) -> list[int]:
    """Per frame, the number of 8-connected foreground components of at least `min_area` pixels."""
    counts = []
    for frame in mask:
        labels, n = ndimage.label(frame, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        counts.append(int((areas >= min_area).sum()))
    return counts


def centroid_travel(mask: np.ndarray) -> tuple[float, float] | None:
    """(dx, dy) in pixels of the foreground centroid from the first to the last frame; None when
    either frame has no foreground. x grows to the right, y downwards (as the generator's)."""
    ends = []
    for frame in (mask[0], mask[-1]):
        ys, xs = np.nonzero(frame)
        if len(xs) == 0:
            return None
        ends.append((xs.mean(), ys.mean()))
    return ends[1][0] - ends[0][0], ends[1][1] - ends[0][1]


def motion(mask: np.ndarray) -> tuple[float, float | None] | None:
    """(mean centroid step between consecutive frames in pixels, mean cosine between consecutive
    steps) of a foreground mask [F, H, W]: how far and how straight the object moves, whatever the
    caption says. None when a frame has no foreground; the cosine is None when no two consecutive
    steps are both longer than 0.2 pixels (a still object has no direction to keep)."""
    centres = []
    for frame in mask:
        ys, xs = np.nonzero(frame)
        if len(xs) == 0:
            return None
        centres.append((xs.mean(), ys.mean()))
    steps = np.diff(np.asarray(centres), axis=0)  # [F-1, 2]
    lengths = np.linalg.norm(steps, axis=1)
    cosines = [
        float(a @ b / (na * nb))
        for a, b, na, nb in zip(steps[:-1], steps[1:], lengths[:-1], lengths[1:])
        if na > 0.2 and nb > 0.2
    ]
    return float(lengths.mean()), (float(np.mean(cosines)) if cosines else None)


def score_clip(
    rgb01: np.ndarray, colour: str, direction: str, min_area: int = MIN_AREA, min_travel: float = MIN_TRAVEL
) -> dict:
    """Pass or fail on each question for one clip float [3, F, H, W] in [0, 1] of `colour` moving
    `direction` (keys of synthetic_data.COLOURS and DIRECTIONS)."""
    mask = foreground_mask(rgb01)
    counts = objects_per_frame(mask, min_area)
    travel = centroid_travel(mask)
    along = None
    if travel is not None:
        dx, dy = DIRECTIONS[direction]
        along = float(travel[0] * dx + travel[1] * dy)  # displacement along the caption's axis, signed
    return {
        "colour": nearest_colour(rgb01, mask) == colour,
        "single": sum(c == 1 for c in counts) > len(counts) / 2,
        "direction": along is not None and along >= min_travel,
        "objects": counts,
        "travel": along,
        "motion": motion(mask),
    }


def vocabulary() -> list[tuple[str, str, str]]:
    """Every (shape, colour, direction) the generator draws, in a fixed order."""
    return list(itertools.product(SHAPES, COLOURS, DIRECTIONS))


def caption_of(shape: str, colour: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def ground_truth_clips(frames: int, size: int, seeds: int) -> dict[tuple[str, str, str], list[np.ndarray]]:
    """The first `seeds` clips of each caption in the held-out split, as float [3, F, S, S] in [0, 1]."""
    clips = {key: [] for key in vocabulary()}
    for index in itertools.count():
        spec = clip_spec(HELD_OUT_SEED, index, frames, size)
        key = (spec.shape, spec.colour, spec.direction)
        if len(clips[key]) < seeds:
            clips[key].append((render_clip_rgb(spec, frames, size) + 1.0) / 2.0)
        if all(len(v) == seeds for v in clips.values()):
            return clips


def load_model(checkpoint: str, weights: str):
    """(model in eval mode, run Config, which weights) of a launcher/pretrain.py checkpoint."""
    from megamoe.config import from_yaml_text
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights
    from megamoe.train.checkpoint import inspect_checkpoint

    cfg = from_yaml_text(inspect_checkpoint(checkpoint)["config"])
    if cfg.data.path is not None or cfg.model.out_channels != 3:
        raise SystemExit("error: the checkpoint was not trained on the embedded synthetic data (data.path: null)")
    if weights == "auto":
        weights = "ema" if os.path.isdir(os.path.join(checkpoint, "ema_weights")) else "model"
    model = build_model(cfg.model, initialize=False)
    load_diffusers_weights(model, os.path.join(checkpoint, "ema_weights" if weights == "ema" else "weights"))
    return model.eval(), cfg, weights


def generated_clips(
    model, cfg, seeds: int, steps: int, guidance: float
) -> dict[tuple[str, str, str], list[np.ndarray]]:
    """Samples of every caption, `seeds` each: seed j draws the noise of all captions at once."""
    import torch

    from megamoe.diffusion.sampler import euler_sample
    from megamoe.tools.synthetic_data import embed_caption

    keys = vocabulary()
    text = torch.stack(
        [torch.as_tensor(embed_caption(caption_of(*k), cfg.data.text_len, cfg.model.text_dim)) for k in keys]
    )
    frames, size = cfg.data.synthetic_frames, cfg.data.synthetic_size
    shape = (len(keys), cfg.model.in_channels, frames, size, size)
    clips = {key: [] for key in keys}
    for seed in range(seeds):
        out = euler_sample(
            model, shape, text, steps, guidance, cfg.diffusion.shift, torch.Generator().manual_seed(seed)
        )
        rgb01 = ((out.clamp(-1, 1) + 1.0) / 2.0).numpy()
        for key, clip in zip(keys, rgb01):
            clips[key].append(clip)
    return clips


MAX_WORD_USE_CLIPS = 4096
"""--word-use renders its clips in memory (3 x 5 x 16 x 16 floats each) and runs 4 x 9 forwards of them."""
OPPOSITE = {d: e for d, (x, y) in DIRECTIONS.items() for e, v in DIRECTIONS.items() if v == (-x, -y)}
"""Each direction word's reverse, from the generator's own direction vectors."""


def changed_captions(keys: list[tuple[str, str, str]]) -> dict[str, list[str]]:
    """The captions of (shape, colour, direction) keys as they are, with the direction reversed, and
    with the colour changed to the palette's next."""
    colours = list(COLOURS)
    return {
        "caption": [caption_of(*k) for k in keys],
        "direction reversed": [caption_of(shape, colour, OPPOSITE[d]) for shape, colour, d in keys],
        "colour changed": [
            caption_of(shape, colours[(colours.index(colour) + 1) % len(colours)], d) for shape, colour, d in keys
        ],
    }


def word_use(model, cfg, clips: int = 256, batch: int = 64) -> dict[str, dict[str, float]]:
    """{variant: validation_loss dict} for the captions as they are ("caption"), with the direction word
    reversed ("direction reversed"), with the colour word changed to the palette's next ("colour changed")
    and the null caption ("null"), on the first `clips` held-out clips, the same noise for every variant."""
    import torch

    from megamoe.tools.synthetic_data import embed_caption
    from megamoe.train.validation import validation_loss

    frames, size = cfg.data.synthetic_frames, cfg.data.synthetic_size
    specs = [clip_spec(HELD_OUT_SEED, i, frames, size) for i in range(clips)]
    latents = torch.from_numpy(np.stack([render_clip_rgb(s, frames, size) for s in specs]))
    captions = changed_captions([(s.shape, s.colour, s.direction) for s in specs])
    texts = {
        k: torch.from_numpy(np.stack([embed_caption(c, cfg.data.text_len, cfg.model.text_dim) for c in v]))
        for k, v in captions.items()
    }
    texts["null"] = torch.zeros_like(texts["caption"])
    out = {}
    for variant, text in texts.items():
        batches = [(latents[i : i + batch], text[i : i + batch]) for i in range(0, clips, batch)]
        out[variant] = validation_loss(model, batches)
    return out


def print_word_use(losses: dict[str, dict[str, float]]) -> None:
    keys = [k for k in next(iter(losses.values())) if k != "loss"] + ["loss"]
    print("held-out flow loss by noise level, caption words changed:")
    print(f"{'':>20} " + " ".join(f"{k.replace('loss_', ''):>7}" for k in keys))
    for variant, row in losses.items():
        print(f"{variant:>20} " + " ".join(f"{row[k]:>7.4f}" for k in keys))


def summarise(scores: dict[tuple[str, str, str], list[dict]]) -> dict:
    """Shares passing each question: overall and per shape, colour and direction."""

    def shares(items: list[dict]) -> dict:
        return {q: sum(s[q] for s in items) / len(items) for q in TARGETS}

    out = {"overall": shares([s for v in scores.values() for s in v]), "samples": sum(map(len, scores.values()))}
    # Whether objects move at all, and straight, apart from the caption's direction: a model that
    # learned motion but ignores the direction word scores chance on `direction` with straight paths.
    moving = [s["motion"] for v in scores.values() for s in v if s["motion"] is not None]
    cosines = [c for _, c in moving if c is not None]
    out["motion"] = {
        "mean_step_px": float(np.mean([step for step, _ in moving])) if moving else None,
        "mean_turn_cosine": float(np.mean(cosines)) if cosines else None,
    }
    for axis, names in (("shape", SHAPES), ("colour", COLOURS), ("direction", DIRECTIONS)):
        i = ("shape", "colour", "direction").index(axis)
        out[f"by_{axis}"] = {n: shares([s for k, v in scores.items() if k[i] == n for s in v]) for n in names}
    return out


def print_table(summary: dict) -> None:
    print(f"{'':>16} {'colour':>7} {'single':>7} {'direction':>9}")
    rows = [("overall", summary["overall"])]
    for axis in ("shape", "colour", "direction"):
        rows += list(summary[f"by_{axis}"].items())
    for name, s in rows:
        print(f"{name:>16} {s['colour']:>7.1%} {s['single']:>7.1%} {s['direction']:>9.1%}")
    print(f"{'target':>16} " + " ".join(f"{TARGETS[q]:>{w}.0%}" for q, w in zip(TARGETS, (7, 7, 9))))
    m = summary["motion"]
    if m["mean_step_px"] is not None:
        turn = "n/a" if m["mean_turn_cosine"] is None else f"{m['mean_turn_cosine']:.2f}"
        print(f"motion: the centroid moves {m['mean_step_px']:.2f} px a frame; consecutive steps' cosine {turn}")


def main(argv=None) -> int:
    from megamoe.diffusion.sampler import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="checkpoint directory of a run on the embedded synthetic data")
    what.add_argument("--ground-truth", action="store_true", help="score the generator's own clips instead")
    p.add_argument("--config", default="configs/tiny.yaml", help="--ground-truth: the run config (frames, size)")
    p.add_argument("--seeds", type=int, default=4, help="samples per caption")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Euler steps")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--weights", choices=["auto", "model", "ema"], default="auto", help="auto: EMA if saved")
    p.add_argument("--word-use", action="store_true", help="also the held-out loss with words changed (above)")
    p.add_argument(
        "--word-use-clips", type=int, default=256, help=f"held-out clips for --word-use (1..{MAX_WORD_USE_CLIPS})"
    )
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--check", action="store_true", help="exit status 1 when a target is missed")
    args = p.parse_args(argv)
    if args.word_use and args.ground_truth:
        p.error("--word-use scores a model: give --checkpoint, not --ground-truth")
    for name in ("seeds", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be at least 1")
    if not 1 <= args.word_use_clips <= MAX_WORD_USE_CLIPS:
        p.error(f"--word-use-clips {args.word_use_clips} must be in 1..{MAX_WORD_USE_CLIPS}")

    start = time.perf_counter()
    if args.ground_truth:
        from megamoe.config import load_config

        cfg = load_config(args.config, [])
        clips = ground_truth_clips(cfg.data.synthetic_frames, cfg.data.synthetic_size, args.seeds)
        source = {"ground_truth": args.config}
    else:
        import torch

        torch.manual_seed(0)
        model, cfg, which = load_model(args.checkpoint, args.weights)
        clips = generated_clips(model, cfg, args.seeds, args.steps, args.guidance)
        source = {"checkpoint": args.checkpoint, "weights": which, "steps": args.steps, "guidance": args.guidance}
    scores = {key: [score_clip(c, key[1], key[2]) for c in v] for key, v in clips.items()}
    summary = {**source, "seeds": args.seeds, **summarise(scores), "targets": TARGETS}
    if args.word_use:
        summary["word_use"] = word_use(model, cfg, args.word_use_clips)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    missed = [q for q in TARGETS if summary["overall"][q] < TARGETS[q]]
    summary["missed"] = missed
    print_table(summary)
    if "word_use" in summary:
        print_word_use(summary["word_use"])
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    if args.check and missed:
        print(f"missed targets: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
