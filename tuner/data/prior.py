"""DreamBooth prior preservation: the class set, and generating its missing images with the stock pipeline.

Generated images are PNGs with a caption sidecar in the class folder (`data.class_data_dir`, by default
`<train.output_dir>/cache/class_images`, which `tuner publish` never uploads), named by index and prompt, so the
next run into that folder counts them and generates nothing. Each image has its own seed (train seed + index), so a
partly filled folder is completed with the same images an uninterrupted run would have made.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from tuner.config import RunConfig
from tuner.data.images import IMAGE_EXTENSIONS
from tuner.data.sources import Listing, scan_folder
from tuner.errors import ConfigError, DataError

logger = logging.getLogger("tuner.data")


DEFAULT_CLASS_DIR = Path("cache") / "class_images"
"""Where generated class images go when `data.class_data_dir` is not set, relative to `train.output_dir`."""


def class_folder(config: RunConfig, listing: Listing | None = None) -> Path | None:
    """The class-image folder: `data.class_data_dir`, else `<output_dir>/cache/class_images` when prior
    preservation needs generated class images and no `is_reg` subset provides them; None when no folder is used."""
    data = config.data
    if data.class_data_dir:
        return Path(data.class_data_dir).expanduser()
    if not (data.with_prior_preservation and data.prior_mode == "images"):
        return None
    if listing is not None:
        if any(item.is_class for item in listing.items):
            return None  # the is_reg subsets are the class set
    elif _has_reg_subset(config):
        return None
    return Path(config.train.output_dir).expanduser() / DEFAULT_CLASS_DIR


def _has_reg_subset(config: RunConfig) -> bool:
    """Whether `data.subsets` or a kohya TOML given as `data.path` holds an `is_reg` subset (no image is read)."""
    data = config.data
    if any(subset.is_reg for subset in data.subsets):
        return True
    local = Path(data.path).expanduser() if data.path else None
    if local is not None and local.suffix == ".toml" and local.is_file():
        from tuner.data.kohya import read_kohya_toml

        return any(subset.is_reg for subset in read_kohya_toml(local))
    return False


def check_prior_config(config: RunConfig, listing: Listing) -> None:
    """Prior-preservation settings that contradict each other or the listed subsets are config errors."""
    data = config.data
    has_reg = any(item.is_class for item in listing.items)
    if has_reg and not data.with_prior_preservation:
        raise ConfigError(
            "data.subsets: a subset has is_reg = true, but data.with_prior_preservation = false; regularization "
            "images are the class set of prior preservation, so enable it or set is_reg = false"
        )
    if not data.with_prior_preservation:
        return
    if data.prior_mode == "model" and not data.class_prompt:
        raise ConfigError("data.class_prompt is not set: prior_mode = 'model' needs it (e.g. 'a photo of dog')")
    if data.prior_mode == "images" and class_folder(config, listing) is not None and not data.class_prompt:
        raise ConfigError(
            f"data.class_prompt is not set: it captions (and generates) the class images of "
            f"{class_folder(config, listing)} (data.class_data_dir), e.g. --set data.class_prompt='a photo of dog'"
        )


def _prompt_tag(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def planned_class_files(config: RunConfig) -> tuple[list[Path], list[Path]]:
    """(user images already there, generated-image paths the folder should hold) for `class_data_dir`.

    Every rank computes the same plan from the same folder, so ranks can split the generation by index.
    """
    data = config.data
    folder = class_folder(config)
    tag = _prompt_tag(data.class_prompt or "")
    own = [p for p in _images_in(folder) if not (p.name.startswith("class-") and p.stem.endswith(tag))]
    # Generated files of another prompt count as user images: they are class images all the same.
    wanted = max(0, data.num_class_images - len(own))
    return own, [folder / f"class-{i:05d}-{tag}.png" for i in range(wanted)]


def class_listing(config: RunConfig, listing: Listing, into: Listing | None = None) -> dict | None:
    """Add the class folder's images to `into` (default: `listing`) and describe the class set for the report."""
    check_prior_config(config, listing)
    into = listing if into is None else into
    data = config.data
    if not data.with_prior_preservation:
        return None
    if data.prior_mode == "model":
        return {"mode": "model (frozen base model prediction on the instance images)", "prompt": data.class_prompt}
    folder = class_folder(config, listing)
    info = {"mode": "images", "prompt": data.class_prompt, "folder": str(folder) if folder else None, "wanted": None}
    if folder is not None:
        own, planned = planned_class_files(config)
        present = len(own) + sum(1 for p in planned if p.is_file())
        info.update(wanted=data.num_class_images, present=present, to_generate=len(planned) - present + len(own))
        if folder.is_dir():
            scan_folder(
                folder, data, "data.class_data_dir", recursive=False, fallback=data.class_prompt, is_class=True,
                listing=into,
            )  # fmt: skip
    items = listing.items + (into.items if into is not listing else [])
    info["regularization_images"] = sum(1 for item in items if item.is_class)
    return info


def ensure_class_images(config: RunConfig, parts, *, rank: int = 0, world_size: int = 1) -> int:
    """Generate the class images `class_data_dir` lacks with `parts.pipeline()`; returns how many this rank made.

    Ranks split the missing indices and then wait until every planned file exists.
    """
    data = config.data
    folder = class_folder(config)
    if folder is None or not (data.with_prior_preservation and data.prior_mode == "images"):
        return 0
    _, planned = planned_class_files(config)
    missing = [(i, p) for i, p in enumerate(planned) if not p.is_file()]
    if not missing:
        return 0
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.class_data_dir = {str(folder)!r}: cannot create it ({exc.strerror})") from None
    mine = [(i, p) for i, p in missing if i % world_size == rank]
    made = _generate(config, parts, mine, folder) if mine else 0
    deadline = time.monotonic() + 3600
    while any(not p.is_file() for _, p in missing):
        if time.monotonic() > deadline:
            raise DataError(f"data.class_data_dir = {str(folder)!r}: other processes did not finish class images")
        time.sleep(1.0)
    return made


def _generate(config: RunConfig, parts, todo: list[tuple[int, Path]], folder: Path) -> int:
    import torch
    from tqdm.auto import tqdm

    from tuner.validation import sampling_mode

    data = config.data
    pipe = parts.pipeline()
    size = data.resolution
    extension = data.caption_extension if data.caption_extension.startswith(".") else f".{data.caption_extension}"
    batch = data.sample_batch_size
    bar = tqdm(total=len(todo), desc="Generating class images", unit="img")
    made = 0
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        generators = [torch.Generator("cpu").manual_seed(config.train.seed + index) for index, _ in chunk]
        # Autocast: a trainer may already have put the parts it trains in fp32 beside half-precision frozen ones.
        with sampling_mode([parts.denoiser, parts.vae, *parts.text_encoders], parts.weight_dtype):
            images = pipe(
                prompt=[data.class_prompt] * len(chunk),
                height=size,
                width=size,
                num_inference_steps=data.class_inference_steps,
                generator=generators,
            ).images
        for (_, path), image in zip(chunk, images):
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG")
            path.with_suffix(extension).write_text(data.class_prompt + "\n", encoding="utf-8")
            os.replace(tmp, path)
            made += 1
        bar.update(len(chunk))
    bar.close()
    logger.info("generated %d class images in %s", made, folder)
    return made
