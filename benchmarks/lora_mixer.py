"""LoRA-Mixer fine-tuning (megamoe/model/lora_mixer.py) against full fine-tuning of the same model.

    python benchmarks/lora_mixer.py [--repeats 7] [--merge-steps 60]

Prints, for the 5B config (configs/wan2.2_ti2v_5b_lora_mixer.yaml, counted on the meta device) and
the tiny config (configs/tiny.yaml's model with the same adapter settings):
  - trainable parameters, and the bytes of what trains: Adam's two fp32 moments, the fp32 master copy
    and the bf16 gradient per trainable parameter (14 B, the ZeRO paper's count for bf16 mixed
    precision, before any ZeRO partitioning) plus the bf16 weights of every parameter (2 B);
  - forward FLOPs per video token, analytic (train/throughput.py's count of the base plus
    lora_mixer.flops_per_token), and a training step's: full fine-tuning 3 x forward; LoRA-Mixer
    2 x the base forward (the forward and the input gradients; frozen weights need no weight
    gradient) + 3 x the adapters';
  - CPU time of a training step (forward, backward, AdamW step) and of a forward, interleaved in one
    process (full, lora, full, lora, ...; the first round warms up; median of the rest): one
    self-attention at the 5B width (3072, 24 heads) on 512 tokens, and the whole tiny model;
  - the merged export's error (posttrain/lora_export.py): the tiny model fine-tuned for --merge-steps
    steps on a fixed batch, gates calibrated on 4 batches, then the RMS of the merged dense model's
    prediction minus the routed model's, as a fraction of the routed model's own change from the base
    (0 = exact, 1 = the merge keeps nothing of the fine-tune), on the calibration batches and on others.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from megamoe.config import DiffusionConfig, LoRAConfig, load_config
from megamoe.diffusion.flow import flow_matching_loss
from megamoe.model.dit import build_model, count_parameters
from megamoe.model.lora_mixer import flops_per_token, freeze_base, routing_losses, trainable_parameters
from megamoe.posttrain import lora_export
from megamoe.tools.layout_planner import tokens_of
from megamoe.train.throughput import forward_flops_per_token

TRAINED_BYTES = 14  # fp32 Adam m and v, fp32 master weight, bf16 gradient
WEIGHT_BYTES = 2  # bf16 weight, frozen or not


def memory_and_flops(name, model_cfg, tokens: int, text_len: int) -> None:
    dense_cfg = dataclasses.replace(model_cfg, lora=LoRAConfig())
    full, lora = build_model(dense_cfg, "meta"), build_model(model_cfg, "meta")
    n_full, n_lora, trained = count_parameters(full), count_parameters(lora), trainable_parameters(lora)
    gib = 2**30
    full_bytes = n_full * (WEIGHT_BYTES + TRAINED_BYTES)
    lora_bytes = n_lora * WEIGHT_BYTES + trained * TRAINED_BYTES
    base = forward_flops_per_token(dense_cfg, tokens, text_len)
    extra = flops_per_token(model_cfg.dim, model_cfg.num_layers, tokens, text_len, model_cfg.lora)
    print(f"\n## {name} ({tokens} video tokens, {text_len} text tokens per sample)")
    print(f"trainable parameters: full {n_full:,}; LoRA-Mixer {trained:,} ({trained / n_full:.2%})")
    print(
        f"weights + training state: full {full_bytes / gib:.2f} GiB; LoRA-Mixer {lora_bytes / gib:.2f} GiB "
        f"({lora_bytes / full_bytes:.1%}); optimizer state alone (Adam m, v, master: 12 B) "
        f"{n_full * 12 / gib:.2f} vs {trained * 12 / gib:.3f} GiB"
    )
    print(
        f"forward GFLOP per video token: base {base / 1e9:.4f}, adapters +{extra / 1e9:.4f} "
        f"(+{extra / base:.2%}); training step: full {3 * base / 1e9:.4f}, "
        f"LoRA-Mixer {(2 * base + 3 * extra) / 1e9:.4f} ({(2 * base + 3 * extra) / (3 * base):.3f}x)"
    )


def batch(seed: int, cfg, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(size, cfg.in_channels, 5, 16, 16, generator=g)
    return latents, torch.randn(size, 8, cfg.text_dim, generator=g)


def pretrained(cfg, seed: int = 0):
    """The tiny model standing in for a trained base: its zero head made non-zero, so adapters matter."""
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        model.proj_out.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(99))
    return model


def time_steps(model_cfg, repeats: int) -> None:
    dense_cfg = dataclasses.replace(model_cfg, lora=LoRAConfig())
    diffusion = DiffusionConfig(text_dropout=0.0)
    models = {"full": pretrained(dense_cfg), "lora": pretrained(model_cfg)}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for k, m in models.items()}
    latents, text = batch(0, model_cfg)
    step_times, forward_times = {k: [] for k in models}, {k: [] for k in models}
    for _ in range(repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            loss, _ = flow_matching_loss(model, latents, text, diffusion, torch.Generator().manual_seed(1))
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            step_times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                flow_matching_loss(model, latents, text, diffusion, torch.Generator().manual_seed(1))
            forward_times[name].append(time.perf_counter() - start)
    step = {k: statistics.median(v[1:]) for k, v in step_times.items()}
    forward = {k: statistics.median(v[1:]) for k, v in forward_times.items()}
    print(
        f"CPU time, tiny model, batch 8 ({torch.get_num_threads()} threads, median of {repeats}): training step "
        f"full {step['full'] * 1e3:.1f} ms, LoRA-Mixer {step['lora'] * 1e3:.1f} ms ({step['lora'] / step['full']:.3f}x); "
        f"forward base {forward['full'] * 1e3:.1f} ms, with adapters {forward['lora'] * 1e3:.1f} ms "
        f"({forward['lora'] / forward['full']:.3f}x)"
    )


def time_attention(model_cfg, tokens: int, repeats: int) -> None:
    """One self-attention at the model's width on `tokens` tokens: base trained in full against
    frozen with adapters (its q, k, v, o, the adapters' share of a real block's attention FLOPs)."""
    from megamoe.model.attention import WanAttention
    from megamoe.model.init import reset_parameters

    layers = {}
    for name, lora in (("full", None), ("lora", model_cfg.lora)):
        torch.manual_seed(0)
        layer = WanAttention(model_cfg.dim, model_cfg.num_heads, model_cfg.eps, lora)
        reset_parameters(layer)
        if lora is not None:  # frozen base; B made non-zero, as after some training
            freeze_base(layer)
            for adapter in layer.lora.values():
                adapter.lora_B.data.normal_(std=1e-3)
        layers[name] = (layer, torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad]))
    x = torch.randn(1, tokens, model_cfg.dim)
    step_times, forward_times = {k: [] for k in layers}, {k: [] for k in layers}
    for _ in range(repeats + 1):
        for name, (layer, optimizer) in layers.items():
            start = time.perf_counter()
            out = layer(x)
            optimizer.zero_grad()
            out.square().mean().backward()
            optimizer.step()
            step_times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                layer(x)
            forward_times[name].append(time.perf_counter() - start)
    step = {k: statistics.median(v[1:]) for k, v in step_times.items()}
    forward = {k: statistics.median(v[1:]) for k, v in forward_times.items()}
    print(
        f"CPU time, one self-attention of width {model_cfg.dim} on {tokens} tokens ({torch.get_num_threads()} threads, "
        f"median of {repeats}): training step full {step['full'] * 1e3:.0f} ms, LoRA-Mixer {step['lora'] * 1e3:.0f} ms "
        f"({step['lora'] / step['full']:.3f}x); forward base {forward['full'] * 1e3:.0f} ms, with adapters "
        f"{forward['lora'] * 1e3:.0f} ms ({forward['lora'] / forward['full']:.3f}x)"
    )


def merge_error(model_cfg, steps: int) -> None:
    diffusion = DiffusionConfig(text_dropout=0.0)
    base, model = pretrained(dataclasses.replace(model_cfg, lora=LoRAConfig())), pretrained(model_cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    latents, text = batch(0, model_cfg)
    first = last = None
    for step in range(steps):
        loss, _ = flow_matching_loss(model, latents, text, diffusion, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        (loss + model_cfg.lora.balance_loss * routing_losses(model)["lora_balance"]).backward()
        optimizer.step()
        first, last = first if first is not None else loss.item(), loss.item()
    calibration = [batch(s, model_cfg) for s in range(4)]
    gates = lora_export.calibrate(model, calibration, diffusion, torch.Generator().manual_seed(0))
    merged = build_model(dataclasses.replace(model_cfg, lora=LoRAConfig()), initialize=False)
    merged.load_state_dict(lora_export.merged_state_dict(model, gates))
    print(f"merged export, tiny model fine-tuned {steps} steps (flow loss {first:.4f} -> {last:.4f}):")
    for what, batches in (
        ("calibration batches", calibration),
        ("other batches", [batch(s, model_cfg) for s in (7, 8)]),
    ):
        error = lora_export.prediction_error(model, merged, batches, diffusion, seed=3)
        change = lora_export.prediction_error(model, base, batches, diffusion, seed=3)
        print(
            f"  {what}: RMS(merged - routed) {error:.5f}, RMS(base - routed) {change:.5f}, ratio {error / change:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--merge-steps", type=int, default=60)
    args = parser.parse_args()
    big = load_config("configs/wan2.2_ti2v_5b_lora_mixer.yaml")
    print(f"adapters: {big.model.lora}")
    memory_and_flops("Wan2.2-TI2V-5B", big.model, tokens=27_280, text_len=big.data.text_len)  # a 720p 121-frame clip
    tiny = dataclasses.replace(load_config("configs/tiny.yaml").model, lora=big.model.lora)
    # The clips the timed steps use (`batch`: 5 x 16 x 16 latents), in tiny.yaml's patches.
    memory_and_flops("tiny", tiny, tokens=tokens_of(tiny, (5, 16, 16)), text_len=8)
    time_attention(big.model, tokens=512, repeats=args.repeats)
    time_steps(tiny, args.repeats)
    merge_error(tiny, args.merge_steps)


if __name__ == "__main__":
    main()
