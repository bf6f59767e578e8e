"""A tiny random-weight Wan VAE and umT5 text encoder, saved like the released ones.

For trying the raw-video path (`data.format=video`) and `data/encode_latents.py` without the real
weights: `write_random_encoders(out)` writes a diffusers pipeline folder

    out/vae/            AutoencoderKLWan (z_dim latent channels, spatial factor 8, temporal 4)
    out/text_encoder/   UMT5EncoderModel (text_dim wide, one layer)
    out/tokenizer/      a word-level tokenizer over `words` (others become <unk>), EOS appended as T5's

which `data.vae_path=out/vae` and `data.text_encoder_path=out` read exactly as they read
Wan2.2-TI2V-5B-Diffusers. The weights are random (seeded): latents and text embeddings have the
right shapes and are deterministic, but carry no meaning.
"""

from __future__ import annotations

import os

DEFAULT_WORDS = tuple("a red blue green circle square cat dog moving left right up down".split())


def write_random_encoders(
    out: str,
    z_dim: int = 4,
    text_dim: int = 32,
    words: tuple[str, ...] | list[str] = DEFAULT_WORDS,
    latents_mean: list[float] | None = None,
    latents_std: list[float] | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Write out/vae, out/text_encoder and out/tokenizer; return {"vae": path, "text_encoder": out}.

    latents_mean/std: the VAE's per-channel latent normalisation (z_dim values each; default 0
    and 1). `text_dim` must be even (two attention heads). Raises FileExistsError if `out` holds files.
    """
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"'{out}' is not empty; give a new directory")
    import torch  # after the check: these imports take seconds
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    AutoencoderKLWan(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=list(latents_mean or [0.0] * z_dim),
        latents_std=list(latents_std or [1.0] * z_dim),
    ).save_pretrained(os.path.join(out, "vae"))
    special = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab = {**special, **{w: i + len(special) for i, w in enumerate(dict.fromkeys(words))}}
    config = UMT5Config(
        vocab_size=len(vocab),
        d_model=text_dim,
        num_layers=1,
        num_heads=2,
        d_kv=text_dim // 2,
        d_ff=2 * text_dim,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    UMT5EncoderModel(config).save_pretrained(os.path.join(out, "text_encoder"))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(os.path.join(out, "tokenizer"))
    return {"vae": os.path.join(out, "vae"), "text_encoder": out}
