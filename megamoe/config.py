"""Typed run configuration: dataclasses, YAML files, dotted command-line overrides.

A run is described by one `Config`. `load_config("configs/tiny.yaml", ["model.num_layers=4"])`
merges the YAML file and the overrides onto the dataclass defaults with OmegaConf, which
rejects unknown keys and values of the wrong type; `validate` then checks what types cannot
(heads dividing the hidden size, parallel sizes dividing the world size, a setting that would
take no effect, ...), with the same parsers and router checks the model uses. Both raise
`ConfigError` with a one-line message naming the key and the fix, before any process group
exists, so a bad config never costs a cluster allocation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers; `num_experts: 0` keeps the model dense."""

    num_experts: int = 0
    """Routed experts per MoE layer; 0 = dense model (no MoE layers)."""
    layers: str = "all"
    """Which blocks get an MoE FFN: 'all', 'every_other' (1, 3, 5, ...) or a comma list like '0,4,8'."""
    top_k: int = 2
    """Experts per token for token-choice routers (the average for expert choice / Expert Race)."""
    expert_ffn_dim: Optional[int] = None
    """Hidden width of one routed expert; null = model.ffn_dim (cloned experts); smaller = fine-grained."""
    num_shared_experts: int = 0
    """Always-on shared experts, added to the routed output."""
    shared_ffn_dim: Optional[int] = None
    """Hidden width of one shared expert; null = expert_ffn_dim; only with num_shared_experts > 0."""
    num_null_experts: int = 0
    """Zero-compute null experts (AdaMoE) a token-choice router may pick to use fewer real experts."""
    router: str = "linear"
    """Router by name, from the registry in megamoe.moe.routers (README 'Mixture of Experts'). A key below
    that the chosen router does not read must keep its default: validation refuses it, naming the key."""
    score_func: str = "softmax"
    """Scores of the token-choice and sinkhorn routers: 'softmax' or 'sigmoid'."""
    renormalize: bool = True
    """Rescale the selected experts' scores of a token to sum to one (token-choice, sinkhorn, promoe)."""
    router_hidden_dim: int = 256
    """Hidden width of the MLP and cross-attention routers."""
    bias_balancing: bool = False
    """Aux-loss-free balancing (DeepSeek): a per-expert selection bias nudged toward balance each step."""
    bias_update_rate: float = 1e-3
    """Step size of the aux-loss-free bias update (> 0; only with bias_balancing)."""
    expert_choice_scope: str = "sample"
    """Expert choice picks each expert's tokens per 'sample' or over the whole micro-'batch'."""
    capacity_factor: float = 1.0
    """Expert choice: tokens per expert = capacity_factor * tokens * top_k / num_experts."""
    race_threshold_decay: float = 0.99
    """Expert Race: EMA decay of the learned score threshold used at inference."""
    sinkhorn_iterations: int = 3
    """Sinkhorn router: normalisation rounds before the top-k pick; 0 = plain top-k."""
    num_prototypes_per_expert: int = 1
    """ProMoE: learnable prototypes per conditional expert."""
    balance_loss: float = 0.0
    """Weight of the switch load-balancing loss (token-choice routers)."""
    balance_scope: str = "micro_batch"
    """Balance over the 'micro_batch', per 'sequence' (sample), or over the 'global' batch (every data-parallel
    rank and the step's micro-batches so far; see TokenChoiceRouter._global_counts); only with balance_loss > 0."""
    z_loss: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of the logits; token-choice routers)."""
    similarity_loss: float = 0.0
    """Weight of Race-DiT's router similarity loss (decorrelates experts' routing patterns; expert_race)."""
    layer_reg_loss: float = 0.0
    """Weight of Race-DiT's per-layer regularization (a router-side head predicting the target; any router)."""
    contrastive_loss: float = 0.0
    """Weight of ProMoE's routing contrastive loss (promoe)."""
    shared_init: str = "noise"
    """Upcycling: shared experts start at 'zero' (verification: MoE == dense) or tiny 'noise'."""
    shared_init_std: float = 1e-4
    """Upcycling: standard deviation of the tiny noise on shared experts."""
    diagnostics_every: int = 50
    """Compute routing diagnostics every this many steps; 0 disables them."""


@dataclass
class ModelConfig:
    """The Wan2.x video DiT; field names follow diffusers' `WanTransformer3DModel`."""

    dim: int = 3072
    """Hidden size of the transformer (num_heads * head_dim)."""
    num_layers: int = 30
    """Number of transformer blocks."""
    num_heads: int = 24
    """Attention heads per block; must divide `dim`."""
    ffn_dim: int = 14336
    """Inner width of the GELU-tanh feed-forward network."""
    in_channels: int = 48
    """Channels of the input latent video."""
    out_channels: int = 48
    """Channels of the predicted velocity."""
    text_dim: int = 4096
    """Width of the text-encoder embeddings (umT5-XXL: 4096)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    patch_size: List[int] = field(default_factory=lambda: [1, 2, 2])
    """Patch size over (frames, height, width) of the latent video."""
    eps: float = 1e-6
    """Epsilon of the layer and RMS norms."""
    cross_attn_norm: bool = True
    """Apply an affine LayerNorm before cross-attention (Wan: true)."""
    rope_max_seq_len: int = 1024
    """Largest patch-grid extent the rotary tables cover, per axis."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts FFNs (dense when moe.num_experts is 0)."""


@dataclass
class ParallelConfig:
    """How ranks are laid out; data parallelism takes whatever the other sizes leave."""

    tensor_parallel_size: int = 1
    """Ranks that split each layer's weights (Megatron TP); must divide model.num_heads."""
    context_parallel_size: int = 1
    """Ranks that split each sequence (Ulysses CP); TP x CP must divide model.num_heads."""
    expert_parallel_size: int = 1
    """Ranks that split the experts (EP); folds over the TP x CP x data-parallel ranks."""
    sequence_parallel: bool = True
    """With TP > 1, also split the tokens between layers over the TP ranks (Megatron SP); MoE models need it."""


@dataclass
class DataConfig:
    """Where batches come from."""

    path: Optional[str] = None
    """Directory or brace pattern of latent WebDataset shards; null = embedded synthetic data."""
    cache_dir: str = "~/.cache/megamoe"
    """Where the embedded synthetic dataset is generated (once, deterministically)."""
    micro_batch_size: int = 4
    """Samples per rank per forward pass."""
    seed: int = 1234
    """Seed of the shard and sample shuffle; same seed, same stream."""
    synthetic_num_clips: int = 512
    """Clips in the embedded synthetic dataset."""
    synthetic_frames: int = 5
    """Latent frames per synthetic clip."""
    synthetic_size: int = 16
    """Latent height and width of a synthetic clip."""
    text_len: int = 16
    """Text tokens per caption embedding."""
    format: str = "latent"
    """Shard kind: 'latent' (precomputed latents + text embeddings) or 'video' (mp4 + caption); 'latent' when path is null."""
    num_workers: int = 0
    """Loader worker processes per rank; 0 = read in the training process."""
    video_frames: int = 17
    """format=video: frames decoded per clip, 4k+1 as the causal video VAE needs."""
    video_fps: float = 16.0
    """format=video: frame rate the clip is resampled to before taking video_frames frames."""
    buckets: List[List[int]] = field(default_factory=list)
    """[[frames, height, width], ...] in PIXELS for format=video, LATENT units for latent; [] = one bucket per exact sample shape."""
    tokens_per_batch: int = 0
    """0 = micro_batch_size samples for every bucket; >0 = batch size per bucket max(1, tokens_per_batch // tokens of one sample)."""
    max_failure_fraction: float = 0.05
    """Stop with an error naming the worst shards when more than this fraction of a rank's samples fail."""
    min_samples_before_failure_check: int = 100
    """Samples a rank reads before max_failure_fraction is enforced."""
    decode_timeout_s: float = 30.0
    """format=video: seconds one clip may take to decode before it is skipped as 'decode_timeout'."""
    vae_path: Optional[str] = None
    """format=video: the frozen video VAE that encodes decoded clips in the training process."""
    text_encoder_path: Optional[str] = None
    """format=video: the frozen text encoder that embeds captions in the training process."""
    restart_stream_on_resume: bool = False
    """On resume, restart the data stream at epoch 0 instead of its saved position (samples may repeat)."""


@dataclass
class DiffusionConfig:
    """Rectified-flow training objective."""

    timestep_sampling: str = "logit_normal"
    """How the noise level s in [0, 1] is drawn: 'uniform' or 'logit_normal'."""
    logit_mean: float = 0.0
    """Mean of the logit-normal distribution (timestep_sampling=logit_normal only)."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal distribution (> 0; timestep_sampling=logit_normal only)."""
    shift: float = 1.0
    """Timestep shift s' = shift*s / (1 + (shift-1)*s); >1 favours noisier steps (Wan: 5)."""
    text_dropout: float = 0.1
    """Probability that a sample's text is replaced by the null embedding (for CFG)."""


@dataclass
class OptimConfig:
    """AdamW through DeepSpeed, with warmup and cosine decay."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to the peak."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage for optimizer state: 0, 1 or 2."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 300
    """Optimizer steps to run."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (bf16 mixed precision with fp32 master weights)."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'."""
    seed: int = 0
    """Seed of weights init, noise and timesteps."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights; 0 disables it."""
    output_dir: str = "outputs/run"
    """Run directory: checkpoints, tensorboard events, resolved config."""
    exit_interval: int = 0
    """Checkpoint and exit when the step is a multiple of this (Megatron's --exit-interval), e.g. to fit a
    job's time limit; the LR schedule still spans train.steps. 0 = never."""
    max_nonfinite_steps: int = 5
    """Stop with an error after this many consecutive steps skipped for a non-finite loss or gradient norm."""
    init_from: Optional[str] = None
    """Diffusers-layout safetensors file or directory to initialise the weights from."""
    activation_checkpointing: str = "none"
    """Recompute blocks in backward instead of keeping their activations: 'none', 'all', or 'every_<n>' (blocks 0, n, 2n, ...)."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    every_steps: int = 100
    """Save every this many steps (and always at the end); 0 = only at the end."""
    keep_last: int = 3
    """Number of most recent checkpoints kept; older ones are deleted."""


@dataclass
class LoggingConfig:
    """Progress output and tensorboard."""

    every_steps: int = 10
    """Print a progress line and write scalars every this many steps."""
    tensorboard: bool = True
    """Write tensorboard event files under output_dir/tensorboard."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def merge_config(base: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Dataclass defaults <- `base` (a dict, e.g. parsed YAML) <- dotted `overrides`."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if base:
        layers.append(OmegaConf.create(base))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. model.num_layers=4)")
        key = item.split("=", 1)[0]
        if OmegaConf.select(schema, key, default="__missing__") == "__missing__":
            raise ConfigError(f"unknown config key '{key}' in override '{item}'; see README 'Config reference'")
        try:
            layers.append(OmegaConf.from_dotlist([item]))  # values parse with OmegaConf's safe YAML loader
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}' has a value that is not plain YAML ({_first_line(exc)}); "
                              f"write a number, string, bool or list") from None
    try:
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        if "not in" in str(exc) or "Key '" in str(exc):
            raise ConfigError(f"unknown config key '{key}'; remove it or fix its spelling (see README 'Config reference')") from None
        raise ConfigError(f"bad value for '{key}': {_first_line(exc)}; fix the type of this value") from None
    return OmegaConf.to_object(merged)


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (safe loader) and apply dotted overrides; raise ConfigError on any problem."""
    base = None
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist; pass an existing file to --config (see configs/)")
        try:
            with open(path) as f:
                base = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {_first_line(exc)}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, train:, ...)")
    return merge_config(base, overrides)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Checks that types cannot express; raises ConfigError naming the key and the fix."""
    m, p, o, t, d = cfg.model, cfg.parallel, cfg.optim, cfg.train, cfg.data
    for name in ("dim", "num_layers", "num_heads", "ffn_dim", "in_channels", "out_channels", "text_dim", "freq_dim"):
        _check(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _check(m.dim % m.num_heads == 0,
           f"model.num_heads={m.num_heads} does not divide model.dim={m.dim}; choose heads that divide the hidden size")
    head_dim = m.dim // m.num_heads
    _check(head_dim % 2 == 0 and head_dim >= 6,
           f"head dim model.dim/model.num_heads={head_dim} must be even and >= 6 for 3D RoPE; change model.num_heads")
    _check(len(m.patch_size) == 3 and all(x > 0 for x in m.patch_size),
           f"model.patch_size must be three positive ints (frames, height, width), got {m.patch_size}")
    _validate_moe(m)
    names = ("tensor_parallel_size", "context_parallel_size", "expert_parallel_size")
    for name in names:
        _check(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    model_parallel = p.tensor_parallel_size * p.context_parallel_size
    _check(world_size % model_parallel == 0,
           f"world size {world_size} is not divisible by parallel.tensor_parallel_size x "
           f"parallel.context_parallel_size = {model_parallel}; launch a multiple of {model_parallel} ranks or change them")
    _check(world_size % p.expert_parallel_size == 0,
           f"world size {world_size} is not divisible by parallel.expert_parallel_size={p.expert_parallel_size}; "
           f"launch a multiple of {p.expert_parallel_size} ranks or change it")
    if p.expert_parallel_size > 1:
        _check(m.moe.num_experts > 0, f"parallel.expert_parallel_size={p.expert_parallel_size} needs an MoE model; "
               f"set model.moe.num_experts or parallel.expert_parallel_size=1")
        _check(m.moe.num_experts % p.expert_parallel_size == 0,
               f"model.moe.num_experts={m.moe.num_experts} is not divisible by parallel.expert_parallel_size="
               f"{p.expert_parallel_size}; choose sizes that divide")
        # DeepSpeed without ZeRO clips by the mean over ranks of each rank's own norm, which under
        # EP covers different experts on different ranks: not the global norm.
        _check(o.zero_stage > 0 or o.grad_clip == 0,
               "optim.zero_stage=0 with parallel.expert_parallel_size > 1 clips by a wrong gradient norm; "
               "set optim.zero_stage to 1 or 2, or optim.grad_clip=0")
    _check(d.micro_batch_size >= 1, f"data.micro_batch_size must be >= 1, got {d.micro_batch_size}")
    _check(d.text_len >= 1, f"data.text_len must be >= 1, got {d.text_len}")
    if d.path is None:
        _check(d.synthetic_num_clips >= world_size * d.micro_batch_size,
               f"data.synthetic_num_clips={d.synthetic_num_clips} is fewer than one global batch; raise it")
    _validate_data(d)
    _validate_model_parallel(cfg)
    _validate_sample_shapes(cfg)
    _check(cfg.diffusion.timestep_sampling in ("uniform", "logit_normal"),
           f"diffusion.timestep_sampling must be 'uniform' or 'logit_normal', got '{cfg.diffusion.timestep_sampling}'")
    _check(cfg.diffusion.shift > 0, f"diffusion.shift must be > 0, got {cfg.diffusion.shift}")
    _check(cfg.diffusion.logit_std > 0, f"diffusion.logit_std must be > 0, got {cfg.diffusion.logit_std}")
    if cfg.diffusion.timestep_sampling != "logit_normal":
        _refuse_changed(cfg.diffusion, DiffusionConfig(), ("logit_mean", "logit_std"), "diffusion",
                        f"with diffusion.timestep_sampling={cfg.diffusion.timestep_sampling}",
                        "set diffusion.timestep_sampling=logit_normal or remove it")
    _check(0.0 <= cfg.diffusion.text_dropout < 1.0,
           f"diffusion.text_dropout must be in [0, 1), got {cfg.diffusion.text_dropout}")
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    _check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
    _check(o.zero_stage in (0, 1, 2),
           f"optim.zero_stage={o.zero_stage} is not supported; use 0, 1 or 2 (ZeRO-3 does not shard experts correctly)")
    _check(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _check(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _check(t.precision in ("fp32", "bf16"), f"train.precision must be 'fp32' or 'bf16', got '{t.precision}'")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device must be 'auto', 'cpu' or 'cuda', got '{t.device}'")
    _check(t.exit_interval >= 0, f"train.exit_interval must be >= 0 (0 = never), got {t.exit_interval}")
    _check(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    from megamoe.model.activation_checkpointing import checkpointed_blocks  # lazy: that module imports this one

    checkpointed_blocks(t.activation_checkpointing, m.num_layers)  # the model's parser: ConfigError naming the key
    _check(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1) (0 disables), got {t.ema_decay}")
    _check(cfg.checkpoint.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {cfg.checkpoint.every_steps}")
    _check(cfg.checkpoint.keep_last >= 1,
           f"checkpoint.keep_last must be >= 1 (the newest checkpoint is always kept), got {cfg.checkpoint.keep_last}")
    _check(cfg.logging.every_steps >= 1, f"logging.every_steps must be >= 1, got {cfg.logging.every_steps}")


def _validate_model_parallel(cfg: Config) -> None:
    """Tensor and context parallelism split heads, FFN columns and tokens: the sizes must divide them."""
    m, p = cfg.model, cfg.parallel
    tp, cp = p.tensor_parallel_size, p.context_parallel_size
    if tp == 1 and cp == 1:
        return
    # TP gives each rank num_heads / TP heads; Ulysses then trades sequence for heads over CP.
    _check(m.num_heads % (tp * cp) == 0,
           f"model.num_heads={m.num_heads} is not divisible by parallel.tensor_parallel_size x "
           f"parallel.context_parallel_size = {tp * cp}; choose parallel sizes that divide the heads")
    _check(m.ffn_dim % tp == 0, f"model.ffn_dim={m.ffn_dim} is not divisible by parallel.tensor_parallel_size={tp}; "
           f"choose a tensor-parallel size that divides it")
    if tp > 1:
        # Without SP every TP rank routes the same tokens, so each token would reach its
        # experts TP times (Megatron refuses MoE + TP without SP for the same reason).
        _check(m.moe.num_experts == 0 or p.sequence_parallel,
               f"parallel.tensor_parallel_size={tp} with an MoE model needs parallel.sequence_parallel=true")


def _validate_data(d: DataConfig) -> None:
    _check(d.format in ("latent", "video"), f"data.format must be 'latent' or 'video', got '{d.format}'")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0 (0 = read in the training process), got {d.num_workers}")
    _check(d.video_frames >= 1 and (d.video_frames - 1) % 4 == 0,
           f"data.video_frames must be 4k+1 (1, 5, ..., 17, ..., 81) for the causal video VAE, got {d.video_frames}")
    _check(d.video_fps > 0, f"data.video_fps must be > 0, got {d.video_fps}")
    _check(d.tokens_per_batch >= 0, f"data.tokens_per_batch must be >= 0 (0 = data.micro_batch_size), got {d.tokens_per_batch}")
    _check(0.0 <= d.max_failure_fraction <= 1.0,
           f"data.max_failure_fraction must be in [0, 1], got {d.max_failure_fraction}")
    _check(d.min_samples_before_failure_check >= 0,
           f"data.min_samples_before_failure_check must be >= 0, got {d.min_samples_before_failure_check}")
    _check(d.decode_timeout_s > 0, f"data.decode_timeout_s must be > 0, got {d.decode_timeout_s}")
    video = d.format == "video" and d.path is not None
    for bucket in d.buckets:
        _check(len(bucket) == 3 and all(x > 0 for x in bucket),
               f"data.buckets entry {bucket} must be three positive ints [frames, height, width]")
        if video:  # whether the model and the layout take it: _validate_sample_shapes
            _check((bucket[0] - 1) % 4 == 0 and bucket[0] <= d.video_frames,
                   f"data.buckets entry {bucket}: video frames must be 4k+1 and <= data.video_frames={d.video_frames}")
    if video:
        _check(d.vae_path is not None and d.text_encoder_path is not None,
               "data.format=video encodes clips during training: set data.vae_path and data.text_encoder_path")
    else:
        _check(d.format == "latent" or d.path is not None, f"data.format={d.format} has no effect without data.path "
               f"(the embedded synthetic data is latent); set data.path to the shards or remove it")
        _refuse_changed(d, DataConfig(), VIDEO_ONLY_DATA_KEYS, "data", "without data.format=video and data.path",
                        "set data.format=video and data.path, or remove it")


# Read only by the video pipeline (data.format=video with data.path set).
VIDEO_ONLY_DATA_KEYS = ("video_frames", "video_fps", "decode_timeout_s", "vae_path", "text_encoder_path")


def _refuse_changed(section, defaults, keys, prefix: str, why: str, fix: str) -> None:
    """Settings that take no effect in this configuration must keep their defaults."""
    for key in keys:
        value = getattr(section, key)
        _check(value == getattr(defaults, key), f"{prefix}.{key}={value} has no effect {why}; {fix}")


def sequence_shards(p: ParallelConfig) -> tuple[int, str]:
    """(how many pieces each sample's token sequence is cut into, the keys that decide it): CP,
    times TP under sequence parallelism (megamoe/parallel/context.py's SequenceSharding)."""
    tp, cp = p.tensor_parallel_size, p.context_parallel_size
    if p.sequence_parallel and tp > 1:
        return cp * tp, "parallel.context_parallel_size x parallel.tensor_parallel_size (sequence parallel)"
    return cp, "parallel.context_parallel_size"


def vae_compression_of(d: DataConfig) -> tuple[int, int] | None:
    """The (temporal, spatial) downsampling of data.vae_path, read from its config.json (no weights
    are loaded); None when it cannot be read (loading the VAE reports that)."""
    from megamoe.data.buckets import vae_compression

    try:
        with open(os.path.join(os.path.expanduser(d.vae_path or ""), "config.json")) as f:
            return vae_compression(json.load(f))
    except (OSError, ValueError, AttributeError):
        return None


def _validate_sample_shapes(cfg: Config) -> None:
    """Every sample shape known before start-up (the synthetic clip, each data.buckets entry) must fit
    the model and the layout, by the rule the loader skips samples with (data/buckets.shape_problem):
    otherwise the run, and every resume of it, fails when the first such sample arrives."""
    from megamoe.data.buckets import shape_problem

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


def _validate_moe(m: ModelConfig) -> None:
    """The MoE layer's own keys here; the router's keys by the router class itself.

    The router registry is the one list of router names and of the keys each router reads,
    and `moe.layers` goes through the model's own parser: no rule is copied here.
    """
    # Lazy: the routers and the MoE layer import this module.
    from megamoe.moe.layer import moe_layer_indices
    from megamoe.moe.routers import check_router_config

    e = m.moe
    _check(e.num_experts >= 0, f"model.moe.num_experts must be >= 0 (0 = dense), got {e.num_experts}")
    moe_layer_indices(m)
    if e.num_experts == 0:
        changed = [f.name for f in dataclasses.fields(MoEConfig) if f.name != "num_experts"]
        _refuse_changed(e, MoEConfig(), changed, "model.moe", "on a dense model (model.moe.num_experts=0)",
                        "set model.moe.num_experts > 0 or remove it")
        return
    for name in ("expert_ffn_dim", "shared_ffn_dim"):
        value = getattr(e, name)
        _check(value is None or value > 0, f"model.moe.{name} must be positive or null, got {value}")
    _check(e.num_shared_experts >= 0, f"model.moe.num_shared_experts must be >= 0, got {e.num_shared_experts}")
    _check(e.shared_ffn_dim is None or e.num_shared_experts > 0,
           f"model.moe.shared_ffn_dim={e.shared_ffn_dim} has no effect without shared experts; "
           f"set model.moe.num_shared_experts > 0 or remove it")
    _check(e.shared_init in ("zero", "noise"), f"model.moe.shared_init must be 'zero' or 'noise', got '{e.shared_init}'")
    _check(e.shared_init_std >= 0, f"model.moe.shared_init_std must be >= 0, got {e.shared_init_std}")
    _check(e.diagnostics_every >= 0, f"model.moe.diagnostics_every must be >= 0, got {e.diagnostics_every}")
    check_router_config(e)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> Config:
    return merge_config(yaml.safe_load(text) or {})
