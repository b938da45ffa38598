"""Samplers by the names users know from A1111 and ComfyUI, mapped to diffusers schedulers and their options.

A name is either one of `SAMPLERS` (`"DPM++ 2M Karras"`) or a diffusers scheduler class name
(`"DPMSolverMultistepScheduler"`). The mapping follows the table in diffusers' scheduler docs. A
rectified-flow model (SD3, FLUX.1) samples only with flow-matching schedulers, so there the names map to
those (`FLOW_SAMPLERS`) and any other is refused by name.
"""

from __future__ import annotations

from typing import Any

from tuner.errors import TunerError

SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
"""A1111 sampler name -> (diffusers scheduler class, options) for denoising-diffusion models (SD1/SD2/SDXL)."""

FLOW_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "Euler Karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "LCM": ("FlowMatchLCMScheduler", {}),
}
"""The same names for rectified-flow models: the flow-matching schedulers their stock pipelines drive."""


def is_flow(scheduler: Any) -> bool:
    """A rectified-flow model's scheduler (its pipeline passes flow sigmas, which other schedulers misread)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def resolve(name: str, current: Any) -> tuple[type, dict[str, Any]]:
    """(scheduler class, options) for a sampler or class name, checked against the model's kind of scheduler."""
    import diffusers
    from diffusers import SchedulerMixin

    flow = is_flow(current)
    table = FLOW_SAMPLERS if flow else SAMPLERS
    key = _normalized(name)
    for label, (cls_name, options) in table.items():
        if _normalized(label) == key:
            return getattr(diffusers, cls_name), dict(options)
    cls = getattr(diffusers, name.strip(), None)
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin) and cls is not SchedulerMixin:
        if flow != cls.__name__.startswith("FlowMatch"):
            kind = (
                "a rectified-flow model needs a FlowMatch* scheduler"
                if flow
                else "FlowMatch* schedulers are for SD3/FLUX.1"
            )
            raise TunerError(f"sampler {name!r}: {kind}; allowed here: {', '.join(known_names(current))}")
        return cls, {}
    other = SAMPLERS if flow else FLOW_SAMPLERS
    if any(_normalized(label) == key for label in other):
        raise TunerError(
            f"sampler {name!r}: not available for a {'rectified-flow' if flow else 'denoising-diffusion'} model; "
            f"allowed here: {', '.join(known_names(current))}"
        )
    raise TunerError(f"sampler {name!r}: unknown; allowed here: {', '.join(known_names(current))}")


def scheduler_for(name: str, current: Any) -> Any:
    """A new scheduler for sampler `name`, configured like `current` (the model's own) plus the name's options."""
    cls, options = resolve(name, current)
    return cls.from_config(current.config, **options)


def known_names(current: Any) -> list[str]:
    """The sampler names, then the diffusers class names, that fit the model's kind of scheduler."""
    if is_flow(current):
        classes = sorted({c for c, _ in FLOW_SAMPLERS.values()})
        return [*FLOW_SAMPLERS, *classes]
    classes = sorted({c.__name__ for c in getattr(current, "compatibles", [])} | {c for c, _ in SAMPLERS.values()})
    return [*SAMPLERS, *classes]


def label(scheduler: Any) -> str:
    """What a grid calls a scheduler: the most specific sampler name its class and options fit, else its class."""
    cls = type(scheduler).__name__
    table = FLOW_SAMPLERS if is_flow(scheduler) else SAMPLERS
    fits = [
        (len(options), name)
        for name, (cls_name, options) in table.items()
        if cls_name == cls and all(scheduler.config.get(k) == v for k, v in options.items())
    ]
    return max(fits)[1] if fits else cls


def _normalized(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())
