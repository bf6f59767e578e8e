"""Raw-video training: the frozen VAE and text encoder turn a loader batch into the DiT's inputs.

Loader workers decode pixels; encoding happens here, in the training process, on its device,
because the encoders are large models that should sit once on the accelerator, not once per
worker. The numbers are those of `data/encode_latents.py` (same `encode_video` / `encode_text`
of wan_encoders.py), so training on raw shards and on their precomputed latents sees the same latents.
"""

from __future__ import annotations

import torch

from megamoe.data.worker import DataError


class VideoToLatents:
    """batch {'pixels' uint8 [B, F, H, W, 3], 'caption'} -> the same batch plus 'latents' and 'text'."""

    def __init__(self, vae, encoder, tokenizer, text_len: int):
        self.vae, self.encoder, self.tokenizer, self.text_len = vae, encoder, tokenizer, text_len

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> VideoToLatents:
        from megamoe.data.wan_encoders import load_text_encoder, load_vae

        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        try:
            vae = load_vae(cfg.data.vae_path, device, dtype)
            encoder, tokenizer = load_text_encoder(cfg.data.text_encoder_path, device, dtype)
        except FileNotFoundError as exc:  # the message names the key's directory and what it must hold
            raise DataError(f"data.vae_path / data.text_encoder_path: {exc}") from None
        to_latents = cls(vae, encoder, tokenizer, cfg.data.text_len)
        to_latents.check_model(cfg.model)
        return to_latents

    @property
    def compression(self) -> tuple[int, int]:
        """(temporal, spatial) downsampling of the VAE: sizes video buckets in latent tokens."""
        from megamoe.data.buckets import vae_compression

        return vae_compression(self.vae.config)

    def check_model(self, model_cfg) -> None:
        z_dim, d_model = self.vae.config.z_dim, self.encoder.config.d_model
        if z_dim != model_cfg.in_channels or d_model != model_cfg.text_dim:
            raise DataError(
                f"the VAE gives {z_dim} latent channels and the text encoder {d_model}-wide embeddings, "
                f"but model.in_channels={model_cfg.in_channels} and model.text_dim={model_cfg.text_dim}; "
                f"set them to {z_dim} and {d_model}"
            )

    def model_range(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, F, H, W, 3] -> float32 [B, 3, F, H, W] in [-1, 1], on the VAE's device.

        The loader hands over uint8 so that its workers and the host-to-device copy move a
        quarter of float32's bytes; the scaling is one cheap kernel here."""
        device = next(self.vae.parameters()).device
        pixels = pixels.to(device, non_blocking=True).permute(0, 4, 1, 2, 3)
        return pixels.float().div_(127.5).sub_(1.0)

    def __call__(self, batch: dict) -> dict:
        from megamoe.data.wan_encoders import encode_text, encode_video

        out = dict(batch)
        out["latents"] = encode_video(self.vae, self.model_range(batch["pixels"]))
        out["text"] = encode_text(self.encoder, self.tokenizer, list(batch["caption"]), self.text_len)
        return out
