"""Render rows x samplers x adapter scales x seeds as one labeled comparison: what a user judges a run by.

`compare` is the one function that `tuner sample`/`grid` and the UI call with a loaded pipeline; it labels each
column with only what differs between columns (sampler, scale, seed) and puts what all cells share (sampler,
steps, guidance) in the title. Row labels are the prompts as typed, weights included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from tuner.errors import TunerError
from tuner.samplers import label as sampler_label
from tuner.validation import Row, render_rows, scale_label, scheduler_from_name, settings_label


@dataclass
class Comparison:
    """Rendered cells, images[row][column], with the labels that tell them apart; `grid()` lays them out."""

    images: list[list[Image.Image]]
    rows: list[Row]
    columns: list[Column]
    title: str
    groups: int

    def grid(self) -> Image.Image:
        from tuner.grid import make_grid

        return make_grid(
            self.images,
            [r.label() for r in self.rows],
            [c.label for c in self.columns],
            self.title,
            groups=self.groups,
        )


@dataclass(frozen=True)
class Column:
    """One grid column: sampler, adapter scale and seed, and a label naming only what differs between columns."""

    sampler: str | None
    scale: float
    seed: int
    label: str


def compare(
    pipe: Any,
    rows: Sequence[Row],
    seeds: Sequence[int],
    *,
    adapters: Sequence[str] = (),
    scales: Sequence[float] = (1.0,),
    samplers: Sequence[str | None] = (None,),
    name: str = "",
    **render_kwargs: Any,
) -> Comparison:
    """Render rows (prompts, img2img / inpainting rows) x samplers x adapter scales x seeds: base vs tuned.

    The one entry point for `tuner sample`/`grid` and the UI. `adapters` are LoRA adapter names loaded on
    `pipe` (scale 0 = the base model); `samplers` are A1111 or diffusers scheduler names (None = the pipeline's
    own); `render_kwargs` go to `tuner.validation.render` (negative prompt, steps, guidance, size). The
    pipeline's scheduler and adapter scales are restored afterwards.
    """
    seeds = [int(s) for s in seeds]
    scales = [float(s) for s in scales] if adapters else [1.0]
    samplers = list(samplers) or [None]
    if not rows or not seeds or not scales:
        raise TunerError("compare: give at least one prompt, one seed and one scale")
    own = pipe.scheduler
    blocks: list[list[list[Image.Image]]] = []  # [sampler x scale][row][seed]
    labels: list[str] = []
    try:
        for sampler in samplers:
            pipe.scheduler = scheduler_from_name(sampler, own) if sampler else own
            for scale in scales:
                if adapters:
                    _set_scale(pipe, adapters, scale)
                blocks.append(render_rows(pipe, rows, seeds, **render_kwargs))
                labels.append(sampler_label(pipe.scheduler))
    finally:
        pipe.scheduler = own
        if adapters:
            _set_scale(pipe, adapters, 1.0)
    columns = []
    for i, sampler in enumerate(samplers):
        for j, scale in enumerate(scales):
            head = [labels[i * len(scales) + j]] if len(samplers) > 1 else []
            head += [scale_label(scale)] if adapters else []
            columns += [Column(sampler, scale, seed, " · ".join(head) + f"\nseed {seed}" if head else f"seed {seed}")
                        for seed in seeds]  # fmt: skip
    images = [[img for block in blocks for img in block[r]] for r in range(len(rows))]
    steps = render_kwargs.get("num_inference_steps", 25)
    guidance = render_kwargs.get("guidance_scale", 7.5)
    settings = settings_label(pipe, steps, guidance, render_kwargs.get("guidance"))
    if len(samplers) > 1:
        settings = settings.split(", ", 1)[1]  # the sampler is in the column labels
    title = f"{name} · {settings}" if name else settings
    return Comparison(images, list(rows), columns, title, groups=len(blocks))


def _set_scale(pipe: Any, adapters: Sequence[str], scale: float) -> None:
    from tuner.sampling import set_lora_scale

    set_lora_scale(pipe, adapters, scale)
