"""Full-decoder fine-tuning: retrain the VAE decoder on the user's domain while the encoder stays frozen.

Because the encoder and `quant_conv` never change, every latent a UNet, LoRA or embedding was trained on
keeps its meaning, so the tuned VAE drops into any pipeline of the family (the sd-vae-ft-mse recipe).
The trainer owns the losses, the base-vs-tuned evaluation on held-out images (`metrics.json`), the
reconstruction grid, and the two exports: a diffusers `AutoencoderKL` folder and an A1111/ComfyUI single
file with the original LDM key names, both reloaded and checked against the trained decoder.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from tuner.config import MethodConfig
from tuner.errors import TunerError
from tuner.export.vae import check_round_trip, save_single_file
from tuner.metrics import compare_reconstructions, format_comparison, load_lpips, to_json
from tuner.trainer import Artifact, ArtifactFile, Trainables, Trainer

if TYPE_CHECKING:
    from PIL import Image

    from tuner.models import Parts


class DecoderConfig(MethodConfig):
    l1_weight: float = Field(1.0, ge=0)
    """Weight of the L1 pixel loss (sharp, robust to outliers)."""
    mse_weight: float = Field(0.0, ge=0)
    """Weight of the MSE pixel loss (what PSNR measures; sd-vae-ft-mse's main term)."""
    lpips_weight: float = Field(0.0, ge=0)
    """Weight of the LPIPS perceptual loss (0 = off); needs `pip install lpips` and its weights on disk."""
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    """LPIPS backbone, for the loss and the held-out metric."""
    edge_weight: float = Field(0.0, ge=0)
    """Weight of an L1 loss on Sobel gradients: rewards high-frequency detail that pixel losses blur."""
    latent_sampling: Literal["sample", "mean"] = "sample"
    """Decode a sample of the encoder's latent distribution (as the UNet was trained on, and as
    sd-vae-ft-mse was tuned) or its mean. Evaluation and grids always decode the mean."""
    train_post_quant_conv: bool = True
    """Also train `post_quant_conv` (the 1x1 conv in front of the decoder)."""
    train_whole_vae: bool = False
    """Also train the encoder and `quant_conv` (a VAE from scratch): existing UNets no longer match it."""
    kl_weight: float = Field(1e-6, ge=0)
    """KL weight of the latent distribution; only with `train_whole_vae` (the frozen encoder's KL is fixed)."""
    eval_max_images: int = Field(64, ge=1)
    """At most this many held-out images (`data.holdout_fraction` > 0) are evaluated for `metrics.json`; with
    none held out, `metrics.json` says so and the grid shows text-to-image samples only."""
    grid_images: int = Field(4, ge=1)
    """Held-out images shown in the validation grid (one row each)."""
    difference_gain: float = Field(4.0, gt=0)
    """The grid's |error| columns are multiplied by this so small differences are visible."""
    single_file_name: str = "decoder.vae.safetensors"
    """Name of the A1111/ComfyUI single-file VAE (original LDM key names) written next to `vae/`."""

    @field_validator("single_file_name")
    @classmethod
    def _plain_safetensors_name(cls, value: str) -> str:
        if not value.endswith(".safetensors") or "/" in value or "\\" in value or value.startswith("."):
            raise ValueError("expected a plain file name ending in .safetensors, e.g. 'decoder.vae.safetensors'")
        return value

    @model_validator(mode="after")
    def _some_loss(self) -> DecoderConfig:
        if not (self.l1_weight or self.mse_weight or self.lpips_weight or self.edge_weight):
            raise ValueError("l1_weight, mse_weight, lpips_weight and edge_weight are all 0; set at least one > 0")
        return self


def sobel(images: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel responses per channel, [B, 2C, H, W] (edge-replicated borders)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device) / 8
    kernel = torch.stack([kx, kx.T]).unsqueeze(1).to(images.dtype)  # [2, 1, 3, 3]
    channels = images.shape[1]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel.repeat(channels, 1, 1, 1), groups=channels)


class DecoderTrainer(Trainer):
    """Trains the VAE decoder (+ `post_quant_conv` where the VAE has one) against the pixels its frozen encoder saw."""

    name = "decoder"
    Config = DecoderConfig
    data_kinds = frozenset({"captioned"})

    def __init__(self, config):
        super().__init__(config)
        self.base_modules: dict[str, torch.nn.Module] = {}
        self.holdout: list[Any] | None = None
        """Held-out examples (`tuner.data.HeldOutExample`); built from `data` on first use when left None."""
        self._lpips: Any = None
        self._lpips_note: str | None = None
        self._base_samples: list[list[Image.Image]] | None = None

    @property
    def trained_names(self) -> list[str]:
        cfg = self.method_config
        names = ["decoder"] + (["post_quant_conv"] if cfg.train_post_quant_conv or cfg.train_whole_vae else [])
        return names + (["encoder", "quant_conv"] if cfg.train_whole_vae else [])

    # --- the contract ---------------------------------------------------------------------------------------
    def prepare(self, parts: Parts) -> Trainables:
        cfg = self.method_config
        vae = parts.unwrapped(parts.vae)
        for module in (parts.denoiser, vae, *parts.text_encoders):
            module.requires_grad_(False)
        if cfg.lpips_weight > 0:  # fail before training, not at the first step
            try:
                self._lpips = load_lpips(cfg.lpips_net, parts.device)
            except TunerError as exc:
                raise TunerError(f"decoder.lpips_weight = {cfg.lpips_weight:g}: {exc}; or set it to 0") from None
        # Everything from post_quant_conv on computes in fp32, trained or not (the loop keeps trained weights
        # fp32; a half-precision post_quant_conv in front of them would feed the decoder the wrong dtype).
        for module in (vae.post_quant_conv, vae.decoder):
            if module is not None:
                module.to(torch.float32)
        groups = []
        for name in self.trained_names:
            module = getattr(vae, name, None)
            if module is None:
                continue  # a VAE without (post_)quant_conv
            # A frozen copy of what trains: base reconstructions for metrics and grids (decoder-sized, small).
            self.base_modules[name] = copy.deepcopy(module).requires_grad_(False).eval()
            module.requires_grad_(True)
            groups.append({"name": f"vae.{name}", "params": list(module.parameters())})
        if self.config.train.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        # A trained encoder makes cached latents stale: encode in the step then.
        needs = {"pixels"} if cfg.train_whole_vae else {"pixels", "latents"}
        return Trainables(modules={"vae": parts.vae}, param_groups=groups, needs=frozenset(needs))

    def compute_loss(self, parts: Parts, batch: dict[str, Any]) -> torch.Tensor:
        cfg = self.method_config
        vae = parts.unwrapped(parts.vae)
        target = batch["pixel_values"].to(parts.device, torch.float32)
        kl = None
        if parts.vae is not vae:
            # Wrapped for multi-process training (DDP, FSDP, DeepSpeed): only the wrapper's forward syncs
            # gradients, and AutoencoderKL's forward encodes (frozen, no graph) then decodes: cached latents
            # are not used then.
            pixels = target.to(vae.encoder.conv_in.weight.dtype)
            sample = cfg.latent_sampling == "sample"
            recon = parts.vae(pixels, sample_posterior=sample, generator=batch.get("generator")).sample.float()
        else:
            latents, kl = self._latents(parts, batch)
            recon = decode(vae, latents).float()
        loss = recon.new_zeros(())
        if cfg.l1_weight:
            loss = loss + cfg.l1_weight * F.l1_loss(recon, target)
        if cfg.mse_weight:
            loss = loss + cfg.mse_weight * F.mse_loss(recon, target)
        if cfg.edge_weight:
            loss = loss + cfg.edge_weight * F.l1_loss(sobel(recon), sobel(target))
        if cfg.lpips_weight:
            loss = loss + cfg.lpips_weight * self._lpips((recon.clamp(-1, 1) + 1) / 2, (target + 1) / 2).mean()
        if kl is not None and cfg.kl_weight:
            loss = loss + cfg.kl_weight * kl
        return loss

    def _latents(self, parts: Parts, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unscaled latents to decode (cached one-sample latents, cached distribution, or the encoder) + KL."""
        if "latents" in batch:  # data.latent_cache_mode = "sample": one fixed sample per image
            return batch["latents"].to(parts.device), None
        kl = None
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(parts.device), batch["latent_std"].to(parts.device)
        else:
            vae = parts.unwrapped(parts.vae)
            pixels = batch["pixel_values"].to(parts.device, vae.encoder.conv_in.weight.dtype)
            with contextlib.nullcontext() if self.method_config.train_whole_vae else torch.no_grad():
                dist = vae.encode(pixels).latent_dist
            mean, std = dist.mean, dist.std
            kl = dist.kl().mean() if self.method_config.train_whole_vae else None
        if self.method_config.latent_sampling == "mean":
            return mean, kl
        noise = torch.randn(mean.shape, generator=batch.get("generator"), dtype=torch.float32)
        return mean + std * noise.to(mean.device, mean.dtype), kl

    def validation_prompts(self) -> list[str]:
        return super().validation_prompts() or ["a photo"]

    # --- base vs tuned ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def base_vae(self, parts: Parts):
        """The VAE with its base (pre-training) decoder swapped in for the duration; tuned weights come back."""
        vae = parts.unwrapped(parts.vae)
        tuned = {name: getattr(vae, name) for name in self.base_modules}
        for name, module in self.base_modules.items():
            setattr(vae, name, module.to(next(tuned[name].parameters()).device))
        try:
            yield vae
        finally:
            for name, module in tuned.items():
                setattr(vae, name, module)

    def holdout_examples(self, parts: Parts) -> list[Any]:
        """`data.holdout` (the same deterministic split the loop trains without), built once, pixels only."""
        if self.holdout is None:
            from tuner.data import build_training_data

            self.holdout = build_training_data(self.config, parts, frozenset({"pixels"}), verbose=False).holdout
        return self.holdout

    def reconstructions(self, parts: Parts, examples: list[Any]) -> list[tuple[torch.Tensor, ...]]:
        """(original, base, tuned) per example, [1, 3, H, W] in [0, 1]; latents are the distribution mean."""
        vae = parts.unwrapped(parts.vae)

        def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
            latents = model.encode(x.to(model.encoder.conv_in.weight.dtype)).latent_dist.mean
            return ((decode(model, latents).float().clamp(-1, 1) + 1) / 2).cpu()

        out = []
        modes = [(m, m.training) for m in vae.modules()]
        vae.eval()
        try:
            with torch.no_grad():
                for example in examples:
                    x = example.pixel_values[None].to(parts.device, torch.float32)
                    tuned = reconstruct(vae, x)
                    with self.base_vae(parts) as base_model:
                        base = reconstruct(base_model, x)
                    out.append((((x + 1) / 2).clamp(0, 1).cpu(), base, tuned))
        finally:
            for module, mode in modes:
                module.training = mode
        return out

    def evaluate(self, parts: Parts, examples: list[Any] | None = None) -> dict[str, Any]:
        """PSNR / SSIM (/ LPIPS) of base and tuned reconstructions of held-out images, per image and averaged."""
        examples = self.holdout_examples(parts) if examples is None else examples
        if not examples:
            return {
                "holdout_images": 0,
                "skipped": "no held-out images: set data.holdout_fraction (e.g. 0.1) to compare base and tuned "
                "decoders on images they did not train on",
            }
        chosen = examples[: self.method_config.eval_max_images]
        rows = [(e.name, *recons) for e, recons in zip(chosen, self.reconstructions(parts, chosen))]
        summary = {"holdout_images": len(examples), "latents": "mean"}
        summary |= compare_reconstructions(rows, self._metric_lpips(parts))
        if self._lpips_note:
            summary["lpips"] = self._lpips_note
        return summary

    def _metric_lpips(self, parts: Parts):
        """The loss's LPIPS, else one loaded just for metrics when available; a note says why not otherwise."""
        if self._lpips is None and self._lpips_note is None:
            try:
                self._lpips = load_lpips(self.method_config.lpips_net, parts.device)
            except TunerError as exc:
                self._lpips_note = f"not computed: {exc}"
        return self._lpips

    # --- grid ----------------------------------------------------------------------------------------------
    def validation_images(self, parts: Parts, step: int) -> Image.Image | None:
        """Held-out rows (original | base | tuned | amplified errors), then text-to-image with base vs tuned VAE."""
        from tuner.grid import make_grid

        val, cfg = self.config.validation, self.method_config
        if not val.enabled:
            return None
        grids = []
        examples = self.holdout_examples(parts)[: cfg.grid_images]
        if examples:
            gain = cfg.difference_gain
            rows = []
            for original, base, tuned in self.reconstructions(parts, examples):
                errors = [((r - original).abs() * gain).clamp(0, 1) for r in (base, tuned)]
                rows.append([_to_pil(t) for t in (original, base, tuned, *errors)])
            columns = ["original", "base", "tuned", f"|base - original| x{gain:g}", f"|tuned - original| x{gain:g}"]
            names = [e.name for e in examples]
            grids.append(make_grid(rows, names, columns, title=f"decoder · step {step} · held-out reconstructions"))
        grids.append(self._sample_grid(parts, step, note="" if examples else " (no held-out images to reconstruct)"))
        return _stack(grids)

    def _sample_grid(self, parts: Parts, step: int, note: str = "") -> Image.Image:
        """prompts x seeds through the stock pipeline, decoded once by the base and once by the tuned VAE."""
        from tuner.grid import make_grid
        from tuner.validation import (
            render,
            sampling_kwargs,
            sampling_mode,
            validation_pipeline,
            validation_prompt_list,
        )

        val = self.config.validation
        prompts, seeds = validation_prompt_list(self), list(val.seeds) or [0]
        kwargs = sampling_kwargs(self.config)
        from tuner.runtime import encoders_on

        modules = [parts.denoiser, parts.vae, *parts.text_encoders]
        with encoders_on(parts), sampling_mode(modules, parts.weight_dtype):
            pipe = validation_pipeline(parts, val.scheduler)
            if self._base_samples is None:  # base UNet + base decoder never change: render them once
                with self.base_vae(parts):
                    self._base_samples = render(pipe, prompts, seeds, **kwargs)
            tuned = render(pipe, prompts, seeds, **kwargs)
        images = [self._base_samples[i] + tuned[i] for i in range(len(prompts))]
        labels = [f"{name} VAE\nseed {s}" for name in ("base", "tuned") for s in seeds]
        title = f"decoder · step {step} · text-to-image, same seeds{note}"
        return make_grid(images, prompts, labels, title=title)

    # --- output ---------------------------------------------------------------------------------------------
    def save(self, parts: Parts, out_dir: Path) -> Artifact:
        """`vae/` (diffusers), the LDM single file and `metrics.json`; both weight files are reloaded and checked."""
        cfg, out_dir = self.method_config, Path(out_dir)
        parts.unwrapped(parts.vae).eval()
        exported = self._export_vae(parts)
        folder, single = out_dir / "vae", out_dir / cfg.single_file_name
        exported.save_pretrained(folder, safe_serialization=True)
        from tuner.public import public_base_model

        shared = self.config.public_dict()  # a file header travels: no local paths in it
        metadata = {
            "tuner_method": self.name,
            "tuner_base_model": public_base_model(
                self.config.model.pretrained_model_name_or_path, self.config.hub.base_model
            ),  # fmt: skip
            "tuner_config": json.dumps(shared, ensure_ascii=False),
        }
        save_single_file(exported, single, metadata)
        # Reference: the exported model (trained weights + the frozen parts exactly as stored), fp32 on the CPU.
        max_diff = check_round_trip(exported, folder, single, "cpu")

        metrics = self.evaluate(parts)
        (out_dir / "metrics.json").write_text(json.dumps(to_json(metrics), indent=2) + "\n", encoding="utf-8")
        print(format_comparison(metrics, "decoder evaluation"), flush=True)

        pipeline = f'DiffusionPipeline.from_pretrained("{parts.source}", vae=vae)'
        files = [
            ArtifactFile(
                "vae",
                "diffusers-autoencoderkl",
                f'vae = AutoencoderKL.from_pretrained("{folder}"); pipe = {pipeline}',
                ["diffusers"],
            ),
            ArtifactFile(
                single.name,
                "ldm-vae-safetensors",
                f'vae = AutoencoderKL.from_single_file("{single}", config="{folder}")',
                ["A1111 (models/VAE)", "ComfyUI (models/vae, Load VAE)", "diffusers"],
            ),
            ArtifactFile("metrics.json", "metrics-json", f'json.loads(open("{out_dir / "metrics.json"}").read())'),
        ]
        # What trained: the configured modules this VAE has (SD3 / FLUX.1 VAEs have no post_quant_conv).
        extra = {"trained": list(self.base_modules), "round_trip_max_difference": max_diff}
        extra["metrics"] = {k: v for k, v in to_json(metrics).items() if k != "per_image"}
        return self.artifact(parts, files, extra=extra)

    def _export_vae(self, parts: Parts):
        """The VAE to write: the base VAE as stored on disk (so the frozen encoder is bitwise the original,
        whatever precision training held it in) with the trained modules' fp32 weights put in."""
        from diffusers import AutoencoderKL

        vae = parts.unwrapped(parts.vae)
        model = self.config.model
        if self.method_config.train_whole_vae:
            return copy.deepcopy(vae).to("cpu", torch.float32)
        fp32 = {"torch_dtype": torch.float32}
        if model.vae:
            out = AutoencoderKL.from_pretrained(model.vae, **fp32)
        else:
            kw = {"subfolder": "vae", "revision": parts.revision, "variant": model.variant, **fp32}
            out = AutoencoderKL.from_pretrained(parts.source, **kw)
        for name in self.base_modules:
            getattr(out, name).load_state_dict(
                {k: v.float().cpu() for k, v in getattr(vae, name).state_dict().items()}
            )
        return out


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """`vae.decode` with the latents in the dtype of the first module that reads them."""
    first = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder.conv_in
    return vae.decode(latents.to(next(first.parameters()).dtype)).sample


def _to_pil(image: torch.Tensor) -> Image.Image:
    from PIL import Image

    array = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


def _stack(images: list[Image.Image]) -> Image.Image:
    """Grids one above the other on a white canvas."""
    from PIL import Image

    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), (255, 255, 255))
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height
    return canvas
