"""Checks of a run configuration that types cannot express: `validate(cfg, world_size)`.

Heads dividing the hidden size, parallel sizes dividing the world size, sample shapes that fit
the model and layout, a setting that would take no effect, ... Each rule that a part of the
model owns is checked with that part's own parser (`moe_layer_indices`, the router registry's
`check_router_config`, `checkpointed_blocks`, the loader's `shape_problem`), so no rule is
copied here. Raises `ConfigError` with a one-line message naming the key and the fix, before any
process group exists, so a bad config never costs a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import json
import os

from megamoe.config import (
    BlockRouterConfig,
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    LoggingConfig,
    LoRAConfig,
    MixtureOfDepthsConfig,
    ModelConfig,
    MoEConfig,
    can_embed_captions,
    has_held_out_data,
    sample_interval,
    sequence_shards,
    val_interval,
)
from megamoe.data.buckets import latent_shape, shape_problem, vae_compression
from megamoe.data.buckets import tokens_per_sample as bucket_tokens
from megamoe.model.activation_checkpointing import checkpointed_blocks
from megamoe.model.mixture_of_depths import ROUTER_FEATURES, UPDATE_SCALES, mod_layer_indices
from megamoe.model.mixture_of_depths import tokens_per_sample as routed_tokens
from megamoe.moe.layer import moe_layer_indices, router_config
from megamoe.moe.routers import check_router_config


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Checks that types cannot express; raises ConfigError naming the key and the fix."""
    m, p, o, t, d = cfg.model, cfg.parallel, cfg.optim, cfg.train, cfg.data
    for name in ("dim", "num_layers", "num_heads", "ffn_dim", "in_channels", "out_channels", "text_dim", "freq_dim"):
        _check(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _check(
        m.dim % m.num_heads == 0,
        f"model.num_heads={m.num_heads} does not divide model.dim={m.dim}; choose heads that divide the hidden size",
    )
    head_dim = m.dim // m.num_heads
    _check(
        head_dim % 2 == 0 and head_dim >= 6,
        f"head dim model.dim/model.num_heads={head_dim} must be even and >= 6 for 3D RoPE; change model.num_heads",
    )
    _check(
        len(m.patch_size) == 3 and all(x > 0 for x in m.patch_size),
        f"model.patch_size must be three positive ints (frames, height, width), got {m.patch_size}",
    )
    _validate_moe(m)
    _validate_lora(cfg)
    _validate_block_router(m)
    _validate_mod(cfg)
    names = ("tensor_parallel_size", "context_parallel_size", "expert_parallel_size")
    for name in names:
        _check(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    model_parallel = p.tensor_parallel_size * p.context_parallel_size
    _check(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by parallel.tensor_parallel_size x "
        f"parallel.context_parallel_size = {model_parallel}; launch a multiple of {model_parallel} ranks or change them",
    )
    _check(
        not (m.moe.num_experts > 0 and m.moe.router == "expert_race" and m.moe.race_scope == "global")
        or world_size // model_parallel > 1,
        "model.moe.race_scope=global has no effect with one data-parallel rank (the global batch is the "
        "micro-batch); remove it or launch more data-parallel ranks",
    )
    _check(
        world_size % p.expert_parallel_size == 0,
        f"world size {world_size} is not divisible by parallel.expert_parallel_size={p.expert_parallel_size}; "
        f"launch a multiple of {p.expert_parallel_size} ranks or change it",
    )
    if p.expert_parallel_size > 1:
        _check(
            m.moe.num_experts > 0,
            f"parallel.expert_parallel_size={p.expert_parallel_size} needs an MoE model; "
            f"set model.moe.num_experts or parallel.expert_parallel_size=1",
        )
        _check(
            m.moe.num_experts % p.expert_parallel_size == 0,
            f"model.moe.num_experts={m.moe.num_experts} is not divisible by parallel.expert_parallel_size="
            f"{p.expert_parallel_size}; choose sizes that divide",
        )
        # DeepSpeed without ZeRO clips by the mean over ranks of each rank's own norm, which under
        # EP covers different experts on different ranks: not the global norm.
        _check(
            o.zero_stage > 0 or o.grad_clip == 0,
            "optim.zero_stage=0 with parallel.expert_parallel_size > 1 clips by a wrong gradient norm; "
            "set optim.zero_stage to 1 or 2, or optim.grad_clip=0",
        )
    _check(d.micro_batch_size >= 1, f"data.micro_batch_size must be >= 1, got {d.micro_batch_size}")
    _check(d.text_len >= 1, f"data.text_len must be >= 1, got {d.text_len}")
    if d.path is None:
        _check(
            d.synthetic_num_clips >= world_size * d.micro_batch_size,
            f"data.synthetic_num_clips={d.synthetic_num_clips} is fewer than one global batch; raise it",
        )
    _validate_data(d)
    _validate_model_parallel(cfg)
    _validate_sample_shapes(cfg)
    _check(
        cfg.diffusion.timestep_sampling in ("uniform", "logit_normal"),
        f"diffusion.timestep_sampling must be 'uniform' or 'logit_normal', got '{cfg.diffusion.timestep_sampling}'",
    )
    _check(cfg.diffusion.shift > 0, f"diffusion.shift must be > 0, got {cfg.diffusion.shift}")
    _check(cfg.diffusion.logit_std > 0, f"diffusion.logit_std must be > 0, got {cfg.diffusion.logit_std}")
    if cfg.diffusion.timestep_sampling != "logit_normal":
        _refuse_changed(
            cfg.diffusion,
            DiffusionConfig(),
            ("logit_mean", "logit_std"),
            "diffusion",
            f"with diffusion.timestep_sampling={cfg.diffusion.timestep_sampling}",
            "set diffusion.timestep_sampling=logit_normal or remove it",
        )
    _check(
        0.0 <= cfg.diffusion.text_dropout < 1.0,
        f"diffusion.text_dropout must be in [0, 1), got {cfg.diffusion.text_dropout}",
    )
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas must be two numbers in [0, 1), got {o.betas}",
    )
    _check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
    _check(
        o.zero_stage in (0, 1, 2),
        f"optim.zero_stage={o.zero_stage} is not supported; use 0, 1 or 2 (ZeRO-3 does not shard experts correctly)",
    )
    # DeepSpeed's bf16 optimizer without ZeRO keeps Adam's state on fp32 copies of the weights that
    # its per-parameter API (deepspeed.utils.safe_get_full_*) does not reach: the run would train and
    # then fail at its first checkpoint.
    _check(
        not (t.precision == "bf16" and o.zero_stage == 0),
        "train.precision=bf16 with optim.zero_stage=0 cannot save its optimizer state in a checkpoint; "
        "set optim.zero_stage to 1 or 2 (it shards, and costs no extra memory), or train.precision=fp32",
    )
    _check(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _check(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _check(t.precision in ("fp32", "bf16"), f"train.precision must be 'fp32' or 'bf16', got '{t.precision}'")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device must be 'auto', 'cpu' or 'cuda', got '{t.device}'")
    _check(t.exit_interval >= 0, f"train.exit_interval must be >= 0 (0 = never), got {t.exit_interval}")
    _check(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    checkpointed_blocks(t.activation_checkpointing, m.num_layers)  # the model's parser: ConfigError naming the key
    _check(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1) (0 disables), got {t.ema_decay}")
    _check(cfg.checkpoint.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {cfg.checkpoint.every_steps}")
    _check(
        cfg.checkpoint.keep_last >= 1,
        f"checkpoint.keep_last must be >= 1 (the newest checkpoint is always kept), got {cfg.checkpoint.keep_last}",
    )
    _check(cfg.logging.every_steps >= 1, f"logging.every_steps must be >= 1, got {cfg.logging.every_steps}")
    _validate_evidence(cfg)


def _validate_evidence(cfg: Config) -> None:
    """The validation loss needs held-out data and the sample grid embeddable captions; their
    other keys must not be set while they are off (train/validation.py)."""
    lg, d, t = cfg.logging, cfg.data, cfg.train
    for name in ("val_every", "sample_every"):
        value = getattr(lg, name)
        _check(value is None or value >= 0, f"logging.{name} must be >= 0 (0 = off) or null (auto), got {value}")
    _check(lg.val_batches >= 1, f"logging.val_batches must be >= 1, got {lg.val_batches}")
    for name in ("val_every", "sample_every"):
        value = getattr(lg, name)
        _check(
            value is None or value <= t.steps,
            f"logging.{name}={value} is past train.steps={t.steps}, so it would never run; "
            f"set it <= train.steps, 0 (off) or null (auto)",
        )
    # The intervals the loop runs (config.py): a null interval past train.steps is off for this run
    # only, so a short debug run of a full config keeps its data.val_path and captions.
    val, sample = val_interval(cfg), sample_interval(cfg)
    _check(
        val == 0 or has_held_out_data(d),
        f"logging.val_every={lg.val_every} needs held-out data, and data.path has none built in; set data.val_path "
        f"to held-out shards or logging.val_every=0",
    )
    default = LoggingConfig()
    if val == 0 and not (lg.val_every is None and has_held_out_data(d)):
        _check(
            d.val_path is None,
            "data.val_path is read only by the validation loss; set logging.val_every > 0 or drop it",
        )
        _check(
            lg.val_batches == default.val_batches,
            "logging.val_batches has no effect with the validation loss off; set logging.val_every > 0 or drop it",
        )
    _check(
        sample == 0 or can_embed_captions(d),
        f"logging.sample_every={lg.sample_every} needs captions embedded, which latent shards cannot do: use the "
        f"embedded data or raw video shards (data.format=video with data.text_encoder_path), or logging.sample_every=0",
    )
    if sample == 0 and not (lg.sample_every is None and can_embed_captions(d)):
        _check(
            lg.sample_captions == default.sample_captions,
            "logging.sample_captions has no effect with samples off; set logging.sample_every > 0 or drop it",
        )
    else:
        _check(len(lg.sample_captions) > 0, "logging.sample_captions is empty; give at least one prompt")


def _validate_model_parallel(cfg: Config) -> None:
    """Tensor and context parallelism split heads, FFN columns and tokens: the sizes must divide them."""
    m, p = cfg.model, cfg.parallel
    tp, cp = p.tensor_parallel_size, p.context_parallel_size
    if tp == 1 and cp == 1:
        return
    # TP gives each rank num_heads / TP heads; Ulysses then trades sequence for heads over CP.
    _check(
        m.num_heads % (tp * cp) == 0,
        f"model.num_heads={m.num_heads} is not divisible by parallel.tensor_parallel_size x "
        f"parallel.context_parallel_size = {tp * cp}; choose parallel sizes that divide the heads",
    )
    _check(
        m.ffn_dim % tp == 0,
        f"model.ffn_dim={m.ffn_dim} is not divisible by parallel.tensor_parallel_size={tp}; "
        f"choose a tensor-parallel size that divides it",
    )
    if tp > 1:
        # Without SP every TP rank routes the same tokens, so each token would reach its
        # experts TP times (Megatron refuses MoE + TP without SP for the same reason).
        _check(
            m.moe.num_experts == 0 or p.sequence_parallel,
            f"parallel.tensor_parallel_size={tp} with an MoE model needs parallel.sequence_parallel=true",
        )


def _validate_data(d: DataConfig) -> None:
    _check(d.format in ("latent", "video"), f"data.format must be 'latent' or 'video', got '{d.format}'")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0 (0 = read in the training process), got {d.num_workers}")
    _check(
        d.video_frames >= 1 and (d.video_frames - 1) % 4 == 0,
        f"data.video_frames must be 4k+1 (1, 5, ..., 17, ..., 81) for the causal video VAE, got {d.video_frames}",
    )
    _check(d.video_fps > 0, f"data.video_fps must be > 0, got {d.video_fps}")
    _check(
        d.tokens_per_batch >= 0,
        f"data.tokens_per_batch must be >= 0 (0 = data.micro_batch_size), got {d.tokens_per_batch}",
    )
    _check(
        0.0 <= d.max_failure_fraction <= 1.0,
        f"data.max_failure_fraction must be in [0, 1], got {d.max_failure_fraction}",
    )
    _check(
        d.min_samples_before_failure_check >= 0,
        f"data.min_samples_before_failure_check must be >= 0, got {d.min_samples_before_failure_check}",
    )
    _check(d.decode_timeout_s > 0, f"data.decode_timeout_s must be > 0, got {d.decode_timeout_s}")
    _check(
        d.decoder in ("decord", "torchcodec", "pyav"),
        f"data.decoder must be 'decord', 'torchcodec' or 'pyav', got '{d.decoder}'",
    )
    video = d.format == "video" and d.path is not None
    for bucket in d.buckets:
        _check(
            len(bucket) == 3 and all(x > 0 for x in bucket),
            f"data.buckets entry {bucket} must be three positive ints [frames, height, width]",
        )
        if video:  # whether the model and the layout take it: _validate_sample_shapes
            _check(
                (bucket[0] - 1) % 4 == 0 and bucket[0] <= d.video_frames,
                f"data.buckets entry {bucket}: video frames must be 4k+1 and <= data.video_frames={d.video_frames}",
            )
    if video:
        _check(
            d.vae_path is not None and d.text_encoder_path is not None,
            "data.format=video encodes clips during training: set data.vae_path and data.text_encoder_path",
        )
    else:
        _check(
            d.format == "latent" or d.path is not None,
            f"data.format={d.format} has no effect without data.path "
            f"(the embedded synthetic data is latent); set data.path to the shards or remove it",
        )
        _refuse_changed(
            d,
            DataConfig(),
            VIDEO_ONLY_DATA_KEYS,
            "data",
            "without data.format=video and data.path",
            "set data.format=video and data.path, or remove it",
        )


# Read only by the video pipeline (data.format=video with data.path set).
VIDEO_ONLY_DATA_KEYS = ("video_frames", "video_fps", "decode_timeout_s", "decoder", "vae_path", "text_encoder_path")


def _refuse_changed(section, defaults, keys, prefix: str, why: str, fix: str) -> None:
    """Settings that take no effect in this configuration must keep their defaults."""
    for key in keys:
        value = getattr(section, key)
        _check(value == getattr(defaults, key), f"{prefix}.{key}={value} has no effect {why}; {fix}")


def vae_compression_of(d: DataConfig) -> tuple[int, int] | None:
    """The (temporal, spatial) downsampling of data.vae_path, read from its config.json (no weights
    are loaded); None when it cannot be read (loading the VAE reports that)."""
    try:
        with open(os.path.join(os.path.expanduser(d.vae_path or ""), "config.json")) as f:
            return vae_compression(json.load(f))
    except (OSError, ValueError, AttributeError):
        return None


def _validate_sample_shapes(cfg: Config) -> None:
    """Every sample shape known before start-up (the synthetic clip, each data.buckets entry) must fit
    the model and the layout, by the rule the loader skips samples with (data/buckets.shape_problem):
    otherwise the run, and every resume of it, fails when the first such sample arrives."""
    m, d = cfg.model, cfg.data
    video = d.path is not None and d.format == "video"
    compression = vae_compression_of(d) if video else (1, 1)
    if compression is None:  # pixel buckets need the VAE's compression; the loader checks them with it
        known = []
    elif d.buckets:  # samples are cut to their bucket: only the buckets' shapes reach the model
        known = [(f"data.buckets entry {b}", b) for b in d.buckets]
    elif d.path is None:  # the embedded synthetic data has one shape
        clip = [d.synthetic_frames, d.synthetic_size, d.synthetic_size]
        known = [("data.synthetic_frames/data.synthetic_size", clip)]
    else:  # every sample is its own bucket: the loader checks each one
        known = []
    shards, shards_name = sequence_shards(cfg.parallel)
    for name, shape in known:
        problem = shape_problem(shape, video, compression, m.patch_size, shards, m.rope_max_seq_len, shards_name)
        _check(problem is None, f"{name} {problem}; change it, or the setting named")
        if mod_layer_indices(m) and shards > 1:  # a routed block cuts its chosen tokens over the shards
            tokens = bucket_tokens(latent_shape(shape, video, compression), m.patch_size)
            k = routed_tokens(m.mod.capacity, tokens)
            near = min(max(shards, round(k / shards) * shards), tokens // shards * shards)
            _check(
                k % shards == 0,
                f"model.mod.capacity={m.mod.capacity} routes {k} of the {tokens} tokens per sample of {name}, "
                f"which do not split over {shards_name} = {shards}; choose a capacity that routes a multiple of "
                f"{shards}, e.g. model.mod.capacity={near / tokens:.6g} ({near} tokens)",
            )


def _validate_block_router(m: ModelConfig) -> None:
    """Dr.LLM block routers (megamoe/model/block_routing.py): ranges, and no setting while they are off."""
    r = m.block_router
    if not r.enabled:
        keys = [f.name for f in dataclasses.fields(BlockRouterConfig) if f.name != "enabled"]
        why, fix = "while model.block_router.enabled=false", "set model.block_router.enabled=true or remove it"
        _refuse_changed(r, BlockRouterConfig(), keys, "model.block_router", why, fix)
        return
    _check(r.windows >= 1, f"model.block_router.windows must be >= 1, got {r.windows}")
    _check(r.hidden_dim >= 1, f"model.block_router.hidden_dim must be >= 1, got {r.hidden_dim}")
    _check(
        0 < r.budget <= 2,
        f"model.block_router.budget={r.budget} must be in (0, 2] (block runs per sample / model.num_layers)",
    )
    _check(r.focal_gamma >= 0, f"model.block_router.focal_gamma must be >= 0, got {r.focal_gamma}")
    _check(0 <= r.balance_beta < 1, f"model.block_router.balance_beta must be in [0, 1), got {r.balance_beta}")


def _validate_mod(cfg: Config) -> None:
    """Mixture-of-depths blocks (megamoe/model/mixture_of_depths.py): ranges, and no setting while they are off."""
    r, m = cfg.model.mod, cfg.model
    routed = mod_layer_indices(m)
    if not routed:
        keys = [f.name for f in dataclasses.fields(MixtureOfDepthsConfig) if f.name != "layers"]
        why, fix = "without routed blocks (model.mod.layers=none)", "set model.mod.layers or remove it"
        _refuse_changed(r, MixtureOfDepthsConfig(), keys, "model.mod", why, fix)
        return
    _check(
        0 < r.capacity <= 1,
        f"model.mod.capacity must be in (0, 1] (a fraction of each sample's tokens), got {r.capacity}",
    )
    _check(
        r.update_scale in UPDATE_SCALES,
        f"model.mod.update_scale must be one of {', '.join(UPDATE_SCALES)}, got '{r.update_scale}'",
    )
    _check(
        set(r.router_features) <= set(ROUTER_FEATURES) and len(set(r.router_features)) == len(r.router_features),
        f"model.mod.router_features={list(r.router_features)} must name distinct features among "
        f"{', '.join(ROUTER_FEATURES)}",
    )
    _check(0 <= r.threshold_decay < 1, f"model.mod.threshold_decay must be in [0, 1), got {r.threshold_decay}")
    _check(r.sparsity_loss >= 0, f"model.mod.sparsity_loss must be >= 0 (0 = off), got {r.sparsity_loss}")
    _check(0 < r.sparsity_target < 1, f"model.mod.sparsity_target must be in (0, 1), got {r.sparsity_target}")
    if r.sparsity_loss == 0:
        why, fix = (
            "without the sparsity loss (model.mod.sparsity_loss=0)",
            "set model.mod.sparsity_loss > 0 or remove it",
        )
        _refuse_changed(r, MixtureOfDepthsConfig(), ["sparsity_target"], "model.mod", why, fix)
    # A block router may skip a routed block for one rank's samples while another rank runs it, and a
    # routed block's threshold update is a collective: the ranks would wait on each other for ever.
    _check(
        not m.block_router.enabled,
        "model.mod.layers and model.block_router.enabled=true cannot be combined (a skipped mixture-of-depths "
        "block would leave the other ranks in its threshold all-reduce); use one of them",
    )
    both = sorted(routed & moe_layer_indices(m)) if m.moe.num_experts > 0 else []
    _check(
        not both,
        f"blocks {both} are in both model.mod.layers and model.moe.layers; route tokens only in dense blocks "
        f"(an MoE FFN would see a different set of tokens than its router's statistics count)",
    )
    _check(
        cfg.parallel.tensor_parallel_size == 1,
        f"model.mod (mixture-of-depths) does not support parallel.tensor_parallel_size="
        f"{cfg.parallel.tensor_parallel_size}; set it to 1 (context and expert parallelism work)",
    )


def _validate_lora(cfg: Config) -> None:
    """LoRA-Mixer adapters (megamoe/model/lora_mixer.py): ranges, and no setting while they are off."""
    r = cfg.model.lora
    _check(r.num_experts >= 0, f"model.lora.num_experts must be >= 0 (0 = no adapters), got {r.num_experts}")
    if r.num_experts == 0:
        keys = [f.name for f in dataclasses.fields(LoRAConfig) if f.name != "num_experts"]
        why, fix = "without adapters (model.lora.num_experts=0)", "set model.lora.num_experts > 0 or remove it"
        _refuse_changed(r, LoRAConfig(), keys, "model.lora", why, fix)
        return
    _check(r.rank >= 1, f"model.lora.rank must be >= 1, got {r.rank}")
    # Each adapted projection is model.dim x model.dim: B A has rank at most model.dim whatever r is.
    _check(
        r.rank <= cfg.model.dim,
        f"model.lora.rank={r.rank} exceeds the width of the attention projections (model.dim={cfg.model.dim}): "
        f"an update B A of a {cfg.model.dim} x {cfg.model.dim} weight has rank at most {cfg.model.dim}, a larger r "
        f"only adds parameters; set model.lora.rank <= {cfg.model.dim}",
    )
    _check(r.alpha > 0, f"model.lora.alpha must be > 0, got {r.alpha}")
    _check(
        1 <= r.top_k <= r.num_experts,
        f"model.lora.top_k={r.top_k} must be in 1..model.lora.num_experts={r.num_experts}",
    )
    _check(
        len(r.targets) > 0 and set(r.targets) <= {"q", "k", "v", "o"} and len(set(r.targets)) == len(r.targets),
        f"model.lora.targets={list(r.targets)} must name distinct projections among q, k, v, o",
    )
    for name in ("balance_loss", "entropy_loss"):
        _check(getattr(r, name) >= 0, f"model.lora.{name} must be >= 0, got {getattr(r, name)}")
    # Column/row-parallel q, k, v, o would need the adapters' B (resp. A) split the same way and the
    # routers' gradients summed over TP; a frozen 5B base fits one GPU, so TP is not needed for it.
    _check(
        cfg.parallel.tensor_parallel_size == 1,
        f"model.lora (LoRA-Mixer adapters) does not support parallel.tensor_parallel_size="
        f"{cfg.parallel.tensor_parallel_size}; set it to 1 (use context or data parallelism)",
    )
    # Without a base the adapters would train on top of frozen random weights: nothing a user wants.
    _check(
        bool(cfg.train.init_from),
        f"model.lora.num_experts={r.num_experts}: LoRA-Mixer fine-tunes a frozen base: set train.init_from to its "
        f"weights (a diffusers-layout folder, e.g. the released transformer or a checkpoint's weights/)",
    )


def _validate_moe(m: ModelConfig) -> None:
    """The MoE layer's own keys here; the router's keys by the router class itself.

    The router registry is the one list of router names and of the keys each router reads,
    and `moe.layers` goes through the model's own parser: no rule is copied here.
    """
    e = m.moe
    _check(e.num_experts >= 0, f"model.moe.num_experts must be >= 0 (0 = dense), got {e.num_experts}")
    moe_layer_indices(m)
    if e.num_experts == 0:
        changed = [f.name for f in dataclasses.fields(MoEConfig) if f.name != "num_experts"]
        _refuse_changed(
            e,
            MoEConfig(),
            changed,
            "model.moe",
            "on a dense model (model.moe.num_experts=0)",
            "set model.moe.num_experts > 0 or remove it",
        )
        return
    for name in ("expert_ffn_dim", "shared_ffn_dim"):
        value = getattr(e, name)
        _check(value is None or value > 0, f"model.moe.{name} must be positive or null, got {value}")
    _check(e.num_shared_experts >= 0, f"model.moe.num_shared_experts must be >= 0, got {e.num_shared_experts}")
    _check(
        e.shared_ffn_dim is None or e.num_shared_experts > 0,
        f"model.moe.shared_ffn_dim={e.shared_ffn_dim} has no effect without shared experts; "
        f"set model.moe.num_shared_experts > 0 or remove it",
    )
    _check(
        e.shared_init in ("zero", "noise"), f"model.moe.shared_init must be 'zero' or 'noise', got '{e.shared_init}'"
    )
    _check(e.shared_init_std >= 0, f"model.moe.shared_init_std must be >= 0, got {e.shared_init_std}")
    _check(e.diagnostics_every >= 0, f"model.moe.diagnostics_every must be >= 0, got {e.diagnostics_every}")
    _check(e.trace_every >= 0, f"model.moe.trace_every must be >= 0 (0 = off), got {e.trace_every}")
    _check(e.trace_tokens >= 0, f"model.moe.trace_tokens must be >= 0 (0 = every token), got {e.trace_tokens}")
    _check(
        e.trace_every > 0 or e.trace_tokens == MoEConfig().trace_tokens,
        f"model.moe.trace_tokens={e.trace_tokens} has no effect while model.moe.trace_every=0; "
        f"set trace_every > 0 or remove trace_tokens",
    )
    _check(e.merged_from >= 0, f"model.moe.merged_from must be >= 0 (0 = not merged), got {e.merged_from}")
    if e.merged_from:
        _check(
            e.merged_from > e.num_experts,
            f"model.moe.merged_from={e.merged_from} must exceed model.moe.num_experts={e.num_experts} "
            f"(the router's columns folded onto fewer experts); set it to the experts before merging, or 0",
        )
        _check(
            e.num_null_experts == 0,
            f"model.moe.num_null_experts={e.num_null_experts} cannot be combined with model.moe.merged_from "
            f"(merging folds real experts only); set num_null_experts=0 or merged_from=0",
        )
    check_router_config(router_config(e))
