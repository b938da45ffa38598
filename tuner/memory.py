"""Estimate a training run's peak accelerator memory from the model's configs, before any weight loads.

The estimate adds what a step holds at its peak: the frozen base in its storage dtype (quantized parts in their
bytes per weight), the trained parameters, their gradients and optimizer state, and the activations autograd saves
for the backward pass. Parameters are counted on the models built from their configs on the `meta` device (shapes,
no memory); activations by running that meta model once and adding up every tensor autograd saves, per
checkpointed block, so gradient checkpointing keeps only the blocks' inputs plus the largest block's own.
`tuner presets show NAME --vram N` prints it for the preset's model; `bench/memory.py` checks it against measured
peaks and prints it for FLUX.1-dev, SD3.5-large and SDXL (their configs ship in `tuner/model_configs/`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner import quantize as quantization
from tuner.errors import TunerError
from tuner.families import FAMILIES, Family

CONFIGS_DIR = Path(__file__).parent / "model_configs"
REFERENCE_MODELS = {"flux": "flux1-dev", "sd3": "sd35-large", "sdxl": "sdxl-base"}
"""The published model whose configs stand for a family when a preset names no local model."""
CHECKPOINTED_BLOCKS = frozenset(
    {"FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock", "BasicTransformerBlock",
     "ResnetBlock2D"}
)  # fmt: skip
"""Classes diffusers' gradient checkpointing recomputes one at a time (`_gradient_checkpointing_func(block, ...)`)."""
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "prodigy": 16.0, "adafactor": 4.0}
"""Optimizer state per trained parameter: AdamW's two fp32 moments, 8-bit AdamW's two bytes, Prodigy's four fp32
tensors; Adafactor factors its second moment, bounded here by one fp32 tensor."""
WEIGHT_BYTES = {"no": 4, "bf16": 2, "fp16": 2}
GIB = 2**30


@dataclass(frozen=True)
class ModelConfigs:
    """A pipeline's configs: its `family`, and the `config.json` of its denoiser, VAE and text encoders by
    component name."""

    family: str
    components: dict[str, dict[str, Any]]
    name: str = ""

    @classmethod
    def named(cls, name: str) -> ModelConfigs:
        """A shipped reference model (`flux1-dev`, `sd35-large`, `sdxl-base`)."""
        path = CONFIGS_DIR / f"{name}.json"
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
            raise TunerError(f"no shipped configs named {name!r}; shipped: {shipped}")
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["family"], data["components"], data.get("name", name))

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfigs:
        """The configs of a local diffusers folder (only its JSON files are read)."""
        from tuner.models import detect_family

        family, _ = detect_family(str(folder))
        names = [family.denoiser_component, "vae", *(spec.component for spec in family.encoders)]
        components = {n: json.loads((Path(folder) / n / "config.json").read_text(encoding="utf-8")) for n in names}
        return cls(family.name, components, Path(folder).name)


@dataclass(frozen=True)
class Setup:
    """What a run decides that changes its memory (read from a run config by `from_config`)."""

    capability: str = "lora"
    resolution: int = 1024
    batch_size: int = 1
    mixed_precision: str = "bf16"
    quantize: str = "none"
    gradient_checkpointing: bool = False
    encoders_freed: bool = True
    """Text embeddings cached and the encoders moved off the accelerator before the first step."""
    optimizer: str = "adamw8bit"
    rank: int = 16
    targets: str | tuple[str, ...] = "attn"
    train_text_encoder: bool = False
    text_lengths: tuple[int, ...] | None = None
    """Token window of each encoder; none: the family's (CLIP 77, T5 its pipeline's)."""

    @classmethod
    def from_config(cls, config: Any) -> Setup:
        from tuner.registry import get_trainer

        method = getattr(config, config.method)
        te = bool(getattr(method, "train_text_encoder", False))
        targets = getattr(method, "unet_target_modules", "attn")
        return cls(
            capability=get_trainer(config.method)(config).capability(),
            resolution=config.data.resolution,
            batch_size=config.train.train_batch_size,
            mixed_precision=config.train.mixed_precision,
            quantize=config.model.quantize,
            gradient_checkpointing=config.train.gradient_checkpointing,
            encoders_freed=config.data.cache_text_embeds and not te,
            optimizer=config.optimizer.name,
            rank=getattr(method, "rank", 16),
            targets=targets if isinstance(targets, str) else tuple(targets),
            train_text_encoder=te,
        )


@dataclass(frozen=True)
class Estimate:
    """Bytes of each kind a step holds at its peak."""

    frozen: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    trained_parameters: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.gradients + self.optimizer + self.activations

    def lines(self) -> list[str]:
        parts = [("frozen weights", self.frozen), ("trained weights", self.trainable),
                 ("gradients", self.gradients), ("optimizer state", self.optimizer),
                 ("activations", self.activations)]  # fmt: skip
        shown = [f"  {name:<16} {value / GIB:7.2f} GB" for name, value in parts]
        return [*shown, f"  {'total':<16} {self.total / GIB:7.2f} GB", *(f"  ({note})" for note in self.notes)]


# --- building the models from configs ---------------------------------------------------------------------------


def build_parts(configs: ModelConfigs, dtype: torch.dtype, device: str = "meta", seed: int = 0):
    """`tuner.models.Parts` of models built from `configs`: on `meta` (no memory) or randomly initialized."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from tuner.models import Parts

    family = FAMILIES[configs.family]
    torch.manual_seed(seed)
    empty = init_empty_weights(include_buffers=True) if device == "meta" else contextlib.nullcontext()
    with empty:
        denoiser = getattr(diffusers, family.denoiser_class).from_config(configs.components[family.denoiser_component])
        vae = diffusers.AutoencoderKL.from_config(configs.components["vae"])
        encoders = []
        for spec in family.encoders:
            config = dict(configs.components[spec.component])
            config_obj = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
            encoders.append(getattr(transformers, spec.model_class)(config_obj))
    for module in (denoiser, vae, *encoders):
        module.requires_grad_(False)
        module.to(dtype=dtype)
    objective = family.objective.name
    return Parts(family, configs.name, objective, denoiser, vae, encoders, [], None, weight_dtype=dtype,
                 device=torch.device(device))  # fmt: skip


def inject_lora(parts, setup: Setup) -> list[nn.Parameter]:
    """peft LoRA on the denoiser's targets (and the adaptable encoders' attention with `train_text_encoder`);
    returns the trained parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = parts.family.lora_targets(setup.targets if isinstance(setup.targets, str) else list(setup.targets),
                                        parts.denoiser)  # fmt: skip
    inject_adapter_in_model(LoraConfig(r=setup.rank, lora_alpha=setup.rank, target_modules=targets), parts.denoiser)
    modules = [parts.denoiser]
    if setup.train_text_encoder:
        for encoder in parts.text_encoder_modules(adaptable_only=True).values():
            config = LoraConfig(r=setup.rank, lora_alpha=setup.rank, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                        "out_proj"])  # fmt: skip
            inject_adapter_in_model(config, encoder)
            modules.append(encoder)
    trained = [p for m in modules for n, p in m.named_parameters() if "lora_" in n]
    for p in trained:
        p.data = p.data.float()
        p.requires_grad_(True)
    return trained


def token_ids(family: Family, setup: Setup, device: str) -> list[torch.Tensor]:
    lengths = setup.text_lengths or tuple(
        getattr(family, "t5_length", 77) if spec.label == "T5" else (spec.max_length or 77) for spec in family.encoders
    )
    return [torch.zeros(setup.batch_size, n, dtype=torch.long, device=device) for n in lengths]


def step_inputs(parts, setup: Setup) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(noisy latents, timesteps, conditioning) of one batch at the setup's resolution."""
    family, device = parts.family, parts.device
    size = setup.resolution // parts.vae_scale_factor
    channels = parts.vae.config.latent_channels
    latents = torch.zeros(setup.batch_size, channels, size, size, device=device)
    with torch.set_grad_enabled(setup.train_text_encoder):
        embeds, pooled = family.encode(parts, token_ids(family, setup, device.type))
    cond = family.conditioning(parts, embeds, pooled, {"latents": latents})
    timesteps = torch.full((setup.batch_size,), 500.0, device=device)
    return latents, timesteps, cond


# --- the estimate ------------------------------------------------------------------------------------------------


def estimate(configs: ModelConfigs, setup: Setup) -> Estimate:
    """Peak bytes of one training step of `setup` on the model `configs` describe (no weights loaded)."""
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[setup.mixed_precision]
    parts = build_parts(configs, dtype)
    full = setup.capability == "dreambooth"
    if full:
        trained = list(parts.denoiser.parameters())
        for p in trained:
            p.requires_grad_(True)
    else:
        trained = inject_lora(parts, setup)
    frozen = _frozen_bytes(parts, setup, {id(p) for p in trained})
    trained_count = sum(p.numel() for p in trained)
    activations = activation_bytes(parts, setup)
    optimizer = OPTIMIZER_BYTES.get(setup.optimizer, 8.0)
    notes = [f"{trained_count / 1e6:.1f}M trained parameters"]
    if setup.quantize == "fp8" and not setup.gradient_checkpointing:
        notes.append("fp8 without gradient checkpointing: every layer's up-cast weight waits for the backward pass")
    if setup.encoders_freed and not setup.train_text_encoder:
        notes.append("text encoders freed: embeddings cached")
    return Estimate(frozen, 4 * trained_count, 4 * trained_count, int(optimizer * trained_count), activations,
                    trained_count, notes)  # fmt: skip


def _frozen_bytes(parts, setup: Setup, trained: set[int]) -> int:
    """Resident frozen weights: the denoiser and T5 as `setup.quantize` stores them, the VAE (fp32 where its config
    asks to be upcast), the text encoders unless freed."""
    weight = WEIGHT_BYTES[setup.mixed_precision]
    vae_bytes = 4 if getattr(parts.vae.config, "force_upcast", False) else weight
    total = sum(p.numel() for p in parts.vae.parameters()) * vae_bytes
    quantized = [parts.denoiser]
    resident = [] if setup.encoders_freed and not setup.train_text_encoder else list(parts.text_encoders)
    for spec, encoder in zip(parts.family.encoders, parts.text_encoders):
        if not spec.adaptable and any(encoder is e for e in resident):
            quantized.append(encoder)
            resident.remove(encoder)
    for module in resident:
        total += sum(p.numel() for p in module.parameters() if id(p) not in trained) * weight
    for module in quantized:
        total += _stored_bytes(module, setup.quantize, weight, trained)
    return int(total)


def fp8_layers(module: nn.Module) -> set[int]:
    """ids of the layers `tuner.quantize.store_fp8` keeps in float8: linear and embedding layers outside diffusers'
    skip patterns (norms, position embeddings) and the model's own kept modules (LoRA layers are added later)."""
    import re

    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    own = (getattr(module, attr, None) or () for attr in ("_skip_layerwise_casting_patterns", "_keep_in_fp32_modules"))
    skip = (*DEFAULT_SKIP_MODULES_PATTERN, *(pattern for patterns in own for pattern in patterns))
    return {
        id(sub)
        for name, sub in module.named_modules()
        if type(sub) in (nn.Linear, nn.Embedding) and "lora_" not in name and not any(re.search(p, name) for p in skip)
    }


def _stored_bytes(module: nn.Module, quantize: str, weight: int, trained: set[int]) -> float:
    """Bytes of `module`'s frozen parameters stored as `quantize` keeps them (see `tuner.quantize`)."""
    per_weight = quantization.BYTES_PER_WEIGHT[quantize]
    in_fp8 = fp8_layers(module) if quantize == "fp8" else set()
    total = 0.0
    for name, sub in module.named_modules():
        count = sum(p.numel() for p in sub.parameters(recurse=False) if id(p) not in trained)
        if id(sub) in in_fp8:
            total += count * per_weight
        elif quantize in quantization.BITSANDBYTES and type(sub) is nn.Linear and "lora_" not in name:
            total += sub.weight.numel() * per_weight + (count - sub.weight.numel()) * weight
        else:
            total += count * weight
    return total


@contextlib.contextmanager
def fused_attention():
    """SDPA on the meta device as a fused kernel runs it (flash attention: it saves q, k, v, the output and the
    row log-sum-exps), not as the math fallback meta would pick, which saves the whole attention matrix."""
    import torch.nn.functional as F

    math = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or attn_mask is not None or kwargs.get("enable_gqa"):
            return math(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = math


def activation_bytes(parts, setup: Setup) -> int:
    """Bytes autograd saves in one forward pass of the denoiser on the meta device, with checkpointing as set."""
    params = {id(p) for m in (parts.denoiser, parts.vae, *parts.text_encoders) for p in m.parameters()}
    fp8_ids = fp8_layers(parts.denoiser) if setup.quantize == "fp8" else set()
    seen: dict[int, torch.Tensor] = {}
    per_block: list[int] = []
    block_inputs = [0]
    outside = [0]
    depth = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(t) in params or id(base) in params or id(base) in seen:
            return t
        seen[id(base)] = base  # held, so an id is never reused within the pass
        size = base.numel() * base.element_size()
        if depth[0]:
            per_block[-1] += size
        else:
            outside[0] += size
        return t

    # An fp8 layer runs on an up-cast copy of its weight, which autograd keeps for the backward pass (a linear
    # layer's input gradient needs it): one copy per layer in compute precision, held like an activation.
    compute = torch.finfo(parts.weight_dtype).bits // 8
    upcast = {id(m): m.weight.numel() * compute for m in parts.denoiser.modules() if id(m) in fp8_ids}

    def enter(module, args, kwargs):
        if depth[0] == 0:
            per_block.append(sum(upcast.get(id(m), 0) for m in module.modules()))
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            block_inputs[0] += sum(a.numel() * a.element_size() for a in tensors if id(a) not in params)
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1

    blocks = [m for m in parts.denoiser.modules() if type(m).__name__ in CHECKPOINTED_BLOCKS]
    handles = [b.register_forward_pre_hook(enter, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(leave) for b in blocks]
    try:
        latents, timesteps, cond = step_inputs(parts, setup)
        with fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            parts.family.predict(parts, parts.denoiser, latents, timesteps, cond)
    finally:
        for handle in handles:
            handle.remove()
    # Backward through a block holds its gradients, about the size of what it saved, on top of what is still
    # saved; checkpointing first recomputes the block's saved tensors from its input.
    outside[0] += sum(upcast.values()) - sum(upcast.get(id(m), 0) for b in blocks for m in b.modules())
    largest = max(per_block, default=0)
    if setup.gradient_checkpointing and per_block:
        return outside[0] + block_inputs[0] + 2 * largest
    return outside[0] + sum(per_block) + largest


def preset_estimate(name: str, vram: float | None) -> list[str]:
    """`tuner presets show NAME --vram N`: the estimate for the tier `vram` picks, on the preset's model when it
    names a local folder, else on its family's published reference model (configs shipped, nothing downloaded)."""
    from tuner.config import load_config
    from tuner.presets import read_preset

    config = load_config(preset=name, vram=vram)
    model = config.model.pretrained_model_name_or_path
    if Path(model).is_dir():
        configs = ModelConfigs.from_folder(model)
    else:
        family = next((f for f in read_preset(name).meta.family if f in REFERENCE_MODELS), None)
        if family is None:
            return [f"# no memory estimate: preset {name!r} names no local model and no family with shipped configs"]
        configs = ModelConfigs.named(REFERENCE_MODELS[family])
    setup = Setup.from_config(config)
    result = estimate(configs, setup)
    how = [setup.mixed_precision, f"{setup.quantize} base" if setup.quantize != "none" else "unquantized base",
           "gradient checkpointing" if setup.gradient_checkpointing else "no checkpointing",
           f"batch {setup.batch_size}", f"{setup.resolution} px", setup.optimizer]  # fmt: skip
    lines = [f"\n# estimated peak training memory on {configs.name} ({', '.join(how)}):", *result.lines()]
    if vram is not None:
        verdict = "fits" if fits(result, vram) else "does NOT fit"
        lines.append(f"  {verdict} a {vram:g} GB card (1 GB kept for the CUDA context and allocator)")
    return lines


def fits(estimate: Estimate, vram_gb: float, reserve_gb: float = 1.0) -> bool:
    """Whether the estimate fits a card of `vram_gb`, keeping `reserve_gb` for the CUDA context and allocator."""
    return estimate.total <= (vram_gb - reserve_gb) * GIB
