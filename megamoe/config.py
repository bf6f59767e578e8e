"""Typed run configuration: dataclasses, YAML files, dotted command-line overrides.

A run is described by one `Config`. `load_config("configs/tiny.yaml", ["model.num_layers=4"])`
merges the YAML file and the overrides onto the dataclass defaults with OmegaConf, which
rejects unknown keys and values of the wrong type, raising `ConfigError` with a one-line
message naming the key and the fix (a bool key takes only true or false: OmegaConf alone would
read 2, 1, yes or on as true). What types cannot express is checked by
`megamoe.config_checks.validate`, before any process group exists.

This module imports nothing of megamoe but the leaf `megamoe.error_messages`, so every other module may
import it.
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass

import yaml
from omegaconf import Node, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megamoe.error_messages import first_line


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
    """Experts per token for token-choice routers (the average for expert choice / Expert Race, the most for dynmole)."""
    expert_ffn_dim: int | None = None
    """Hidden width of one routed expert; null = model.ffn_dim (cloned experts); smaller = fine-grained."""
    num_shared_experts: int = 0
    """Always-on shared experts, added to the routed output."""
    shared_ffn_dim: int | None = None
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
    """Hidden width of the MLP and cross-attention routers (and of Expert Race's race_gate=mlp)."""
    bias_balancing: bool = False
    """Aux-loss-free balancing (DeepSeek): a per-expert selection bias nudged toward balance each step."""
    bias_update_rate: float = 1e-3
    """Step size of the aux-loss-free bias update (> 0; only with bias_balancing)."""
    bias_update_schedule: str = "constant"
    """Aux-free step size over applied steps t: 'constant', 'inverse_time' (rate / t) or 'frozen' (0 after bias_freeze_step)."""
    bias_freeze_step: int = 0
    """bias_update_schedule=frozen: the last applied step that updates the bias (>= 1)."""
    bias_update_centered: bool = False
    """Subtract the real experts' mean bias after each aux-free update (torchtitan), so the biases stay centred on 0."""
    bias_update_form: str = "sign"
    """Aux-free update: 'sign' (DeepSeek-V3: rate * sign(mean - load)) or 'proportional' (rate * (mean - load) / mean)."""
    expert_choice_scope: str = "sample"
    """Expert choice picks each expert's tokens per 'sample' or over the whole micro-'batch'."""
    capacity_factor: float = 1.0
    """Expert choice and DiffMoE: tokens per expert = capacity_factor * tokens * top_k / num_experts."""
    race_threshold_decay: float = 0.99
    """Expert Race: EMA decay of the learned score threshold used at inference."""
    race_score_func: str = "identity"
    """Expert Race: activation of the gate logits that race and weight: 'identity' (raw logits), 'softmax' or 'sigmoid'."""
    race_gate: str = "linear"
    """Expert Race: score head, 'linear' or 'mlp' (hidden width router_hidden_dim)."""
    race_scope: str = "micro_batch"
    """Expert Race: race over this rank's 'micro_batch' or the 'global' batch of every data-parallel rank (training)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn and selective_sinkhorn routers: normalisation rounds before the top-k pick; 0 = plain top-k."""
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
    trace_every: int = 0
    """Write routing traces (moe/routing_trace.py) every this many steps; 0 disables them."""
    trace_tokens: int = 1024
    """Routing traces: tokens sampled per MoE layer and traced step (deterministically); 0 = every token."""
    merged_from: int = 0
    """MC-SMoE (launcher/merge_experts.py): routed experts the router scores, folded onto num_experts; 0 = not merged."""
    # DiffMoE (router=diffmoe, megamoe/moe/routers/diffmoe.py)
    capacity_loss: float = 0.01
    """Weight of DiffMoE's capacity-predictor BCE loss (reaches only the predictor); 0 = no predictor, batch rule at inference."""
    diffmoe_threshold_decay: float = 0.95
    """DiffMoE: EMA decay of the per-expert predictor-score threshold that routes at inference."""
    # Timestep-band experts (router=timestep_band, megamoe/moe/routers/timestep_band.py)
    timestep_band_boundaries: list[float] = field(default_factory=lambda: [875.0])
    """Timesteps (0..1000) that split the noise levels into len+1 bands; a token with t >= b is above boundary b."""
    timestep_band_router: str = "none"
    """Picks top_k among its band's experts: 'none' (one expert per band, weight 1) or linear, mlp, cross_attention."""
    # Selective Sinkhorn Routing (router=selective_sinkhorn, megamoe/moe/routers/selective_sinkhorn.py)
    ssr_probability: float = 0.5
    """Selective Sinkhorn: fraction of training steps routed by the differentiable Sinkhorn plan (0..1); the rest by top-k."""
    ssr_noise_std: float = 0.0
    """Selective Sinkhorn: std of the Gaussian noise on the logits that picks top-k on the non-Sinkhorn training steps; 0 = none."""
    ssr_seed: int = 2
    """Selective Sinkhorn: seed of the per-step coin, drawn from (ssr_seed, step) so every rank and layer agrees."""
    # DynMoLE hybrid routing (router=dynmole, megamoe/moe/routers/dynmole.py)
    dynmole_q: float = 1.1
    """DynMoLE: index q (> 0) of the Tsallis entropy S_q of a token's router distribution; 1 = Shannon."""
    dynmole_entropy_threshold: float = 0.9
    """DynMoLE: tokens with S_q above this (>= 0) route softly (capped at top_k), the rest top-p; >= S_q(uniform): top-p only."""
    dynmole_top_p: float = 0.75
    """DynMoLE: top-p tokens take the fewest experts whose probability mass reaches this (0 < p <= 1)."""
    dynmole_min_experts: int = 1
    """DynMoLE: least experts a top-p token takes (1 <= k_min <= top_k)."""
    tsallis_loss: float = 0.0
    """Weight of DynMoLE's Tsallis entropy loss (mean S_q of the router distributions; dynmole)."""


@dataclass
class MixtureOfDepthsConfig:
    """Mixture-of-depths token routing (MoD, gamma-MoD): in the chosen blocks only the best-scored
    tokens of each sample run the block, the rest skip it (megamoe/model/mixture_of_depths.py)."""

    layers: str = "none"
    """Blocks that route their tokens: 'none' (every block runs every token), 'all', 'every_other' or a list like '2,5'."""
    capacity: float = 0.5
    """Fraction of each sample's tokens that run a routed block in training (0 < capacity <= 1)."""
    update_scale: str = "straight_through"
    """How the router score scales a routed token's block update: 'straight_through' (x1 forward, score's gradient) or 'score'."""
    router_features: list[str] = field(default_factory=list)
    """Extra router inputs besides the token (FTP-style): any of 'noise_level' (t / 1000) and 'position' (f, h, w in [0, 1])."""
    threshold_decay: float = 0.99
    """EMA decay of the learned score threshold that routes at inference (eval mode)."""
    sparsity_loss: float = 0.0
    """Weight of the sparsity-target loss (mean router score - sparsity_target)^2 per routed block; 0 = off."""
    sparsity_target: float = 0.5
    """Mean router score the sparsity-target loss pulls toward (0 < target < 1); only with sparsity_loss > 0."""


@dataclass
class LoRAConfig:
    """LoRA-Mixer: routed low-rank experts on the attention projections, for fine-tuning a frozen base
    (megamoe/model/lora_mixer.py); `num_experts: 0` adds none."""

    num_experts: int = 0
    """LoRA experts per adapted projection; 0 = no adapters (the model as it is, every weight trains)."""
    rank: int = 8
    """Rank r of each expert's update B A (A: r x in, B: out x r)."""
    alpha: float = 16.0
    """LoRA scale numerator: the routed update is multiplied by alpha / rank."""
    top_k: int = 2
    """Experts each token uses per projection (hard top-k; their renormalised router weights mix them)."""
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    """Attention projections that get routed experts, in self- and cross-attention: any of q, k, v, o."""
    balance_loss: float = 0.01
    """Weight of the load-balance part of LoRA-Mixer's routing loss (E x sum_e load_e x mean prob_e, per projection)."""
    entropy_loss: float = 0.0
    """Weight of the specialization part: mean entropy of each token's router distribution (lower = sharper routing)."""


@dataclass
class BlockRouterConfig:
    """Dr.LLM block routers: per sample, each block is skipped, executed or repeated (megamoe/model/block_routing.py)."""

    enabled: bool = False
    """Route each sample's path through the blocks by one small router per block; false = every block runs once."""
    windows: int = 4
    """Windows of consecutive tokens a router mean-pools the sample's hidden states over (its logits are averaged over them)."""
    hidden_dim: int = 64
    """Hidden width of each block's router MLP."""
    budget: float = 0.75
    """Path search: most block runs per sample as a fraction of model.num_layers (a repeat counts twice)."""
    focal_gamma: float = 2.0
    """Router training: focusing exponent of the focal loss (0 = class-balanced cross-entropy)."""
    balance_beta: float = 0.999
    """Router training: class weights (1 - beta) / (1 - beta^count) by effective number (Cui et al. 2019); 0 = unweighted."""


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
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Patch size over (frames, height, width) of the latent video."""
    eps: float = 1e-6
    """Epsilon of the layer and RMS norms."""
    cross_attn_norm: bool = True
    """Apply an affine LayerNorm before cross-attention (Wan: true)."""
    rope_max_seq_len: int = 1024
    """Largest patch-grid extent the rotary tables cover, per axis."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts FFNs (dense when moe.num_experts is 0)."""
    mod: MixtureOfDepthsConfig = field(default_factory=MixtureOfDepthsConfig)
    """Mixture-of-depths token routing in chosen blocks (off with mod.layers='none': every block runs every token)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA-Mixer routed adapters on attention; with lora.num_experts > 0 only they train (0: none, as before)."""
    block_router: BlockRouterConfig = field(default_factory=BlockRouterConfig)
    """Dr.LLM block skip / execute / repeat routers (off by default: every block runs once)."""


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

    path: str | None = None
    """Directory or brace pattern of latent WebDataset shards; null = embedded synthetic data."""
    val_path: str | None = None
    """Held-out shards (data.format's kind) for the validation loss; null = the embedded data's held-out split."""
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
    buckets: list[list[int]] = field(default_factory=list)
    """[[frames, height, width], ...] in PIXELS for format=video, LATENT units for latent; [] = one bucket per exact sample shape."""
    tokens_per_batch: int = 0
    """0 = micro_batch_size samples for every bucket; >0 = batch size per bucket max(1, tokens_per_batch // tokens of one sample)."""
    max_failure_fraction: float = 0.05
    """Stop with an error naming the worst shards when more than this fraction of a rank's samples fail."""
    min_samples_before_failure_check: int = 100
    """Samples a rank reads before max_failure_fraction is enforced."""
    decode_timeout_s: float = 30.0
    """format=video: seconds one clip may take to decode before it is skipped as 'decode_timeout'."""
    decoder: str = "decord"
    """format=video: 'decord', 'torchcodec' or 'pyav' (the fallback of both); decord: ties torchcodec at 480p (benchmarks/RESULTS.md) and loads on CPU-only torch."""
    vae_path: str | None = None
    """format=video: the frozen video VAE that encodes decoded clips in the training process."""
    text_encoder_path: str | None = None
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
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage for optimizer state: 0, 1 or 2 (1 or 2 under train.precision=bf16)."""


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
    init_from: str | None = None
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
    val_every: int | None = None
    """Held-out validation loss (train/validation.py) every this many steps, at most train.steps; 0 = off; null = 100 where held-out data exists and train.steps reaches it, else off (its other keys are then still accepted)."""
    val_batches: int = 2
    """Held-out batches (data.micro_batch_size samples each) the validation loss averages over, the same each time."""
    sample_every: int | None = None
    """Tensorboard sample grid (train/validation.py) every this many steps, at most train.steps; 0 = off; null = 200 where captions can be embedded and train.steps reaches it, else off (its other keys are then still accepted)."""
    sample_captions: list[str] = field(
        default_factory=lambda: ["a red circle moving right", "a blue square moving up", "a green bar moving left"]
    )
    """Prompts of the tensorboard samples, one grid row each (defaults: the embedded data's vocabulary)."""


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


def _bool_keys(cls: type, prefix: str = "") -> frozenset[str]:
    """Dotted keys of the bool fields of the dataclass `cls` and of the dataclasses it nests."""
    keys = set()
    for name, hint in typing.get_type_hints(cls).items():
        if hint is bool:
            keys.add(prefix + name)
        elif is_dataclass(hint):
            keys |= _bool_keys(hint, f"{prefix}{name}.")
    return frozenset(keys)


BOOL_KEYS = _bool_keys(Config)


def _refuse_non_bools(tree: dict, prefix: str = "") -> None:
    """A bool field takes only true or false. OmegaConf would turn any integer (2, 1), 'yes', 'on'
    or 'y' into a bool; 1 and 0 are refused too, since a number given to a switch is more likely
    a mix-up of keys than a choice."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _refuse_non_bools(value, dotted + ".")
        elif dotted in BOOL_KEYS and not isinstance(value, bool):
            raise ConfigError(f"bad value for '{dotted}': {value!r} is not a boolean; write true or false")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans only (true/false, True/False, TRUE/FALSE):
    YAML 1.1's yes/no/on/off stay strings, so a string key keeps 'on' and a bool key refuses it
    instead of reading it as true."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _accepted_form(exc: OmegaConfBaseException) -> str | None:
    """For a value of the wrong shape (a list where a string goes, one value where a list goes, an empty
    value), the rest of a one-line message: the key's accepted form, written from the value given, in
    YAML and as an override. None for other errors (OmegaConf's own line is clear enough there)."""
    cls, name, key = getattr(exc, "object_type", None), getattr(exc, "key", None), getattr(exc, "full_key", None)
    if not (is_dataclass(cls) and isinstance(name, str) and key):
        return None
    hint, value = typing.get_type_hints(cls).get(name), getattr(exc, "value", None)
    if isinstance(value, Node):  # a scalar given where a list goes comes wrapped
        value = value._value()
    is_list = OmegaConf.is_list(value) or isinstance(value, (list, tuple))
    if value is None:
        spec = {f.name: f for f in fields(cls)}[name]
        default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
        if is_dataclass(default):  # a whole section: OmegaConf's line names it
            return None
        shown = "[" + ",".join(map(str, default)) + "]" if isinstance(default, list) else default
        return f"the value is empty; give one, e.g. its default {key}={shown}"
    if typing.get_origin(hint) is list and not is_list:
        items = [item.strip() for item in str(value).split(",") if item.strip()]
        return f"{key} is a list: write {name}: [{', '.join(items)}] in YAML, {key}=[{','.join(items)}] as an override"
    if hint is str and is_list:
        joined = ",".join(str(item) for item in value)
        return f"{key} is a string like '{joined}', not a list: write {name}: '{joined}' in YAML, {key}={joined} as an override"
    return None


def merge_config(base: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Dataclass defaults <- `base` (a dict, e.g. parsed YAML) <- dotted `overrides`."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if base:
        _refuse_non_bools(base)
        layers.append(OmegaConf.create(base))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. model.num_layers=4)")
        key = item.split("=", 1)[0]
        if OmegaConf.select(schema, key, default="__missing__") == "__missing__":
            raise ConfigError(f"unknown config key '{key}' in override '{item}'; see README 'Config reference'")
        try:
            layer = OmegaConf.from_dotlist([item])  # values parse with OmegaConf's safe YAML loader
            # ... which reads yes/on as booleans; check bool keys as a YAML file's value would read
            strict = yaml.load(item.split("=", 1)[1], Loader=_YamlLoader)
        except yaml.YAMLError as exc:
            reason = first_line(exc) or type(exc).__name__
            raise ConfigError(
                f"override '{item}' has a value that is not plain YAML ({reason}); write a number, string, bool or list"
            ) from None
        for part in reversed(key.split(".")):
            strict = {part: strict}
        _refuse_non_bools(strict)
        layers.append(layer)
    try:
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        if "not in" in str(exc) or "Key '" in str(exc):
            raise ConfigError(
                f"unknown config key '{key}'; remove it or fix its spelling (see README 'Config reference')"
            ) from None
        form = _accepted_form(exc)
        if form:
            raise ConfigError(f"bad value for '{key}': {form}") from None
        reason = first_line(exc) or type(exc).__name__
        raise ConfigError(f"bad value for '{key}': {reason}; fix the type of this value") from None
    return OmegaConf.to_object(merged)


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (safe loader) and apply dotted overrides; raise ConfigError on any problem."""
    base = None
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist; pass an existing file to --config (see configs/)")
        try:
            with open(path) as f:
                base = yaml.load(f, Loader=_YamlLoader) or {}
        except yaml.YAMLError as exc:
            reason = first_line(exc) or type(exc).__name__
            raise ConfigError(f"config file '{path}' is not valid YAML: {reason}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, train:, ...)")
    return merge_config(base, overrides)


def sequence_shards(p: ParallelConfig) -> tuple[int, str]:
    """(how many pieces each sample's token sequence is cut into, the keys that decide it): CP,
    times TP under sequence parallelism (megamoe/parallel/context.py's SequenceSharding)."""
    tp, cp = p.tensor_parallel_size, p.context_parallel_size
    if p.sequence_parallel and tp > 1:
        return cp * tp, "parallel.context_parallel_size x parallel.tensor_parallel_size (sequence parallel)"
    return cp, "parallel.context_parallel_size"


DEFAULT_VAL_EVERY = 100
"""Steps between validation losses when logging.val_every is null (and there is held-out data)."""
DEFAULT_SAMPLE_EVERY = 200
"""Steps between sample grids when logging.sample_every is null (and captions can be embedded): on 2 CPU
cores a grid of the tiny model costs about 7 training steps (30 Euler steps with guidance)."""


def has_held_out_data(d: DataConfig) -> bool:
    """The validation loss has data: data.val_path, or the embedded data's held-out split."""
    return d.val_path is not None or d.path is None


def can_embed_captions(d: DataConfig) -> bool:
    """Sample prompts can be embedded: the embedded data's word embeddings, or raw video's text encoder."""
    return d.path is None or d.format == "video"


def val_interval(cfg: Config) -> int:
    """The validation loss's interval as the loop runs it: logging.val_every, or, for null,
    DEFAULT_VAL_EVERY where there is held-out data; 0 (off) where that is past train.steps."""
    every = cfg.logging.val_every
    every = every if every is not None else (DEFAULT_VAL_EVERY if has_held_out_data(cfg.data) else 0)
    return every if every <= cfg.train.steps else 0


def sample_interval(cfg: Config) -> int:
    """The sample grid's interval as the loop runs it: logging.sample_every, or, for null,
    DEFAULT_SAMPLE_EVERY where captions can be embedded; 0 (off) where that is past train.steps."""
    every = cfg.logging.sample_every
    every = every if every is not None else (DEFAULT_SAMPLE_EVERY if can_embed_captions(cfg.data) else 0)
    return every if every <= cfg.train.steps else 0


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> Config:
    return merge_config(yaml.load(text, Loader=_YamlLoader) or {})
