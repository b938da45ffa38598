"""`tuner sample` / `tuner grid`: load a stock pipeline plus LoRAs and embeddings, render, write PNGs.

Everything loads through diffusers' own loaders (`load_lora_weights`, `load_textual_inversion`), so what
this shows is what any diffusers user gets. User files are read as safetensors only: pickle files
(`.bin`, `.ckpt`, `.pt`) can run code when loaded and are refused.
"""

from __future__ import annotations

import contextlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuner.comparison import compare
from tuner.errors import TunerError
from tuner.guidance import GuidanceSchedule
from tuner.img2img import load_init_images
from tuner.validation import Row, scheduler_from_name

LORA_FILE = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass
class SampleResult:
    """What `sample` wrote: single images (row-major, then sampler, scale, seed) and the grid."""

    images: list[Path] = field(default_factory=list)
    grid: Path | None = None


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion file and the token that will stand for it in prompts (default: from the file)."""

    path: str | Path
    token: str | None = None


def sample(
    model: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    lora: Sequence[str | Path] = (),
    lora_scales: Sequence[float] = (1.0,),
    embeddings: Sequence[Embedding | str | Path] = (),
    vae: str | None = None,
    scheduler: str | Sequence[str] | None = None,
    negative_prompt: str | None = None,
    steps: int = 25,
    guidance_scale: float = 7.5,
    guidance: GuidanceSchedule | None = None,
    init_image: str | Path | None = None,
    mask: str | Path | None = None,
    strengths: Sequence[float] = (0.6,),
    width: int | None = None,
    height: int | None = None,
    grid: bool = True,
    write_images: bool = True,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> SampleResult:
    """Render prompts x samplers x LoRA scales (0 = the base model) x seeds with the model's stock pipelines.

    Prompts take A1111 syntax (weights, BREAK, long prompts). With `init_image` each prompt renders from that
    image at each strength (img2img, or inpainting with `mask`) instead of from noise. Writes
    `<out>/<prompt-slug>[_img2img<strength>][_<sampler>]_seed<s>[_scale<x>].png` unless `write_images` is
    false, and `<out>/grid.png` when `grid`. Every LoRA is applied at the same scale. Size defaults to the
    model's native size.
    """
    prompts = list(prompts)
    seeds = [int(s) for s in seeds]
    samplers = [scheduler] if isinstance(scheduler, str) or scheduler is None else list(scheduler)
    if not prompts:
        raise TunerError("sample: no prompts; give at least one --prompt")
    if not seeds:
        raise TunerError("sample: no seeds; give at least one --seeds value")
    if steps < 1:
        raise TunerError(f"--steps {steps}: must be at least 1")
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and (value < 8 or value % 8):
            raise TunerError(f"{flag} {value}: must be a positive multiple of 8")
    if mask is not None and init_image is None:
        raise TunerError("--mask: needs --init-image (the image to inpaint)")
    lora_paths = [lora_file(p) for p in lora]
    embedding_specs = [e if isinstance(e, Embedding) else Embedding(e) for e in embeddings]
    scales = [float(s) for s in lora_scales] if lora_paths else [1.0]
    if not scales:
        raise TunerError("--lora-scale: give at least one scale (0 = base model, 1 = as trained)")
    if not grid and not write_images:
        raise TunerError("sample: nothing to write (grid and single images are both off)")
    inits = (
        load_init_images([init_image], [mask] if mask else [], strengths, "--init-image", "--mask")
        if init_image
        else []
    )
    rows = [Row(p, init) for init in inits for p in prompts] if inits else [Row(p) for p in prompts]

    pipe = load_pipeline(model, vae=vae, device=device, dtype=dtype)
    adapters = load_loras(pipe, lora_paths)
    for spec in embedding_specs:
        load_embedding(pipe, spec)
    result = compare(
        pipe,
        rows,
        seeds,
        adapters=adapters,
        scales=scales,
        samplers=samplers,
        name=_title(model, lora_paths, embedding_specs),
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        guidance=guidance,
        width=width,
        height=height,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = SampleResult()
    if write_images:
        slugs = unique_slugs(prompts)  # rows repeat the prompts once per init image x strength
        for r, row in enumerate(rows):
            row_slug = slugs[r % len(prompts)]
            init_part = f"_{row.init.kind}{row.init.strength:g}" if row.init else ""
            for c, column in enumerate(result.columns):
                sampler_part = f"_{slug(column.sampler or 'default', 30)}" if len(samplers) > 1 else ""
                scale_part = f"_scale{column.scale:g}" if adapters else ""
                path = out / f"{row_slug}{init_part}{sampler_part}_seed{column.seed}{scale_part}.png"
                result.images[r][c].save(path)
                written.images.append(path)
    if grid:
        written.grid = out / "grid.png"
        result.grid().save(written.grid)
    return written


def load_pipeline(
    model: str,
    *,
    vae: str | None = None,
    scheduler: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """The model's stock diffusers pipeline (optionally with another VAE and sampler), ready to sample."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    from tuner.models import resolve_model_path

    source = resolve_model_path(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    components: dict[str, Any] = {}
    try:
        if vae:
            components["vae"] = AutoencoderKL.from_pretrained(vae)
    except (OSError, ValueError) as exc:
        raise TunerError(f"--vae {vae!r}: not an AutoencoderKL folder or hub id ({_first_line(exc)})") from None
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **components)
    except (OSError, ValueError) as exc:
        raise TunerError(
            f"--model {model!r}: not a diffusers pipeline folder, or it could not be fetched from the hub "
            f"({_first_line(exc)}); `tuner make-tiny DIR` writes a tiny one"
        ) from None
    if scheduler:
        pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    # Cast after loading: the dtype keyword of from_pretrained was renamed across supported diffusers versions.
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def lora_file(path: str | Path) -> Path:
    """The safetensors file to load: the path itself, or `pytorch_lora_weights.safetensors` in a folder."""
    path = Path(path)
    if path.is_dir():
        candidate = path / LORA_FILE
        if candidate.is_file():
            return candidate
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise TunerError(
            f"--lora {str(path)!r}: folder has no {LORA_FILE}; pass one of its files instead"
            + (f" ({', '.join(found)})" if found else " (it holds no .safetensors file)")
        )
    return _safetensors_file(path, "--lora")


def load_loras(pipe: Any, paths: Sequence[Path]) -> list[str]:
    """Load each LoRA (diffusers/peft or kohya keys; diffusers tells them apart) as its own adapter.

    A FLUX.1 file in kohya's BFL form is read by `tuner.export.lora_flux` and handed to diffusers in its own
    layout: diffusers' converter drops the modules outside the blocks and knows only FLUX.1's full widths.
    """
    names: list[str] = []
    for i, path in enumerate(paths):
        name = f"lora{i}_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)[:40]}"
        try:
            if _is_flux_kohya(path):
                with _as_diffusers_file(path) as converted:
                    pipe.load_lora_weights(str(converted.parent), weight_name=converted.name, adapter_name=name)
                names.append(name)
                continue
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a file that does not fit
            raise TunerError(
                f"--lora {str(path)!r}: could not be loaded into this model ({_first_line(exc)})"
            ) from None
        names.append(name)
    return names


def _is_flux_kohya(path: Path) -> bool:
    from tuner.export.convert import file_format

    try:
        return file_format(path) == "kohya-flux"
    except TunerError:
        return False


@contextlib.contextmanager
def _as_diffusers_file(path: Path):
    """A temporary diffusers-layout copy of a kohya FLUX.1 file (every module, each delta unchanged)."""
    import tempfile

    from tuner.export.lora_diffusers import write_peft_file
    from tuner.export.lora_flux import read_flux_kohya

    with tempfile.TemporaryDirectory() as tmp:
        yield write_peft_file(read_flux_kohya(path), Path(tmp) / "pytorch_lora_weights.safetensors")


def set_lora_scale(pipe: Any, names: Sequence[str], scale: float) -> None:
    """Every adapter at `scale`; 0 disables them, so the base model runs exactly as without LoRA."""
    if scale == 0:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters(list(names), adapter_weights=[scale] * len(names))


def load_embedding(pipe: Any, spec: Embedding) -> str:
    """Add a textual-inversion embedding to the pipeline's tokenizer(s) and text encoder(s); returns the token.

    Accepted files: `{token: T}` (diffusers), `{"emb_params": T}` (kohya, A1111), and for SDXL
    `{"clip_l": T, "clip_g": T}`; for SD3 / FLUX.1 `clip_l` (`clip_g`) and optionally `t5xxl` / `t5`. The
    default token is the single key of a diffusers file, else the file stem (as A1111 names embeddings).
    """
    from safetensors.torch import load_file

    path = _safetensors_file(Path(spec.path), "--embedding")
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged header raises several kinds
        raise TunerError(f"--embedding {str(path)!r}: not a readable safetensors file ({_first_line(exc)})") from None
    two_encoders = getattr(pipe, "text_encoder_2", None) is not None
    token = spec.token
    try:
        from tuner.export.embeddings import load_keyed, takes_keyed_files

        if takes_keyed_files(pipe):  # SD3 / FLUX.1: clip_l, clip_g, t5xxl keys name the encoders
            return load_keyed(pipe, path, state, token)
        if two_encoders:
            if not {"clip_l", "clip_g"} <= state.keys():
                raise TunerError(
                    f"--embedding {str(path)!r}: an SDXL model needs both 'clip_l' and 'clip_g' tensors; "
                    f"this file has {sorted(state)}"
                )
            token = token or path.stem
            pipe.load_textual_inversion(
                state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
            )
            pipe.load_textual_inversion(
                state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
            )
            return token
        if "clip_l" in state or "clip_g" in state:
            raise TunerError(
                f"--embedding {str(path)!r}: holds SDXL 'clip_l'/'clip_g' tensors; this model is not SDXL"
            )
        if len(state) != 1:
            raise TunerError(
                f"--embedding {str(path)!r}: expected one tensor ({{token: T}} or {{'emb_params': T}}), "
                f"found {sorted(state)}"
            )
        ((key, tensor),) = state.items()
        token = token or (path.stem if key == "emb_params" else key)
        pipe.load_textual_inversion(tensor, token=token)
        return token
    except TunerError:
        raise
    except Exception as exc:  # noqa: BLE001 - wrong width, token already in the vocabulary, ...
        raise TunerError(f"--embedding {str(path)!r} as {token!r}: could not be loaded ({_first_line(exc)})") from None


def slug(prompt: str, max_len: int = 60) -> str:
    """A file-name-safe ASCII form of a prompt ("A photo of <sks> dog!" -> "a-photo-of-sks-dog")."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return text[:max_len].rstrip("-") or "prompt"


def unique_slugs(prompts: Sequence[str]) -> list[str]:
    """Slugs that never collide (two prompts may slug alike, e.g. non-Latin ones)."""
    seen: dict[str, int] = {}
    out = []
    for prompt in prompts:
        base = slug(prompt)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def _safetensors_file(path: Path, flag: str) -> Path:
    if not path.is_file():
        raise TunerError(f"{flag} {str(path)!r}: file not found")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TunerError(
            f"{flag} {str(path)!r}: refusing a pickle file ({path.suffix}); loading one can run arbitrary code. "
            "Convert it to .safetensors with a tool you trust"
        )
    if path.suffix.lower() != ".safetensors":
        raise TunerError(f"{flag} {str(path)!r}: expected a .safetensors file")
    return path


def _title(model: str, loras: Sequence[Path], embeddings: Sequence[Embedding]) -> str:
    name = Path(model.rstrip("/")).name or model
    # A LoRA saved under the default file name is known by its folder (the run's name).
    extras = [p.parent.name if p.name == LORA_FILE else p.stem for p in loras]
    extras += [Path(e.path).stem for e in embeddings]
    return f"{name} + {', '.join(extras)}" if extras else name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
