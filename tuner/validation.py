"""Render prompts x seeds through a stock diffusers pipeline, and the validation grid every trainer shows.

Sampling during training must leave training exactly as it was: no gradients, modules back in their own
train/eval modes, the global RNG streams untouched (exact resume depends on them), adapter scale back at 1.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tuner.errors import TunerError
from tuner.guidance import GuidanceSchedule
from tuner.img2img import InitImage, image_pipeline, load_init_images, round_trip
from tuner.img2img import call_kwargs as init_call_kwargs

if TYPE_CHECKING:
    from PIL import Image

    from tuner.models import Parts
    from tuner.trainer import Trainer

FALLBACK_SCHEDULER = "EulerDiscreteScheduler"
"""Used when a model's own sampling scheduler cannot be read (its training DDPM samples badly in few steps)."""


def render(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    negative_prompt: str | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    guidance: GuidanceSchedule | None = None,
    init: InitImage | None = None,
    max_batch: int = 8,
) -> list[list[Image.Image]]:
    """images[prompt][seed]. Each image has its own CPU generator seeded with its seed, so an image does not
    depend on which other prompts share its batch, nor on the device. The family adds what its pipeline must be
    told to sample as it trained (the T5 sequence length).

    Prompts in A1111 syntax (weights, BREAK, longer than the CLIP window) go in as embeddings
    (`tuner.prompt_embeds`), one prompt per call; plain ones as text, as any diffusers user passes them.
    `guidance` schedules the CFG scale over the steps; `init` makes these img2img or inpainting images.
    """
    from tuner.families import call_kwargs
    from tuner.prompt_embeds import needs_weighting, prompt_embeds

    if not prompts or not seeds:
        raise TunerError(
            f"nothing to render: prompts={list(prompts)!r}, seeds={list(seeds)!r}; give at least one each"
        )
    negative = negative_prompt or None  # None keeps each pipeline's own default (SDXL: zero embeddings)
    if init is not None and init.strength == 0:
        kept = round_trip(pipe, init.image, width, height)
        return [[kept.copy() for _ in seeds] for _ in prompts]
    if init is not None and int(num_inference_steps * init.strength) < 1:
        raise TunerError(
            f"strength {init.strength:g} x {num_inference_steps} steps leaves no denoising step (the stock pipeline "
            "runs strength x steps of them); raise the steps or the strength"
        )
    fixed: dict[str, Any] = dict(num_inference_steps=num_inference_steps, output_type="pil", **call_kwargs(pipe))
    fixed |= (guidance or GuidanceSchedule()).call_kwargs(pipe, guidance_scale)
    target = pipe
    if init is not None:
        target = image_pipeline(pipe, init)
        fixed |= init_call_kwargs(init, width, height, target)
    else:
        fixed |= dict(width=width, height=height)
    weighted = needs_weighting(pipe, negative) or any(needs_weighting(pipe, p) for p in prompts)
    batch_size = 1 if weighted else max_batch
    rows: list[list[Image.Image]] = [[] for _ in prompts]
    for seed in seeds:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            if weighted:
                text: dict[str, Any] = prompt_embeds(pipe, batch[0], negative)
            else:
                text = dict(prompt=batch, negative_prompt=[negative] * len(batch) if negative else None)
            generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in batch]
            result = target(**text, generator=generators, **fixed)
            for offset, image in enumerate(result.images):
                rows[start + offset].append(image)
    return rows


def scheduler_from_name(name: str, current: Any) -> Any:
    """A new scheduler for a sampler name (`DPM++ 2M Karras`) or diffusers class name, configured like `current`."""
    from tuner.samplers import scheduler_for

    return scheduler_for(name, current)


def model_scheduler_name(parts: Parts) -> str:
    """Class name of the base model's own sampling scheduler (PNDM, Euler, DDIM...), not the training DDPM."""
    own = getattr(parts, "sample_scheduler", None)
    if own is not None:
        return type(own).__name__
    try:
        config = type(parts.noise_scheduler).load_config(parts.source, subfolder="scheduler", revision=parts.revision)
        return config.get("_class_name") or FALLBACK_SCHEDULER
    except Exception:  # noqa: BLE001 - an unreadable config only costs the default scheduler
        return FALLBACK_SCHEDULER


def validation_pipeline(parts: Parts, scheduler: str | None = None) -> Any:
    """The family's stock pipeline over the current parts, with a fresh sampling scheduler.

    Fresh, because `set_timesteps` mutates a scheduler and the training noise scheduler must not change.
    """
    pipe = parts.pipeline()
    own = getattr(parts, "sample_scheduler", None) or parts.noise_scheduler
    pipe.scheduler = scheduler_from_name(scheduler or model_scheduler_name(parts), own)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def sampling_mode(modules: Sequence[torch.nn.Module], dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """no_grad + eval mode + untouched global RNG for the duration; every submodule's mode is restored."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    states = _rng_states()
    autocast = (
        torch.autocast(_device_type(modules), dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    try:
        for module in modules:
            module.eval()
        with torch.no_grad(), autocast:
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        _set_rng_states(states)


def sampling_kwargs(config: Any) -> dict[str, Any]:
    """`render` keyword arguments from `[validation]`; the size defaults to the training resolution."""
    val, size = config.validation, config.data.resolution
    return dict(
        negative_prompt=val.negative_prompt,
        num_inference_steps=val.num_inference_steps,
        guidance_scale=val.guidance_scale,
        width=val.width or size,
        height=val.height or size,
        guidance=GuidanceSchedule(val.guidance_schedule, val.guidance_rescale, val.guidance_interval),
    )


@dataclass(frozen=True, eq=False)
class Row:
    """One grid row: a prompt (as typed, weights and all), rendered from noise or from an init image."""

    prompt: str
    init: InitImage | None = None

    def label(self) -> str:
        return self.prompt if self.init is None else f"{self.init.label()} {self.prompt}"


def image_rows(prompts: Sequence[str], inits: Sequence[InitImage]) -> list[Row]:
    """Text-to-image rows, then one row per init image x prompt."""
    return [Row(p) for p in prompts] + [Row(p, init) for init in inits for p in prompts]


def render_rows(pipe: Any, rows: Sequence[Row], seeds: Sequence[int], **kwargs: Any) -> list[list[Image.Image]]:
    """images[row][seed] for rows of any kind; consecutive rows that share an init image render together."""
    out: list[list[Image.Image]] = []
    start = 0
    while start < len(rows):
        end = start
        while end < len(rows) and rows[end].init is rows[start].init:
            end += 1
        out += render(pipe, [r.prompt for r in rows[start:end]], seeds, init=rows[start].init, **kwargs)
        start = end
    return out


def validation_rows(trainer: Trainer) -> list[Row]:
    """`validation.prompts` (or the method's), then the img2img / inpainting rows of `validation.init_images`."""
    val = trainer.config.validation
    inits = load_init_images(val.init_images, val.masks, [val.strength]) if val.init_images else []
    return image_rows(validation_prompt_list(trainer), inits)


def render_validation_grid(trainer: Trainer, parts: Parts, step: int) -> Image.Image | None:
    """rows x (scales or base/tuned) x seeds as one labeled grid, or None when validation is off.

    Rows are the prompts, then img2img / inpainting rows. Methods that cannot scale their change
    (`set_adapter_scale` returns False) get a "base" column set, rendered on the first call (the loop makes
    it at step 0, before training) and kept on the trainer, next to "tuned" columns rendered on every call.
    """
    from tuner.grid import make_grid
    from tuner.runtime import encoders_on

    config = trainer.config
    val = config.validation
    if not val.enabled:
        return None
    rows = validation_rows(trainer)
    seeds = list(val.seeds)
    if not rows:
        raise TunerError(
            "validation.prompts is empty and the method has no default prompts; set validation.prompts "
            "or validation.enabled = false"
        )
    if not seeds:
        raise TunerError("validation.seeds is empty; give at least one seed or set validation.enabled = false")
    kwargs = sampling_kwargs(config)
    modules = [parts.denoiser, parts.vae, *parts.text_encoders]
    scales = list(val.scales) or [1.0]
    column_sets: list[tuple[str, list[list[Image.Image]]]] = []

    with encoders_on(parts), sampling_mode(modules, parts.weight_dtype):
        pipe = validation_pipeline(parts, val.scheduler)
        try:
            scalable = trainer.set_adapter_scale(parts, scales[0])
            if scalable:
                for scale in scales:
                    trainer.set_adapter_scale(parts, scale)
                    column_sets.append((scale_label(scale), render_rows(pipe, rows, seeds, **kwargs)))
            else:
                if getattr(trainer, "_base_images", None) is None:
                    trainer._base_images = render_rows(pipe, rows, seeds, **kwargs)
                    trainer._base_step = step
                base_step = getattr(trainer, "_base_step", 0)
                tuned = trainer._base_images if base_step == step else render_rows(pipe, rows, seeds, **kwargs)
                column_sets.append(("base" if base_step == 0 else f"step {base_step}", trainer._base_images))
                column_sets.append(("tuned", tuned))
        finally:
            trainer.set_adapter_scale(parts, 1.0)

    images = [[img for _, block in column_sets for img in block[row]] for row in range(len(rows))]
    col_labels = [f"{name}\nseed {seed}" for name, _ in column_sets for seed in seeds]
    settings = settings_label(pipe, val.num_inference_steps, val.guidance_scale, kwargs["guidance"])
    title = f"{trainer.name} · step {step} · {settings}"
    return make_grid(images, [r.label() for r in rows], col_labels, title=title, groups=len(column_sets))


def settings_label(pipe: Any, steps: int, guidance_scale: float, guidance: GuidanceSchedule | None = None) -> str:
    """What every cell of a grid shares: sampler, steps, guidance (and its schedule)."""
    from tuner.samplers import label

    extra = guidance.label() if guidance is not None else ""
    return f"{label(pipe.scheduler)}, {steps} steps, guidance {guidance_scale:g}" + (f" ({extra})" if extra else "")


def validation_prompt_list(trainer: Trainer) -> list[str]:
    """`validation.prompts` with `{token}` expanded, or the method's own default prompts."""
    config = trainer.config
    token = config.data.token
    prompts = list(config.validation.prompts)
    if not prompts:
        return list(trainer.validation_prompts())
    if token is None and any("{token}" in p for p in prompts):
        raise TunerError("validation.prompts use {token} but data.token is not set; set data.token")
    return [p.replace("{token}", token or "") for p in prompts]


def scale_label(scale: float) -> str:
    return "base" if scale == 0 else f"scale {scale:g}"


def _device_type(modules: Sequence[torch.nn.Module]) -> str:
    for module in modules:
        for param in module.parameters():
            return param.device.type
    return "cpu"


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.random.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np

        states["numpy"] = np.random.get_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.random.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(states["numpy"])
