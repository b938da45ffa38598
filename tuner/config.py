"""Typed run configuration: pydantic models for every TOML table, merging, and readable validation errors.

Resolution order is code defaults < preset < user file < `--set table.key=value`. One TOML table is one
model, every model forbids unknown keys, and `method` picks the method table's model through the registry.
Field names follow the diffusers example flags so users recognize them.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import logging
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from tuner.errors import ConfigError

logger = logging.getLogger(__name__)


class Section(BaseModel):
    """Base of every table: unknown keys are errors, and field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Section):
    pretrained_model_name_or_path: str = "builtin:micro"
    """Base pipeline: a local diffusers folder, a hub id, or `builtin:micro` (the shipped micro model)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model."""
    variant: str | None = None
    """Weight variant to load, e.g. `fp16`."""
    vae: str | None = None
    """Optional separate VAE folder or hub id (e.g. a fine-tuned decoder)."""
    tokenizer_from: str | None = None
    """Where a single-file base (`model.safetensors`) takes its CLIP tokenizer(s) from, which such a checkpoint
    does not hold: a local diffusers folder of the same family (its `tokenizer/`, `tokenizer_2/`) or a hub id in
    the Hugging Face cache. Unset: the family's usual hub repos in the cache, else an error naming the fix."""
    quantize: Literal["none", "int8", "nf4", "fp8"] = "none"
    """Store the frozen denoiser (and T5) quantized while adapters train in fp32: `int8`/`nf4` (bitsandbytes,
    CUDA) or `fp8` (float8 weights cast up layer by layer; runs anywhere; saves memory only together with
    `train.gradient_checkpointing`, as autograd otherwise keeps every layer's up-cast weight for the backward pass).
    LoRA, DreamBooth-LoRA and pivotal tuning only; the exported LoRA is the same as from a full-precision base, but
    cannot be fused into this one."""


class SubsetConfig(Section):
    """One kohya-style folder: its own repeats, caption fallback and regularization flag."""

    path: str
    """Folder of images (with optional caption sidecars)."""
    num_repeats: int = Field(1, ge=1)
    """How many times each image appears per epoch."""
    class_tokens: str | None = None
    """Caption used for images that have no caption file."""
    caption_prefix: str = ""
    """Text put before every caption of this subset."""
    is_reg: bool = False
    """A regularization (class) set: its examples count toward the prior-preservation loss."""


class DataConfig(Section):
    path: str | None = None
    """Folder of images with caption sidecars, a folder with metadata.jsonl/.csv, or a datasets hub id."""
    recursive: bool = False
    """Look for images in sub-folders too."""
    caption_extension: str = ".txt"
    """Sidecar caption extension (`.txt` or `.caption`, say)."""
    image_column: str = "image"
    """Image column of a `datasets` source."""
    caption_column: str = "text"
    """Caption column of a `datasets` source or metadata file."""
    subsets: list[SubsetConfig] = []
    """kohya-style subsets (several folders with repeats and regularization flags)."""
    num_repeats: int = Field(1, ge=1)
    """Repeats for the main `path` folder."""
    resolution: int = Field(512, ge=8)
    """Training side length; with buckets, the max area is resolution²."""
    enable_bucket: bool = True
    """Aspect-ratio buckets instead of square crops."""
    min_bucket_reso: int = Field(256, ge=8)
    """Smallest bucket side."""
    max_bucket_reso: int = Field(1024, ge=8)
    """Largest bucket side."""
    bucket_reso_steps: int = Field(64, ge=8)
    """Bucket sides are multiples of this (64 at SD scale; must be a multiple of the VAE factor)."""
    bucket_no_upscale: bool = False
    """Never upscale an image to fill a bucket."""
    crop: Literal["center", "random"] = "center"
    """How to crop to the bucket or square: `center` (cacheable) or `random`."""
    random_flip: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of a horizontal flip (flipped latents are cached separately)."""
    background_color: str = "white"
    """Color that transparent pixels are composited onto."""
    instance_prompt: str | None = None
    """Default caption (DreamBooth: "a photo of sks dog"); used when an image has no caption."""
    caption_template: str = "{caption}"
    """Template for every caption; `{caption}` is the caption, `{token}` the identifier token."""
    token: str | None = None
    """The identifier / placeholder token that `{token}` expands to."""
    token_in_captions: str | None = Field(None, pattern=r"^\S+$")
    """A word of the captions that stands for the token (a set captioned for DreamBooth writes `sks`): each whole-word
    occurrence becomes `token`, so textual inversion's new word can learn from those captions (diffusers' advanced
    scripts call it --token_abstraction)."""
    caption_prefix: str = ""
    """Text put before every caption."""
    caption_suffix: str = ""
    """Text put after every caption."""
    caption_dropout_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of an empty caption (trains classifier-free guidance)."""
    shuffle_tags: bool = False
    """Shuffle comma-separated tags of each caption."""
    keep_tokens: int = Field(0, ge=0)
    """With `shuffle_tags`, keep the first K tags in place."""
    with_prior_preservation: bool = False
    """DreamBooth prior preservation: add a class set and a prior loss."""
    class_data_dir: str | None = None
    """Folder of class images; missing ones are generated with the base pipeline and cached there. Default:
    `<output_dir>/cache/class_images` (never uploaded by `tuner publish`)."""
    class_prompt: str | None = None
    """Prompt of the class set ("a photo of dog")."""
    num_class_images: int = Field(100, ge=1)
    """How many class images the class set should hold."""
    prior_loss_weight: float = Field(1.0, ge=0.0)
    """Weight of the prior-preservation loss."""
    prior_mode: Literal["images", "model"] = "images"
    """Prior target: class images (generated once and cached), or the frozen base model's own prediction on
    the class prompt for the instance latents (image-free, no generation needed)."""
    cache_latents: bool = True
    """Cache VAE latents on disk (ignored for random crops)."""
    cache_text_embeds: bool = True
    """Cache text-encoder outputs on disk (ignored when captions vary per step or text encoders train)."""
    latent_cache_mode: Literal["distribution", "sample", "mean"] = "distribution"
    """Cache the latent distribution (mean, std: sampling stays stochastic), one sample, or the mean alone (clean
    targets for a VAE whose posterior is wide, like a small VAE trained from scratch). Uncached batches (random
    crops) follow the same choice: "mean" trains on the mean, the others sample."""
    cache_dir: str | None = None
    """Cache folder; default `<data path>/.tuner-cache`."""
    bad_file_policy: Literal["skip", "error"] = "skip"
    """What to do with unusable files: skip them with a warning, or stop before training."""
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of images held out for evaluation (used by the decoder trainer)."""
    dataloader_num_workers: int = Field(0, ge=0)
    """DataLoader worker processes."""
    source_format: Literal["auto", "folder", "imagefolder", "datasets"] = "auto"
    """How to read `path`: `auto` (a kohya TOML, a saved `datasets` folder, a plain folder, else a hub id),
    `folder` (our scanner: sidecars + metadata.jsonl/csv), `imagefolder` (`datasets.load_dataset("imagefolder")`)
    or `datasets` (a saved dataset folder or a hub id)."""
    dataset_split: str = "train"
    """Split of a `datasets` source."""
    max_image_pixels: int = Field(89_478_485, ge=1)
    """Images whose header declares more pixels are refused as decompression bombs (Pillow's default limit)."""
    min_image_side: int | None = Field(None, ge=1)
    """Images whose shorter side is below this are refused as too small; default: a quarter of `resolution`."""
    sample_batch_size: int = Field(4, ge=1)
    """Batch size when generating missing class images."""
    class_inference_steps: int = Field(25, ge=1)
    """Sampling steps when generating missing class images."""


class OptimizerConfig(Section):
    name: Literal["adamw8bit", "adamw", "prodigy", "adafactor"] = "adamw8bit"
    """bitsandbytes AdamW8bit (CPU from bitsandbytes 0.50), torch AdamW, Prodigy, or transformers Adafactor."""
    learning_rate: float = Field(1e-4, gt=0)
    """Base learning rate (UNet / trained weights)."""
    text_encoder_lr: float | None = None
    """Learning rate of text-encoder parameters; default: `learning_rate`."""
    embedding_lr: float | None = None
    """Learning rate of new token embeddings (textual inversion, pivotal tuning); default: `learning_rate`."""
    weight_decay: float = Field(1e-2, ge=0)
    """Decoupled weight decay."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """Adam beta1."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """Adam beta2."""
    adam_epsilon: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm (none to disable)."""
    fused_backward: bool = False
    """Full fine-tuning memory lever: step each parameter's optimizer in the backward pass as soon as its gradient
    is complete, then free that gradient, so the run never holds every gradient at once (kohya's fused backward
    pass). Needs gradient_accumulation_steps = 1, max_grad_norm = none (clipping needs the global norm of all
    gradients), one process, no fp16 grad scaler, and an optimizer that steps parameters independently."""
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    """Learning-rate schedule from diffusers.optimization."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Warmup steps of the schedule."""
    lr_num_cycles: int = Field(1, ge=1)
    """Cycles of `cosine_with_restarts`."""
    lr_power: float = 1.0
    """Power of `polynomial`."""


class TrainConfig(Section):
    output_dir: str = "runs/latest"
    """Run folder: config.json, artifacts, checkpoint-<step>/, grids/ and logs/."""
    max_train_steps: int = Field(500, ge=1)
    """Optimizer steps to train."""
    train_batch_size: int = Field(1, ge=1)
    """Micro-batch size per process."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    checkpointing_steps: int = Field(500, ge=1)
    """Write `checkpoint-<step>/` every N steps."""
    checkpoints_total_limit: int | None = Field(3, ge=1)
    """Keep at most this many checkpoints."""
    keep_final_checkpoint: bool = True
    """Also write a checkpoint at the last step, so a finished run can be trained further
    (`--resume latest --set train.max_train_steps=N`); false saves its disk space."""
    ddp_timeout: int = Field(300, ge=10)
    """Seconds a process waits for the others in a collective; with several processes, a lost one (killed,
    out of memory) stops the rest after about this long with a message naming it, instead of a hang."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision; frozen parts are stored in this dtype, trained ones in fp32."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the UNet and text encoders."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention kernel: torch SDPA, or xformers (CUDA only, when installed)."""
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    """SDPA kernel on CUDA: torch's choice, or only flash / memory-efficient / cuDNN / math attention."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """Channels-last memory format for a convolutional denoiser (UNet); auto: on for UNets on CUDA, where its
    convolutions run faster, off on the CPU and for transformers (no convolutions to speed up)."""
    compile: Literal["none", "denoiser", "blocks"] = "none"
    """torch.compile: none, the whole denoiser, or only its repeated blocks (regional compilation as diffusers
    does it: compiles each block class once, in seconds instead of minutes, nearly the same speed)."""
    seed: int = 0
    """Seed for weights init, data order, noise and augmentation."""
    noise_offset: float = Field(0.0, ge=0)
    """Noise offset (brighter darks and darker brights)."""
    input_perturbation: float = Field(0.0, ge=0)
    """Input perturbation of the noise (regularizes, ~0.1)."""
    snr_gamma: float | None = None
    """min-SNR-γ loss weighting (5.0 is the paper's value); none to disable."""
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    """How training timesteps are drawn: uniformly, logit-normal (SD3's: t/T = sigmoid(N(mean, std))), which
    spends more steps at mid noise, where a picture's layout is decided, or `mode` (SD3 paper's mode sampling
    with `mode_scale`; flow-matching models only)."""
    timestep_mean: float = 0.0
    """Mean of the logit-normal's normal; > 0 shifts training toward noisier timesteps."""
    timestep_std: float = Field(1.0, gt=0)
    """Standard deviation of the logit-normal's normal; larger spreads it toward the ends."""
    mode_scale: float = 1.29
    """Scale of `mode` timestep sampling (SD3 paper; 0 is uniform)."""
    weighting_scheme: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Flow-matching loss weighting (SD3 paper): none, sigma_sqrt (1/σ²) or cosmap; UNet models use snr_gamma."""
    flow_shift: float | None = Field(None, gt=0)
    """Flow-matching sigma shift; none: the model's scheduler (SD3: static 3.0, Flux: by image size)."""
    guidance_scale: float = Field(1.0, ge=0)
    """Embedded guidance fed to guidance-distilled models (FLUX.1-dev) while training; 1.0 as kohya trains."""
    use_ema: bool = False
    """Keep an EMA copy of the trained weights and save it."""
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    """EMA decay."""
    allow_tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs."""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Where to log losses, learning rates and validation images."""
    logging_steps: int = Field(10, ge=1)
    """Log scalars every N steps."""
    resume_fallback: bool = False
    """On resume, when the chosen checkpoint is damaged, take the newest older intact one instead of stopping
    (same as `--resume latest-good`)."""


class ValidationConfig(Section):
    prompts: list[str] = []
    """Prompts for validation grids; `{token}` expands to the identifier token. Empty: the trainer picks."""
    negative_prompt: str = ""
    """Negative prompt for every sample."""
    seeds: list[int] = [0, 1]
    """One grid column per seed."""
    scales: list[float] = [0.0, 1.0]
    """Adapter scales shown side by side (0 = base model)."""
    num_inference_steps: int = Field(25, ge=1)
    """Sampling steps."""
    guidance_scale: float = Field(7.5, ge=0)
    """Classifier-free guidance scale."""
    scheduler: str | None = None
    """Sampler: an A1111 name (`Euler a`, `DPM++ 2M Karras`, `UniPC`, ...) or a diffusers scheduler class name
    (`DPMSolverMultistepScheduler`); default: the model's. SD3/FLUX.1 take flow-matching samplers only."""
    guidance_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """How the CFG scale varies over the steps: constant, or rising from 1 (linear / cosine) with
    `guidance_scale` as its mean."""
    guidance_rescale: float = Field(0.0, ge=0, le=1)
    """CFG rescale φ (for zero-terminal-SNR v-prediction models); 0 = plain CFG."""
    guidance_interval: tuple[float, float] | None = None
    """Guide only within [start, end] fractions of the steps (0 = first, noisiest); none: every step."""
    init_images: list[str] = []
    """Init images for img2img rows (one extra row per image x prompt, base vs tuned like the others)."""
    masks: list[str] = []
    """Inpainting masks, one per init image (white = repaint); empty: the init images render as img2img."""
    strength: float = Field(0.6, ge=0, le=1)
    """How much of an init image is repainted (0 = kept, 1 = all; 0.4-0.8 typical)."""
    width: int | None = None
    """Sample width (default: the training resolution)."""
    height: int | None = None
    """Sample height (default: the training resolution)."""
    validation_steps: int | None = None
    """Render a grid every N steps (none: only at the end)."""
    enabled: bool = True
    """Render grids at all."""

    @model_validator(mode="after")
    def _image_rows(self) -> ValidationConfig:
        if self.masks and len(self.masks) != len(self.init_images):
            raise ValueError(
                f"validation.masks: {len(self.masks)} masks for {len(self.init_images)} init_images; one per image"
            )
        interval = self.guidance_interval
        if interval is not None and not 0 <= interval[0] < interval[1] <= 1:
            raise ValueError(f"validation.guidance_interval {list(interval)}: need 0 <= start < end <= 1")
        return self


class HubConfig(Section):
    push: bool = False
    """Upload the run's artifacts and model card at the end of training."""
    repo_id: str | None = None
    """Target repository, `user/name`."""
    private: bool = False
    """Create the repository as private."""
    license: str = "openrail++"
    """License in the model card."""
    base_model: str | None = None
    """Hub id of the base model (`org/name`) when it was trained from a local folder or single file: the model
    card's `base_model` and usage snippets name it, and shared configs and file headers say it instead of the
    local path (without it they say "a local model"). `tuner publish --base-model ID` sets it too."""

    @model_validator(mode="after")
    def _repo_for_push(self) -> HubConfig:
        if self.push and not self.repo_id:
            raise ValueError("hub.push = true needs hub.repo_id (user/name)")
        return self


class MethodConfig(Section):
    """Base of each method's own table (`[lora]`, `[dreambooth]`, ...)."""


SHARED_TABLES: dict[str, type[Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "validation": ValidationConfig,
    "hub": HubConfig,
}


class RunConfig(Section):
    """A whole run. Build one with `RunConfig.for_method(name)` so the method table has its model."""

    method: str
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    validation: ValidationConfig = ValidationConfig()
    hub: HubConfig = HubConfig()

    @classmethod
    def for_method(cls, method: str) -> type[RunConfig]:
        from tuner.registry import get_trainer

        return _run_model(method, get_trainer(method).Config)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def public_dict(self) -> dict[str, Any]:
        """`to_dict()` as it may be shared (file headers, the hub): local folders named relative to the run or by
        their last component, a local base as `hub.base_model` or "a local model" (`tuner.public`)."""
        from tuner.public import public_config

        return public_config(self.to_dict())


@functools.cache
def _run_model(method: str, config_cls: type[MethodConfig]) -> type[RunConfig]:
    """One RunConfig subclass per (method, config class), so configs of one method compare equal."""
    return create_model(f"{config_cls.__name__}Run", __base__=RunConfig, **{method: (config_cls, config_cls())})


# --- merging and parsing -----------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; any other value (lists included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignment: str) -> dict[str, Any]:
    """`a.b=c` -> {"a": {"b": c}}; the value is a TOML literal when it parses as one, else a string."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected table.key=value, e.g. --set train.max_train_steps=100")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    nested: dict[str, Any] = {}
    cursor = nested
    *parents, leaf = key.split(".")
    for part in parents:
        cursor = cursor.setdefault(part, {})
    cursor[leaf] = value
    return nested


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text ({exc})") from exc


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (to list allowed keys for a typo)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ()) or ()
        candidates = [annotation, *args]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (directly or as `Model | None`); None for plain values and lists."""
    for candidate in (annotation, *(getattr(annotation, "__args__", ()) or ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted field path of `model`, nested tables too (`dreambooth.rank`, `textual_inversion.lora.rank`)."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(f"{prefix}{name}")
        sub = _submodel(field.annotation)
        if sub is not None:
            paths += _field_paths(sub, f"{prefix}{name}.")
    return paths


def _where_it_lives(model: type[BaseModel], dotted: str) -> list[str]:
    """Fields of `model` that a misplaced or mistyped `dotted` key probably means, best first: the same key (and as
    much of its table path as matches) in another table, else close spellings in the key's own table."""
    parts = dotted.split(".")
    paths = [p for p in _field_paths(model) if p != dotted]
    scored = []
    for path in paths:
        theirs = path.split(".")
        shared = 0
        while shared < min(len(parts), len(theirs)) and parts[-1 - shared] == theirs[-1 - shared]:
            shared += 1
        if shared:
            scored.append((-shared, len(theirs), path))
    if scored:
        return [path for *_, path in sorted(scored)][:3]
    table = dotted.rpartition(".")[0]
    names = {p.rpartition(".")[2]: p for p in paths if p.rpartition(".")[0] == table}
    return [names[n] for n in difflib.get_close_matches(parts[-1], list(names), n=3, cutoff=0.6)]


def _method_table(model: type[BaseModel]) -> str | None:
    """The name of the run model's method table (`lora`, `dreambooth`, ...), if it has one."""
    extra = [name for name in model.model_fields if name not in SHARED_TABLES and name != "method"]
    return extra[0] if len(extra) == 1 else None


def _unknown_key_lines(model: type[BaseModel], loc: tuple[Any, ...], value: Any) -> list[str]:
    """One line per unknown key: its dotted path, where it probably belongs, and the keys allowed where it is."""
    owner = _model_at(model, loc)
    allowed = ", ".join(sorted(owner.model_fields)) if owner else "?"
    dotted = ".".join(str(p) for p in loc)
    note = ""
    method = _method_table(model)
    if len(loc) == 1 and isinstance(value, dict) and method and loc[0] != method and _is_method(str(loc[0])):
        note = f" ([{loc[0]}] is the table of method = {loc[0]!r}; this run's method is {method!r})"
    if isinstance(value, dict) and value:  # an unknown table: place each of its keys
        leaves = [f"{dotted}.{key}" for key in value]
    else:
        leaves = [dotted]
    lines = []
    for leaf in leaves:
        guesses = _where_it_lives(model, leaf)
        hint = f"did you mean {' or '.join(guesses)}? " if guesses else ""
        lines.append(f"  {leaf}: unknown key{note}; {hint}allowed keys here: {allowed}")
    return lines


def _is_method(name: str) -> bool:
    try:
        from tuner.registry import available

        return name in available()
    except Exception:  # noqa: BLE001 - only a hint
        return False


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str = "config") -> str:
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            lines += _unknown_key_lines(model, loc, err.get("input"))
        else:
            value = err.get("input")
            shown = json.dumps(value, default=str) if not isinstance(value, dict) else "a table"
            lines.append(f"  {dotted} = {shown}: {err['msg']}")
    return "\n".join(lines)


def build_config(layers: list[tuple[str, dict[str, Any]]]) -> RunConfig:
    """Merge labelled layers in order (later wins) and validate the result for its method."""
    merged: dict[str, Any] = {}
    for _, layer in layers:
        merged = deep_merge(merged, layer)
    method = merged.get("method")
    sources = " < ".join(label for label, _ in layers) or "config"
    if not method:
        raise ConfigError(f"{sources}: `method` is missing; set it in the file or pick a --preset")
    if not isinstance(method, str):
        raise ConfigError(f"method = {method!r}: expected a method name")
    model = RunConfig.for_method(method)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, sources)) from None


def load_config(
    file: str | Path | None = None,
    preset: str | None = None,
    sets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    vram: float | None = None,
) -> RunConfig:
    """defaults < preset (its `vram` memory tier) < user file < `overrides` (CLI shorthands such as --model) <
    `--set` assignments. A preset's scaling rules then fill in what the user layers left open (`tuner.presets`)."""
    from tuner.presets import non_default_values, read_preset, resolve

    user: list[tuple[str, dict[str, Any]]] = []
    if file:
        user.append((str(file), read_toml(file)))
    if overrides:
        user.append(("command line", overrides))
    for assignment in sets or []:
        user.append((f"--set {assignment}", parse_set(assignment)))
    if not preset:
        if vram is not None:
            raise ConfigError(f"--vram {vram:g}: picks a memory tier of a preset; give --preset NAME too")
        if not user:
            raise ConfigError("nothing to train: give --preset NAME or --config FILE.toml")
        return build_config(user)
    chosen = read_preset(preset)
    label, layer, tier = chosen.layer(vram)
    config = resolve(chosen, [(label, layer), *user], user, tier, vram)
    shown = "\n  ".join(f"{k} = {v!r}" for k, v in non_default_values(config).items())
    logger.info("resolved config (values other than the defaults):\n  %s", shown)
    return config


def save_config(config: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def explain(config: BaseModel, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, value, docstring) for every field, tables first-level by first-level."""
    rows: list[tuple[str, Any, str]] = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            rows.extend(explain(value, key + "."))
        else:
            rows.append((key, value, (field.description or "").strip()))
    return rows
