"""img2img and inpainting rows: an init image (and a mask), rendered by the family's stock image pipelines.

The text-to-image pipeline is turned into its img2img or inpainting sibling with diffusers' `from_pipe`
(`AutoPipelineForImage2Image` / `AutoPipelineForInpainting`), which shares every component, so a LoRA or an
adapter scale set on one is in effect on the other. Strength 0 means no denoising step at all: the init image
through the VAE and back (stock pipelines either fail on an empty step list or noise the image anyway).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from tuner.errors import TunerError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True, eq=False)
class InitImage:
    """An init image for img2img rows, with a mask (white = repaint) for inpainting rows."""

    image: Image.Image
    strength: float = 0.6
    mask: Image.Image | None = None
    name: str = ""

    @property
    def kind(self) -> str:
        return "inpaint" if self.mask is not None else "img2img"

    def label(self) -> str:
        """Row label prefix: what kind, of which image, at what strength."""
        name = f" {self.name}" if self.name else ""
        return f"[{self.kind}{name}, strength {self.strength:g}]"


def load_init_images(
    images: Sequence[str | Path],
    masks: Sequence[str | Path] = (),
    strengths: Sequence[float] = (0.6,),
    field: str = "validation.init_images",
    mask_field: str = "validation.masks",
) -> list[InitImage]:
    """One `InitImage` per image x strength; masks pair with images by position (none, or "": img2img)."""
    if masks and len(masks) != len(images):
        raise TunerError(f"{mask_field}: {len(masks)} masks for {len(images)} init images; give one per image")
    for strength in strengths:
        if not 0.0 <= strength <= 1.0:
            raise TunerError(f"strength {strength:g}: must be between 0 and 1 (0 = the init image unchanged)")
    out = []
    for i, path in enumerate(images):
        at = "" if field.startswith("--") else f"[{i}]"  # a command-line flag takes one image
        image = _read(path, f"{field}{at}").convert("RGB")
        mask = _read(masks[i], f"{mask_field}{at}").convert("L") if masks and masks[i] else None
        if mask is not None and mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.NEAREST)
        out += [InitImage(image, float(s), mask, Path(path).stem) for s in strengths]
    return out


def image_pipeline(pipe: Any, init: InitImage) -> Any:
    """The img2img or inpainting sibling of a text-to-image pipeline (same components; made once per pipe)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    cache = pipe.__dict__.setdefault("_tuner_image_pipelines", {})
    if init.kind not in cache:
        auto = AutoPipelineForInpainting if init.mask is not None else AutoPipelineForImage2Image
        try:
            derived = auto.from_pipe(pipe)
        except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/KeyError for a pipeline it cannot map
            raise TunerError(f"{type(pipe).__name__} has no stock {init.kind} pipeline ({exc})") from None
        derived.set_progress_bar_config(disable=True)
        cache[init.kind] = derived
    derived = cache[init.kind]
    derived.scheduler = pipe.scheduler  # the sampler may have changed since (one object, as from_pipe shares)
    return derived


def call_kwargs(init: InitImage, width: int | None, height: int | None, pipe: Any = None) -> dict[str, Any]:
    """The image arguments of the pipeline call, the init image (and mask) resized to the sample size; the size
    too where the pipeline takes one (inpainting, FLUX.1 img2img), else it would pick its own default."""
    image = _sized(init.image, width, height)
    kwargs: dict[str, Any] = {"image": image, "strength": init.strength}
    if init.mask is not None:
        kwargs["mask_image"] = _sized(init.mask, width, height)
    if init.mask is not None or (pipe is not None and "height" in inspect.signature(pipe.__call__).parameters):
        kwargs |= {"width": image.width, "height": image.height}
    return kwargs


def round_trip(pipe: Any, image: Image.Image, width: int | None = None, height: int | None = None) -> Image.Image:
    """The image through the pipeline's VAE and back (the latent mean), as the pipeline pre- and post-processes."""
    image = _sized(image, width, height)
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image).to(vae.device, vae.dtype)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


def _sized(image: Image.Image, width: int | None, height: int | None) -> Image.Image:
    w, h = width or image.width, height or image.height
    w, h = w - w % 8, h - h % 8
    if (w, h) == image.size:
        return image
    return image.resize((w, h), Image.Resampling.NEAREST if image.mode == "L" else Image.Resampling.LANCZOS)


def _read(path: str | Path, field: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise TunerError(f"{field} {str(path)!r}: file not found")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise TunerError(f"{field} {str(path)!r}: expected an image ({', '.join(IMAGE_SUFFIXES)})")
    try:
        with Image.open(path) as opened:
            return ImageOps.exif_transpose(opened).copy()
    except OSError as exc:
        raise TunerError(f"{field} {str(path)!r}: not a readable image ({exc})") from None
