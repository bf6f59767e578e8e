"""Raw video shards -> latent shards: the tool behind `data/encode_latents.py`.

Each sample's clip is decoded to the given frame window (drawn from (seed, key), so reruns give the
same latents), encoded by the frozen Wan VAE and umT5 exactly as raw-video training encodes it
(megamoe/data/wan_encoders.py), and written as a latent sample (megamoe/tools/latent_shards.py)
into a latent shard of the raw shard's name. Bad samples are skipped and counted by cause.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib

import numpy as np
import torch

from megamoe.data.errors import BAD_TAR, SampleError
from megamoe.data.video import FrameSpec, decode_raw_sample
from megamoe.data.wan_encoders import encode_text, encode_video
from megamoe.tools.latent_shards import encode_sample, read_shard, write_shard


def _read_raw_shard(path: str) -> list[tuple[str, dict[str, bytes]]]:
    try:
        return read_shard(path)
    except (tarfile.TarError, OSError, EOFError) as e:  # not a tar, truncated, unreadable
        raise SampleError(BAD_TAR, shard=path, detail=f"{type(e).__name__}: {e}") from None


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """The frame-window rng of one sample: a function of (seed, key), not of shard order or batching."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def _encode_batch(batch: list[dict], vae, encoder, tokenizer, text_len: int) -> list[tuple[str, dict[str, bytes]]]:
    latents = encode_video(vae, torch.stack([b["pixels"] for b in batch]))
    text = encode_text(encoder, tokenizer, [b["caption"] for b in batch], text_len)
    return [
        (b["key"], encode_sample(z.cpu().numpy(), t.cpu().numpy(), b["caption"]))
        for b, z, t in zip(batch, latents, text)
    ]


def encode_raw_shards(
    raw_shards: list[str],
    out_dir: str,
    vae,
    encoder,
    tokenizer,
    spec: FrameSpec,
    text_len: int,
    seed: int = 0,
    batch_size: int = 1,
    timeout_s: float | None = None,
    log=print,
) -> dict:
    """Encode every raw shard into a latent shard of the same name in `out_dir`; skip and count bad samples.

    Returns {'samples': n, 'skipped': {cause: n}, 'shards': [...]} and writes it with the
    parameters to `out_dir/manifest.json` (written last: its presence means the shards are complete).
    """
    os.makedirs(out_dir, exist_ok=True)
    skipped: dict[str, int] = {}
    shards, total = [], 0
    for shard in raw_shards:
        try:
            raw = _read_raw_shard(shard)
        except SampleError as e:
            skipped[e.cause] = skipped.get(e.cause, 0) + 1
            log(f"skip: {e}")
            continue
        samples, batch = [], []
        for number, (key, members) in enumerate(raw, 1):
            try:
                batch.append(decode_raw_sample(key, members, shard, spec, sample_rng(seed, key), timeout_s=timeout_s))
            except SampleError as e:
                skipped[e.cause] = skipped.get(e.cause, 0) + 1
                log(f"skip: {e}")
            if batch and (len(batch) == batch_size or number == len(raw)):
                # Encode as we go: only batch_size clips of pixels (388 MB each at 81x480x832) live at once.
                samples += _encode_batch(batch, vae, encoder, tokenizer, text_len)
                batch = []
        name = os.path.basename(shard)
        write_shard(os.path.join(out_dir, name), samples)
        shards.append({"name": name, "num_samples": len(samples)})
        total += len(samples)
        log(f"{name}: {len(samples)} of {len(raw)} samples encoded")
    report = {"samples": total, "skipped": skipped, "shards": shards}
    params = {
        "frames": spec.num_frames,
        "fps": spec.fps,
        "height": spec.height,
        "width": spec.width,
        "text_len": text_len,
        "seed": seed,
        "z_dim": vae.config.z_dim,
        "text_dim": encoder.config.d_model,
        "latents_normalised": "(z - latents_mean) / latents_std",
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"params": params, **report}, f, indent=2, sort_keys=True)
        f.write("\n")
    return report
