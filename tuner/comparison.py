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
    """One grid column: model (base / tuned), sampler, adapter scale and seed, and a label naming only what
    differs between columns."""

    model: str
    sampler: str | None
    scale: float
    seed: int
    label: str


def compare(
    pipe: Any,
    rows: Sequence[Row],
    seeds: Sequence[int],
    *,
    tuned: Any = None,
    adapters: Sequence[str] = (),
    scales: Sequence[float] = (1.0,),
    samplers: Sequence[str | None] = (None,),
    name: str = "",
    **render_kwargs: Any,
) -> Comparison:
    """Render rows (prompts, img2img / inpainting rows) x samplers x models x seeds: base vs tuned.

    The one entry point for `tuner sample`/`grid` and the UI. Base vs tuned is either `adapters` (LoRA adapter
    names loaded on `pipe`, shown at each of `scales`; 0 = the base model) or a second pipeline `tuned` (a full
    fine-tune) next to `pipe`. `samplers` are A1111 or diffusers scheduler names (None = the pipeline's own);
    `render_kwargs` go to `tuner.validation.render` (negative prompt, steps, guidance, guidance schedule, size).
    Schedulers and adapter scales are restored afterwards.
    """
    seeds = [int(s) for s in seeds]
    samplers = list(samplers) or [None]
    if tuned is not None and adapters:
        raise TunerError("compare: give adapters (scales of one pipeline) or a tuned pipeline, not both")
    if tuned is not None:
        variants = [("base", pipe, 1.0), ("tuned", tuned, 1.0)]
    elif adapters:
        variants = [(scale_label(float(s)), pipe, float(s)) for s in scales]
    else:
        variants = [("", pipe, 1.0)]
    if not rows or not seeds or not variants:
        raise TunerError("compare: give at least one prompt, one seed and one scale")
    owns = {id(p): (p, p.scheduler) for _, p, _ in variants}
    blocks: list[list[list[Image.Image]]] = []  # [sampler x variant][row][seed]
    columns: list[Column] = []
    try:
        for sampler in samplers:
            for model, target, scale in variants:
                own = owns[id(target)][1]
                target.scheduler = scheduler_from_name(sampler, own) if sampler else own
                if adapters:
                    _set_scale(target, adapters, scale)
                blocks.append(render_rows(target, rows, seeds, **render_kwargs))
                head = [sampler_label(target.scheduler)] if len(samplers) > 1 else []
                head += [model] if model else []
                columns += [Column(model, sampler, scale, seed, " · ".join(head) + f"\nseed {seed}" if head
                                   else f"seed {seed}") for seed in seeds]  # fmt: skip
    finally:
        for target, own in owns.values():
            target.scheduler = own
        if adapters:
            _set_scale(pipe, adapters, 1.0)
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
