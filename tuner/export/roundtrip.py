"""The round-trip check every export runs: load each written file into a fresh stock pipeline, compare outputs.

The reference is the model as trained (peft adapters active). Each file is loaded, on its own fresh
`DiffusionPipeline.from_pretrained(base)`, by the loader its users will use (`load_lora_weights`, peft, or an
A1111/ComfyUI-style weight merge); denoiser and text-encoder outputs on a fixed input must match to a tight
relative tolerance, and must reproduce the adapter's effect (so a file that silently drops modules fails
even when the adapter is still small). Everything is compared in fp32 on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.errors import TunerError
from tuner.export.state import LoraState

logger = logging.getLogger(__name__)

RTOL = 1e-5
# A file must reproduce all but this fraction of the adapter's own effect on the outputs.
EFFECT_TOL = 1e-2
PROMPT = "a photo of a toy on a table"


@dataclass(frozen=True)
class Check:
    """One file and how to load it: `diffusers` (`load_lora_weights`), `peft`, `merge` (A1111/ComfyUI math)
    into the base pipeline, `kohya-flux` / `comfyui` (FLUX.1's and Z-Image's ComfyUI files), or `pipeline` (the
    path is a whole pipeline folder, e.g. a fused export)."""

    path: Path
    loader: str
    rtol: float = RTOL
    scale: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.path.name} via {self.loader}"


def fresh_pipeline(
    source: str | Path, revision: str | None = None, complete: bool = False, given: dict[str, Any] | None = None
) -> Any:
    """The stock pipeline of a model folder or hub id, fp32 on CPU, nothing loaded into it.

    Without `complete`, the safety checker is left out: it never touches UNet or text-encoder outputs. `given`
    components (e.g. `stock_parts`') are used as they are instead of being read from disk.
    """
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(source), revision=revision)
    names = () if complete else ("safety_checker", "feature_extractor")
    skip: dict[str, Any] = {n: None for n in names if (index.get(n) or [None])[0]}
    if "safety_checker" in skip:
        skip["requires_safety_checker"] = False
    pipe = DiffusionPipeline.from_pretrained(str(source), revision=revision, dtype=torch.float32, **skip,
                                             **(given or {}))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_into(pipe: Any, check: Check) -> None:
    """Load `check.path` into `pipe` with its loader, at `check.scale`."""
    if check.loader == "diffusers":
        pipe.load_lora_weights(str(check.path), adapter_name="roundtrip")
        if check.scale != 1.0:
            pipe.set_adapters(["roundtrip"], [check.scale])
    elif check.loader == "peft":
        from tuner.export.lora_diffusers import load_peft_adapter

        load_peft_adapter(pipe, check.path, adapter_name="roundtrip", scale=check.scale)
    elif check.loader == "merge":
        from tuner.export.merge import apply_kohya

        apply_kohya(pipe, check.path, check.scale)
    elif check.loader == "kohya-flux":  # fused BFL modules split back by rows, as ComfyUI slices its fused qkv
        from tuner.export.lora_diffusers import inject_state
        from tuner.export.lora_flux import read_flux_kohya

        for name, comp in read_flux_kohya(check.path).components.items():
            inject_state(getattr(pipe, name), comp, "roundtrip")
    elif check.loader == "comfyui":  # Z-Image's diffusion_model. file, merged on the modules ComfyUI's map names
        from tuner.export.lora_comfy import apply_comfy

        apply_comfy(pipe, check.path, check.scale)
    else:
        raise TunerError(
            f"round-trip loader {check.loader!r}: allowed: diffusers, peft, merge, kohya-flux, comfyui, pipeline"
        )


def stock_parts(parts: Any) -> Callable[[], dict[str, Any]]:
    """`fresh_pipeline`'s `given` for checks on the model as trained: a stock denoiser and stock text encoders
    built on the trained modules' own frozen base tensors (shared, not copied), so a check holds no second copy of
    the model in memory. Each call builds new modules, since a check's loader wraps or merges into them.

    A part is shared only when it is fp32 on the CPU and training left its base untouched (adapters only);
    otherwise, or when a stock module cannot take every tensor, the checks read it from disk as before."""
    family = parts.family
    trained = {family.denoiser_component: parts.unwrapped(parts.denoiser)}
    for spec, encoder in zip(family.encoders, parts.text_encoders):
        trained[spec.component] = parts.unwrapped(encoder)

    def build() -> dict[str, Any]:
        built = {name: _stock_copy(module) for name, module in trained.items()}
        return {name: module for name, module in built.items() if module is not None}

    return build


def _stock_copy(trained: nn.Module) -> nn.Module | None:
    """A module of the same class and config, without adapters, whose parameters are `trained`'s base tensors."""
    from accelerate import init_empty_weights

    config = getattr(trained, "config", None)
    if config is None or not _is_cpu_fp32([trained]):
        return None
    base = {key.replace(".base_layer.", "."): t for key, t in trained.state_dict(keep_vars=True).items()}
    cls = type(trained)
    with init_empty_weights():  # parameters on the meta device; buffers (position ids...) built for real
        stock = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    wanted = stock.state_dict()
    if not set(wanted) <= set(base) or any(base[k].shape != wanted[k].shape for k in wanted):
        return None
    if any(base[k].requires_grad for k in wanted):  # a trained base weight: only the disk holds the base
        return None
    stock.load_state_dict({k: base[k].detach() for k in wanted}, assign=True)
    if any(t.is_meta for t in [*stock.parameters(), *stock.buffers()]):
        return None
    return stock.eval().requires_grad_(False)


def checked_pipeline(check: Check, source: str | Path, revision: str | None, given=dict) -> Any:
    """A fresh pipeline with `check`'s file loaded (or the pipeline folder itself); `given()` supplies components
    that are not read from disk (see `stock_parts`)."""
    if check.loader == "pipeline":
        return fresh_pipeline(check.path)
    pipe = fresh_pipeline(source, revision, given=given())
    try:
        load_into(pipe, check)
    except TunerError:
        raise
    except Exception as exc:  # noqa: BLE001 - a loader crash is an export failure with its reason
        raise TunerError(f"round-trip check: {check.label} failed to load: {type(exc).__name__}: {exc}") from exc
    return pipe


@dataclass
class Probe:
    """Fixed inputs, built once from the base pipeline: latents, a timestep, the base encoders' embeddings of one
    prompt (the denoiser's conditioning, so its output is compared alone) and that prompt's token ids."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor | None
    input_ids: list[torch.Tensor]

    @classmethod
    def for_pipeline(cls, pipe: Any, size: int = 16) -> Probe:
        from tuner.models import Parts

        parts = Parts.from_pipeline(pipe)
        gen = torch.Generator().manual_seed(0)
        ids = parts.family.tokenize(parts, [PROMPT])
        with evaluating(parts.text_encoders):
            embeds, pooled = parts.family.encode(parts, ids)
        latents = torch.randn(1, parts.vae.config.latent_channels, size, size, generator=gen)
        return cls(latents, torch.tensor([500]), embeds.float(), None if pooled is None else pooled.float(), ids)


@contextlib.contextmanager
def evaluating(modules: list[nn.Module]) -> Iterator[None]:
    """eval() (no dropout) and no_grad for the comparison; training flags restored afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def outputs(parts: Any, probe: Probe) -> dict[str, torch.Tensor]:
    """Per component a pipeline uses: the denoiser's prediction on the probe, and each adaptable text encoder's
    last and penultimate hidden states (T5 never carries an adapter)."""
    parts = dataclasses.replace(parts, guidance_scale=1.0)  # one embedded guidance for every side of a comparison
    family = parts.family
    denoiser = parts.unwrapped(parts.denoiser)
    encoders = parts.text_encoder_modules(adaptable_only=True)
    with evaluating([denoiser, *encoders.values()]):
        device, dtype = _where(denoiser)
        embeds = probe.embeds.to(device, dtype)
        pooled = None if probe.pooled is None else probe.pooled.to(device, dtype)
        cond = family.conditioning(parts, embeds, pooled, {"latents": probe.latents})
        pred = family.predict(parts, denoiser, probe.latents.to(device, dtype), probe.timesteps.to(device), cond)
        out = {family.denoiser_component: pred.float().cpu()}
        ids_of = dict(zip([spec.component for spec in family.encoders], probe.input_ids))
        for name, encoder in encoders.items():
            encoder = parts.unwrapped(encoder)
            result = encoder(ids_of[name].to(_where(encoder)[0]), output_hidden_states=True)
            out[name] = torch.cat([result[0].flatten(), result.hidden_states[-2].flatten()]).float().cpu()
    return out


def _where(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def pipeline_outputs(pipe: Any, probe: Probe) -> dict[str, torch.Tensor]:
    from tuner.models import Parts

    return outputs(Parts.from_pipeline(pipe), probe)


def outputs_of(make: Callable[[], Any], probe: Probe) -> dict[str, torch.Tensor]:
    """Build a pipeline, take its outputs and free it before returning: one full-size copy in memory at a time."""
    pipe = make()
    out = pipeline_outputs(pipe, probe)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    big = sum(p.numel() for p in denoiser.parameters()) > 50_000_000
    del pipe, denoiser
    if big:  # collecting costs ~1 s; worth it only when gigabytes are at stake
        gc.collect()
    return out


def _is_cpu_fp32(modules: list[nn.Module]) -> bool:
    return all(p.device.type == "cpu" and p.dtype == torch.float32 for m in modules for p in m.parameters())


def trained_outputs(parts: Any, state: LoraState, probe: Probe) -> dict[str, torch.Tensor]:
    """Outputs of the model as trained: `parts` itself when it is fp32 on CPU, else the base plus `state`."""
    modules = [parts.unwrapped(m) for m in (parts.denoiser, *parts.text_encoders)]
    if _is_cpu_fp32(modules):
        return outputs(parts, probe)
    from tuner.export.lora_diffusers import inject_state

    def rebuilt() -> Any:
        pipe = fresh_pipeline(parts.source, parts.revision)
        for name, comp in state.components.items():
            inject_state(getattr(pipe, name), comp, "reference")
        return pipe

    return outputs_of(rebuilt, probe)


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
            rtol: float) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """(max |difference| per component, problems)."""
    diffs, problems = {}, []
    for name, reference in want.items():
        diff = (got[name] - reference).abs().max().item()
        scale = reference.abs().max().item() or 1.0
        effect = (reference - base[name]).abs().max().item()
        diffs[name] = diff
        if not torch.isfinite(got[name]).all():
            problems.append(f"{name}: non-finite outputs")
        elif diff > rtol * scale:
            problems.append(f"{name}: max |difference| {diff:.3g} ({diff / scale:.3g} relative; tolerance {rtol:g})")
        elif effect > 100 * rtol * scale and diff > EFFECT_TOL * effect:
            problems.append(f"{name}: reproduces only {1 - diff / effect:.1%} of the adapter's effect {effect:.3g}")
    return diffs, problems


def verify(
    source: str | Path,
    want: Callable[[Probe], dict[str, torch.Tensor]],
    checks: list[Check],
    revision: str | None = None,
    given: Callable[[], dict[str, Any]] = dict,
) -> dict[str, dict[str, float]]:
    """Compare each check's outputs with `want(probe)`; raise `TunerError` naming every mismatch. `given()`
    supplies pipeline components shared with the trained model instead of read from disk (`stock_parts`)."""
    held = [fresh_pipeline(source, revision, given=given())]
    probe = Probe.for_pipeline(held[0])
    base = outputs_of(held.pop, probe)  # pop: no reference to the base pipeline survives
    reference = want(probe)
    report: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    for check in checks:
        got = outputs_of(lambda check=check: checked_pipeline(check, source, revision, given), probe)
        report[check.label], problems = compare(got, reference, base, check.rtol)
        failures += [f"{check.label}: {p}" for p in problems]
        worst = ", ".join(f"{part} {diff:.2g}" for part, diff in report[check.label].items())
        logger.info("export check: %s reproduces the trained model (max difference: %s)", check.label, worst)
    if failures:
        raise TunerError("round-trip check failed (the exported files do not reproduce the trained model):\n  "
                         + "\n  ".join(failures))  # fmt: skip
    return report


def verify_export(parts: Any, state: LoraState, checks: list[Check]) -> dict[str, dict[str, float]]:
    """Every check against the model as trained; `state` is the adapter collected from `parts` (the reference
    when `parts` is not fp32 on the CPU)."""
    return verify(parts.source, lambda probe: trained_outputs(parts, state, probe), checks, parts.revision,
                  stock_parts(parts))  # fmt: skip


def verify_files(source: str | Path, reference: Check, checks: list[Check], revision: str | None = None):
    """Every check against `reference` (e.g. a converted file against its input), on base model `source`."""

    return verify(source, lambda probe: outputs_of(lambda: checked_pipeline(reference, source, revision), probe),
                  checks, revision)  # fmt: skip
