"""The embedded synthetic dataset: coloured shapes moving across a plain background.

With `data.path: null` training runs on clips that megamoe generates itself, so the README's
main command needs no download. The "latents" are tiny RGB-like frames (values in [-1, 1]) rather
than VAE latents: a small model visibly learns them in a few hundred CPU steps, and its samples
can be written to mp4 as they are. The loader calls `ensure_synthetic_dataset` once, before it
reads anything (megamoe/data/loader.py `build_loader`); from then on the dataset is latent shards
like any other, so the generator is a tool that training starts, not part of the data path.

The shards are latent shards (layout in megamoe/tools/latent_shards.py) whose `key` is the clip
index as `%08d`. The directory also holds `manifest.json`: the generating parameters, the number
of clips, and per shard its name, number of samples, size and sha256.

Text embeddings stand in for umT5 outputs: every word gets one fixed random vector (seeded by the
crc32 of the word, which unlike Python's `hash()` is not salted per process), one row per word,
zero rows after the last word, as Wan pads umT5 outputs. The null embedding used for
classifier-free guidance is therefore all zeros (`null_text_embedding`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from megamoe.tools.latent_shards import encode_sample, write_shard

# Bump when the generator's output changes, so cached datasets of older code are not reused.
GENERATOR_VERSION = 2
# The dataset's content seed. It is deliberately not `data.seed`, which only seeds the shuffle:
# changing the shuffle must not regenerate the data.
SYNTHETIC_SEED = 0
HELD_OUT_SEED = 1
"""Seed of the embedded data's held-out split: other clips of the same captions and motion, never trained on."""
MAX_CLIPS_PER_SHARD = 64
MIN_SHARDS = 8  # so that up to 8 data-parallel ranks can train on the default dataset
MANIFEST = "manifest.json"

SHAPES = ("square", "circle", "triangle", "bar")
COLOURS = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "white": (1.0, 1.0, 1.0),
}
# Image coordinates: x grows to the right, y grows downwards.
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
BACKGROUND = (0.1, 0.1, 0.1)
SUPERSAMPLE = 8  # subsamples per pixel and axis: soft edges, and sub-pixel motion stays visible
SHAPE_RADIUS = 0.18
"""Half the size of a circle, as a fraction of the frame size (other shapes scale with it)."""
TRAVEL = (0.3, 0.45)
"""Range of the distance a shape travels from the first to the last frame, as fractions of the frame size:
large enough that the direction shows in every clip (at 16 pixels, 1.2-1.8 pixels per frame over 5
frames), small enough that the widest shape (a bar, 2.5 * SHAPE_RADIUS) fits its whole path."""


@dataclass(frozen=True)
class ClipSpec:
    """Everything that defines one clip; positions are in pixels, pixel i spans [i, i+1)."""

    shape: str
    colour: str
    direction: str
    start: tuple[float, float]  # shape centre (x, y) in frame 0
    velocity: tuple[float, float]  # pixels per frame
    half_extent: tuple[float, float]  # half width, half height of the shape's bounding box

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    def centre(self, frame: int) -> tuple[float, float]:
        return self.start[0] + self.velocity[0] * frame, self.start[1] + self.velocity[1] * frame


def clip_spec(seed: int, index: int, frames: int, size: int) -> ClipSpec:
    """The clip `index` of the dataset `seed`: a function of its arguments only."""
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    r = SHAPE_RADIUS * size
    half = {"square": (0.9 * r, 0.9 * r), "circle": (r, r), "triangle": (r, r), "bar": (1.4 * r, 0.5 * r)}[shape]
    # The whole path stays inside the frame, so the shape never leaves or gets clipped.
    travel = rng.uniform(*TRAVEL) * size if frames > 1 else 0.0
    dx, dy = DIRECTIONS[direction]
    start = []
    for d, h in ((dx, half[0]), (dy, half[1])):
        lo, hi = h, size - h
        if d > 0:
            hi -= travel
        elif d < 0:
            lo += travel
        start.append(float(rng.uniform(lo, hi)))
    step = travel / max(frames - 1, 1)
    return ClipSpec(shape, colour, direction, (start[0], start[1]), (dx * step, dy * step), half)


def _coverage(spec: ClipSpec, frames: int, size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, [F, S, S], by supersampling a hard mask."""
    k = SUPERSAMPLE
    pts = (np.arange(size * k) + 0.5) / k
    f = np.arange(frames)[:, None, None]
    x = pts[None, None, :] - (spec.start[0] + spec.velocity[0] * f)
    y = pts[None, :, None] - (spec.start[1] + spec.velocity[1] * f)
    hx, hy = spec.half_extent
    if spec.shape == "circle":
        mask = x * x + y * y <= hx * hx
    elif spec.shape == "triangle":  # apex up, base down; width grows linearly from the apex
        mask = (y >= -hy) & (y <= hy) & (np.abs(x) <= hx * (y + hy) / (2 * hy))
    else:  # square and bar are axis-aligned boxes
        mask = (np.abs(x) <= hx) & (np.abs(y) <= hy)
    return mask.reshape(frames, size, k, size, k).mean(axis=(2, 4))


def render_clip_rgb(spec: ClipSpec, frames: int, size: int) -> np.ndarray:
    """float32 [3, F, S, S] in [-1, 1]."""
    cov = _coverage(spec, frames, size)[None]
    bg = np.asarray(BACKGROUND)[:, None, None, None]
    fg = np.asarray(COLOURS[spec.colour])[:, None, None, None]
    rgb01 = bg + cov * (fg - bg)
    return (rgb01 * 2.0 - 1.0).astype(np.float32)


def channel_projection(channels: int) -> np.ndarray:
    """[C, 3] matrix from RGB to C channels: identity for C = 3, else fixed random mixes.

    Rows are scaled to unit L1 norm, so values stay in [-1, 1].
    """
    if channels == 3:
        return np.eye(3)
    m = np.random.Generator(np.random.PCG64([0x5EED, channels])).standard_normal((channels, 3))
    return m / np.abs(m).sum(axis=1, keepdims=True)


def project_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    return np.einsum("cr,rfhw->cfhw", channel_projection(channels), rgb).astype(np.float32)


def unproject_channels(latents: np.ndarray) -> np.ndarray:
    """Least-squares RGB [3, F, H, W] back from projected latents, for previews."""
    p = channel_projection(latents.shape[0])
    return np.einsum("rc,cfhw->rfhw", np.linalg.pinv(p), latents).astype(np.float32)


def make_clip(seed: int, index: int, frames: int, size: int, channels: int) -> tuple[np.ndarray, str]:
    """(latents float32 [C, F, S, S], caption) of clip `index`."""
    spec = clip_spec(seed, index, frames, size)
    return project_channels(render_clip_rgb(spec, frames, size), channels), spec.caption


VOCABULARY = frozenset({"a", "moving", *SHAPES, *COLOURS, *DIRECTIONS})
"""Every word of the generator's captions; a model trained on them has seen no other."""


def unknown_words(caption: str) -> list[str]:
    """The words of `caption` outside VOCABULARY, in order, each once (case-insensitive)."""
    return list(dict.fromkeys(w for w in caption.lower().split() if w not in VOCABULARY))


def embed_caption(caption: str, text_len: int, text_dim: int, warn_unknown: bool = True) -> np.ndarray:
    """float32 [text_len, text_dim]: one fixed vector per word, zero rows after the last word.

    Any word embeds, but a model trained on the embedded data never saw words outside VOCABULARY
    (their vectors are as random to it as noise): with `warn_unknown` such a caption warns
    (UserWarning), naming them.
    """
    unknown = unknown_words(caption) if warn_unknown else []
    if unknown:
        warnings.warn(
            f"caption {caption!r} has words the synthetic data never uses: {', '.join(unknown)}; the model "
            f"knows only 'a <colour> <shape> moving <direction>' with colours {', '.join(COLOURS)}, shapes "
            f"{', '.join(SHAPES)} and directions {', '.join(DIRECTIONS)}",
            stacklevel=2,
        )
    out = np.zeros((text_len, text_dim), dtype=np.float32)
    for row, word in enumerate(caption.lower().split()[:text_len]):
        rng = np.random.Generator(np.random.PCG64(zlib.crc32(word.encode("utf-8"))))
        out[row] = rng.standard_normal(text_dim, dtype=np.float32)
    return out


def null_text_embedding(text_len: int, text_dim: int) -> np.ndarray:
    """The unconditional (CFG) embedding: all zeros, i.e. the embedding of an empty caption."""
    return np.zeros((text_len, text_dim), dtype=np.float32)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_params(
    num_clips: int, frames: int, size: int, channels: int, text_len: int, text_dim: int, seed: int = SYNTHETIC_SEED
) -> dict:
    """Everything that defines a synthetic dataset; its hash names the cache directory."""
    return {
        "generator": "moving-shapes",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "num_clips": num_clips,
        "frames": frames,
        "size": size,
        "channels": channels,
        "text_len": text_len,
        "text_dim": text_dim,
    }


def synthetic_params(data_cfg, model_cfg, seed: int = SYNTHETIC_SEED) -> dict:
    """The parameters of a run's embedded dataset (`DataConfig`, `ModelConfig`); seed=HELD_OUT_SEED
    gives its held-out split."""
    return dataset_params(
        data_cfg.synthetic_num_clips,
        data_cfg.synthetic_frames,
        data_cfg.synthetic_size,
        model_cfg.in_channels,
        data_cfg.text_len,
        model_cfg.text_dim,
        seed,
    )


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def shard_ranges(num_clips: int) -> list[range]:
    """Balanced shards of at most MAX_CLIPS_PER_SHARD clips, and at least MIN_SHARDS when possible."""
    n = max(-(-num_clips // MAX_CLIPS_PER_SHARD), min(MIN_SHARDS, num_clips))
    return [range(i * num_clips // n, (i + 1) * num_clips // n) for i in range(n)]


def write_synthetic_dataset(out_dir: str, params: dict) -> dict:
    """Write the shards and manifest.json of `params` into `out_dir` (created; must hold no shards)."""
    os.makedirs(out_dir, exist_ok=True)
    if any(name.endswith(".tar") or name == MANIFEST for name in os.listdir(out_dir)):
        raise FileExistsError(f"'{out_dir}' already holds shards or a manifest; write into an empty directory")
    p = params
    shards = []
    for number, indices in enumerate(shard_ranges(p["num_clips"])):
        samples = []
        for index in indices:
            latents, caption = make_clip(p["seed"], index, p["frames"], p["size"], p["channels"])
            text = embed_caption(caption, p["text_len"], p["text_dim"])
            samples.append((f"{index:08d}", encode_sample(latents, text, caption)))
        name = f"shard-{number:06d}.tar"
        path = os.path.join(out_dir, name)
        write_shard(path, samples)
        shards.append(
            {"name": name, "num_samples": len(indices), "bytes": os.path.getsize(path), "sha256": _sha256(path)}
        )
    manifest = {"params": params, "num_clips": p["num_clips"], "shards": shards}
    # Written last: a manifest means every shard before it is complete.
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


def read_manifest(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def dataset_is_complete(directory: str, params: dict, check_hashes: bool = False) -> bool:
    """True when `directory` holds the dataset of `params`: manifest and every shard at its size."""
    manifest = read_manifest(directory)
    if not manifest or manifest.get("params") != params:
        return False
    for shard in manifest.get("shards", []):
        path = os.path.join(directory, shard["name"])
        if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
            return False
        if check_hashes and _sha256(path) != shard["sha256"]:
            return False
    return bool(manifest.get("shards"))


def ensure_synthetic_dataset(data_cfg, model_cfg, seed: int = SYNTHETIC_SEED) -> str:
    """Generate the run's synthetic dataset once, under `data_cfg.cache_dir`; return its directory.
    seed=HELD_OUT_SEED: its held-out split (validation).

    Safe to call from every rank at once: each writes into its own temporary directory and renames
    it into place; rename is atomic, so the target is either absent or complete, and a process that
    loses the race keeps the winner's (identical) copy and deletes its own.
    """
    params = synthetic_params(data_cfg, model_cfg, seed)
    root = os.path.expanduser(data_cfg.cache_dir)
    target = os.path.join(root, f"synthetic-{params_hash(params)}")
    if dataset_is_complete(target, params):
        return target
    os.makedirs(root, exist_ok=True)
    # A crashed process leaves its temporary directory behind; it is small and never read.
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=root)
    try:
        write_synthetic_dataset(tmp, params)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is meant to be shared
        try:
            os.rename(tmp, target)
        except OSError:  # the target exists: another process renamed its copy in first, or debris
            if not dataset_is_complete(target, params):
                raise RuntimeError(
                    f"'{target}' exists but is not a complete synthetic dataset; delete it and rerun"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
