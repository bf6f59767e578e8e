"""The frozen encoders of raw-video training: Wan VAE latents and umT5 text embeddings, as Wan computes them.

The raw-video training mode (megamoe/data/video_latents.py) and the latent encoding tool
(megamoe/tools/latent_encoding.py, behind `data/encode_latents.py`) both call `encode_video` /
`encode_text`, so on-the-fly and precomputed latents are the same numbers.
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
import os
import re

import torch


def load_vae(vae_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """diffusers `AutoencoderKLWan` from a local directory, in eval mode without gradients."""
    from diffusers import AutoencoderKLWan

    if not os.path.isdir(vae_dir):
        raise FileNotFoundError(
            f"VAE directory '{vae_dir}' does not exist; give a local AutoencoderKLWan "
            f"directory (config.json + weights), e.g. <Wan2.2-TI2V-5B-Diffusers>/vae"
        )
    vae = AutoencoderKLWan.from_pretrained(vae_dir, torch_dtype=dtype).to(device).eval()
    return vae.requires_grad_(False)


def load_text_encoder(text_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(UMT5EncoderModel, tokenizer) from one local directory (or `text_encoder/` + `tokenizer/` in it)."""
    import transformers
    from transformers import AutoTokenizer, UMT5EncoderModel

    if not os.path.isdir(text_dir):
        raise FileNotFoundError(
            f"text encoder directory '{text_dir}' does not exist; give a local directory "
            f"with a UMT5EncoderModel and its tokenizer"
        )
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
        raise ValueError(
            f"the Wan VAE needs 4k+1 frames and sides divisible by {factor}; "
            f"got {tuple(pixels.shape[2:])}: pick a bucket that satisfies both"
        )
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
    inputs = tokenizer(
        [clean_prompt(c) for c in captions],
        padding="max_length",
        max_length=text_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(encoder.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = encoder(ids, mask).last_hidden_state.float()
    # Zeroing by the mask is Wan's `u[:v]` then zero-pad: padding positions carry no text.
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)
