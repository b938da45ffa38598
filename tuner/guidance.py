"""Guidance schedules for sampling: w(t) that changes over the steps, CFG rescale, and a guidance interval.

Applied through the stock pipeline's own hooks, never a forked pipeline: `guidance_rescale` is a pipeline
argument, and the schedule is a `callback_on_step_end` that sets the pipeline's `_guidance_scale` for the next
step (the stock loop reads it each step). The linear and cosine schedules rise from no guidance at the first
step, as in the guidance-schedule studies (e.g. Wang et al. 2024, "Analysis of classifier-free guidance weight
schedulers"), and average to the constant scale, so grids compare them at equal mean guidance. The interval
(Kynkäänniemi et al. 2024) guides only within a fraction of the steps.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

from tuner.errors import TunerError

SCHEDULES = ("constant", "linear", "cosine")

NO_GUIDANCE = math.nextafter(1.0, 2.0)
"""w = 1 (the conditional prediction alone) as the smallest float above 1: a stock pipeline drops its
unconditional batch at w <= 1, which it cannot do halfway through sampling, and at this w the result differs
from the conditional prediction by one rounding step."""


@dataclass(frozen=True)
class GuidanceSchedule:
    """How classifier-free guidance varies over the sampling steps (the defaults are stock CFG)."""

    kind: str = "constant"
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise TunerError(f"guidance_schedule {self.kind!r}: allowed: {', '.join(SCHEDULES)}")
        if not 0.0 <= self.rescale <= 1.0:
            raise TunerError(f"guidance_rescale {self.rescale:g}: must be between 0 and 1")
        if self.interval is not None:
            lo, hi = self.interval
            if not 0.0 <= lo < hi <= 1.0:
                raise TunerError(
                    f"guidance_interval {list(self.interval)}: must be [start, end] fractions of the steps "
                    "with 0 <= start < end <= 1"
                )

    @property
    def varies(self) -> bool:
        """Whether the scale changes during sampling (needs the step callback)."""
        return self.kind != "constant" or self.interval is not None

    def scale_at(self, scale: float, progress: float) -> float:
        """w at `progress` in [0, 1] (0 = the first, noisiest step) for a base scale `scale` > 1."""
        if self.interval is not None and not self.interval[0] <= progress <= self.interval[1]:
            return NO_GUIDANCE
        if self.kind == "linear":
            w = 1.0 + (scale - 1.0) * 2.0 * progress
        elif self.kind == "cosine":
            w = 1.0 + (scale - 1.0) * (1.0 - math.cos(math.pi * progress))
        else:
            w = scale
        return max(w, NO_GUIDANCE)

    def label(self) -> str:
        """Short text for grids: empty for stock CFG."""
        parts = [] if self.kind == "constant" else [f"{self.kind} w(t)"]
        if self.rescale:
            parts.append(f"rescale {self.rescale:g}")
        if self.interval is not None:
            parts.append(f"interval {self.interval[0]:g}-{self.interval[1]:g}")
        return ", ".join(parts)

    def call_kwargs(self, pipe: Any, scale: float) -> dict[str, Any]:
        """Keyword arguments for `pipe(...)`: the first step's scale, the step callback, the rescale."""
        if not self.varies and not self.rescale:
            return {"guidance_scale": scale}
        name = type(pipe).__name__
        if not hasattr(type(pipe), "do_classifier_free_guidance"):
            raise TunerError(
                f"validation.guidance_schedule / guidance_rescale: {name} has no classifier-free guidance to "
                "schedule (FLUX.1 embeds its guidance in the model); use the constant schedule without rescale"
            )
        if scale <= 1.0:
            raise TunerError(
                f"validation.guidance_schedule / guidance_rescale: need guidance_scale > 1 (got {scale:g}); "
                "at 1 or below the pipeline samples without classifier-free guidance"
            )
        kwargs: dict[str, Any] = {"guidance_scale": self.scale_at(scale, 0.0)}
        if self.rescale:
            if "guidance_rescale" not in inspect.signature(pipe.__call__).parameters:
                raise TunerError(f"validation.guidance_rescale: {name} does not take it; set it to 0 for these rows")
            kwargs["guidance_rescale"] = self.rescale
        if self.varies:
            kwargs["callback_on_step_end"] = _StepScale(self, scale)
        return kwargs


@dataclass(frozen=True)
class _StepScale:
    """`callback_on_step_end`: after step i, set the scale the pipeline uses at step i + 1."""

    schedule: GuidanceSchedule
    scale: float

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        steps = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
        progress = min(1.0, (step + 1) / max(1, steps - 1))
        pipe._guidance_scale = self.schedule.scale_at(self.scale, progress)
        return {}
