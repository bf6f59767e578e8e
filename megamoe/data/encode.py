"""Raw video shards -> latent shards: Wan VAE latents and umT5 text embeddings, as Wan computes them.

The library half of `data/encode_latents.py`; the raw-video training mode calls the same
`encode_video` / `encode_text`, so precomputed and on-the-fly latents are the same numbers.
Models load from local directories only (`from_pretrained(dir)`), never from the hub.

Conventions, taken from diffusers 0.42's Wan pipelines so a model trained on these latents
samples with the stock pipeline:
  - latents: the posterior's mode ("argmax", `retrieve_latents(..., sample_mode="argmax")` in
    pipeline_wan_video2video.py), normalised per channel as `(z - latents_mean) / latents_std`
    with the VAE config's lists (video2video `prepare_latents`: `(init_latents - latents_mean) *
    (1 / latents_std)`; pipeline_wan.py decodes with the inverse, `latents * std + mean`).
  - text: `_get_t5_prompt_embeds` in pipeline_wan.py: prompt_clean (whitespace collapse; ftfy when
    installed), pad/truncate to `max_length` with attention mask, run the encoder, keep the first
    `mask.sum()` rows of `last_hidden_state` and zero the rest.
"""

from __future__ import annotations

import html
import json
import os
import re
import tarfile
import zlib

import numpy as np
import torch

from .errors import BAD_TAR, SampleError
from .synthetic import encode_sample, write_shard
from .video import FrameSpec, decode_raw_sample


def load_vae(vae_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """diffusers `AutoencoderKLWan` from a local directory, in eval mode without gradients."""
    from diffusers import AutoencoderKLWan

    if not os.path.isdir(vae_dir):
        raise FileNotFoundError(f"VAE directory '{vae_dir}' does not exist; give a local AutoencoderKLWan "
                                f"directory (config.json + weights), e.g. <Wan2.2-TI2V-5B-Diffusers>/vae")
    vae = AutoencoderKLWan.from_pretrained(vae_dir, torch_dtype=dtype).to(device).eval()
    return vae.requires_grad_(False)


def load_text_encoder(text_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(UMT5EncoderModel, tokenizer) from one local directory (or `text_encoder/` + `tokenizer/` in it)."""
    import transformers
    from transformers import AutoTokenizer, UMT5EncoderModel

    if not os.path.isdir(text_dir):
        raise FileNotFoundError(f"text encoder directory '{text_dir}' does not exist; give a local directory "
                                f"with a UMT5EncoderModel and its tokenizer")
    model_dir, tok_dir = text_dir, text_dir
    if os.path.isdir(os.path.join(text_dir, "text_encoder")):  # a diffusers pipeline directory
        model_dir, tok_dir = os.path.join(text_dir, "text_encoder"), os.path.join(text_dir, "tokenizer")
    # transformers >= 4.56 names the load dtype `dtype`, older versions `torch_dtype`; `.to` makes sure.
    new_api = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 56)
    encoder = UMT5EncoderModel.from_pretrained(model_dir, **{"dtype" if new_api else "torch_dtype": dtype})
    encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return encoder, tokenizer


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape).to(like.device)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape).to(like.device)
    return mean, std


@torch.no_grad()
def encode_video(vae, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents float32 [B, z_dim, 1 + (F-1)/4, H/s, W/s]."""
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels [B, 3, F, H, W], got shape {tuple(pixels.shape)}")
    factor = vae.config.scale_factor_spatial or 8
    if (pixels.shape[2] - 1) % 4 or pixels.shape[3] % factor or pixels.shape[4] % factor:
        raise ValueError(f"the Wan VAE needs 4k+1 frames and sides divisible by {factor}; "
                         f"got {tuple(pixels.shape[2:])}: pick a bucket that satisfies both")
    param = next(vae.parameters())
    z = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode().float()
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of encode_video (for previews and tests): [B, z, f, h, w] -> pixels in about [-1, 1]."""
    mean, std = _latent_stats(vae, latents)
    param = next(vae.parameters())
    with torch.no_grad():
        return vae.decode((latents.float() * std + mean).to(param.device, param.dtype)).sample.float()


def clean_prompt(text: str) -> str:
    """Wan's prompt_clean: ftfy.fix_text when installed, html unescape twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@torch.no_grad()
def encode_text(encoder, tokenizer, captions: list[str], text_len: int) -> torch.Tensor:
    """captions -> float32 [B, text_len, d_model]; rows past each caption's tokens are zero, as in Wan."""
    inputs = tokenizer([clean_prompt(c) for c in captions], padding="max_length", max_length=text_len,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = encoder(ids, mask).last_hidden_state.float()
    # Zeroing by the mask is Wan's `u[:v]` then zero-pad: padding positions carry no text.
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


# --- the shard-to-shard tool ----------------------------------------------------------------


def _read_raw_shard(path: str) -> list[tuple[str, dict[str, bytes]]]:
    from .stream import read_shard

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
    return [(b["key"], encode_sample(z.cpu().numpy(), t.cpu().numpy(), b["caption"]))
            for b, z, t in zip(batch, latents, text)]


def encode_raw_shards(raw_shards: list[str], out_dir: str, vae, encoder, tokenizer, spec: FrameSpec, text_len: int,
                      seed: int = 0, batch_size: int = 1, timeout_s: float | None = None, log=print) -> dict:
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
    params = {"frames": spec.num_frames, "fps": spec.fps, "height": spec.height, "width": spec.width,
              "text_len": text_len, "seed": seed, "z_dim": vae.config.z_dim,
              "text_dim": encoder.config.d_model, "latents_normalised": "(z - latents_mean) / latents_std"}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"params": params, **report}, f, indent=2, sort_keys=True)
        f.write("\n")
    return report
