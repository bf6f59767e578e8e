"""Upcycle a dense Wan DiT checkpoint into the MoE model a config describes (see megamoe/moe/upcycle.py).

    python launcher/upcycle.py --config configs/X.yaml --dense PATH --out DIR \
        [--mode verify|train] [--seed N] [--dtype fp32|bf16] [--check] [key=value ...]

PATH: the dense model as a diffusers transformer directory, a .safetensors file or an index.
DIR receives config.json (with the moe section) + diffusion_pytorch_model.safetensors; start
training from it with `train.init_from=DIR`. Training straight from the dense checkpoint
(`train.init_from=PATH` with the MoE config) upcycles on the fly to the same weights (seed =
train.seed), each rank reading only its slices; this tool stays to inspect and verify. --mode defaults to the config's
model.moe.shared_init ('zero' -> verify, 'noise' -> train). --check runs the dense and the
upcycled model on one random input and prints the largest output difference, which is ~0 in
verify mode when the experts are cloned and the router's weights sum to one per token.
Bad input prints one line and exits with code 2; a failed --check exits with code 1.
"""

from __future__ import annotations

import argparse
import sys

import torch

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config of the MoE model (model.moe.num_experts > 0)")
    p.add_argument("--dense", required=True, help="dense checkpoint: diffusers directory, .safetensors or index")
    p.add_argument("--out", required=True, help="output directory for the MoE weights")
    p.add_argument(
        "--mode",
        choices=["verify", "train"],
        default=None,
        help="verify: zero shared experts (MoE == dense); train: tiny shared noise (default: model.moe.shared_init)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the router init and the shared-expert noise")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="storage dtype of the written weights (routers always stay fp32)",
    )
    p.add_argument("--check", action="store_true", help="compare dense and MoE outputs on a random input")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.moe.num_experts=8")
    return p.parse_args(argv)


def check(dense_model, moe_model, cfg, seed: int) -> tuple[float, float, bool]:
    """(largest |dense - MoE|, largest |dense|, whether every token's real-expert weights summed
    to one) on one random fp32 input (2 samples, a small patch grid). The last decides whether
    cloned experts must reproduce the dense model: it holds for renormalised token choice,
    Sinkhorn, ProMoE; not for expert choice / Expert Race, where a token gets any number of experts."""
    from megamoe.moe.layer import moe_layers

    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = (int(p) for p in m.patch_size)
    latents = torch.randn(2, m.in_channels, 2 * pt, 4 * ph, 4 * pw, generator=g)
    timestep = torch.rand(2, generator=g) * 1000
    text = torch.randn(2, 8, m.text_dim, generator=g)
    layers = moe_layers(moe_model)
    for layer in layers:
        layer.record = True
    with torch.no_grad():
        ref = dense_model.eval()(latents, timestep, text)
        out = moe_model.eval()(latents, timestep, text)
    sums_to_one = True
    for layer in layers:
        probs = layer.last_routing[0][:, : cfg.model.moe.num_experts]
        sums_to_one &= bool(torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5))
        layer.record, layer.last_routing = False, None
    return float((ref - out).abs().max()), float(ref.abs().max()), sums_to_one


def main(argv=None) -> int:
    args = parse_args(argv)
    from megamoe.config import ConfigError, load_config
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights, write_diffusers_weights
    from megamoe.moe.upcycle import dense_config, mode_of, parameter_counts, slices_per_ffn, upcycle_model

    try:
        cfg = load_config(args.config, args.overrides)
        mode = args.mode or mode_of(cfg.model)
        model = upcycle_model(args.dense, cfg.model, mode=mode, seed=args.seed)
    except (ConfigError, ValueError) as exc:  # WeightsError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    state = model.state_dict()
    if args.dtype == "bf16":
        state = {k: v if ".router." in k else v.bfloat16() for k, v in state.items()}
    write_diffusers_weights(state, cfg.model, args.out)

    counts = parameter_counts(model)
    moe = cfg.model.moe
    print(
        f"upcycled ({mode} mode, seed {args.seed}) {moe.num_experts} experts x {slices_per_ffn(cfg.model)} "
        f"slice(s) per dense FFN, top-{moe.top_k}, router '{moe.router}' -> {args.out}"
    )
    print(
        f"parameters: dense {counts['dense']:,} | MoE total {counts['moe_total']:,} | "
        f"activated per token {counts['activated']:,}"
    )
    print(f"train from it with: train.init_from={args.out}")

    if args.check:
        dense = build_model(dense_config(cfg.model), initialize=False)  # every weight is loaded next
        load_diffusers_weights(dense, args.dense)
        diff, scale, sums_to_one = check(dense, model, cfg, args.seed)
        noisy = mode == "train" and moe.num_shared_experts > 0
        expect_equal = not noisy and slices_per_ffn(cfg.model) == 1 and sums_to_one
        why = (
            "expected ~0"
            if expect_equal
            else (
                "not expected to be 0: "
                + (
                    "train mode adds shared-expert noise"
                    if noisy
                    else "fine-grained slices"
                    if slices_per_ffn(cfg.model) > 1
                    else "this router's weights do not sum to one per token"
                )
            )
        )
        print(f"check: max |dense - moe| = {diff:.3e} (output max |dense| = {scale:.3e}); {why}")
        if expect_equal and diff > 1e-4 * max(scale, 1.0):
            print("check FAILED: the upcycled model does not reproduce the dense one", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
