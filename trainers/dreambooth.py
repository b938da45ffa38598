"""DreamBooth: personalize a model from a handful of photos by fine-tuning the denoiser (or a LoRA on it).

Without an instance prompt it is plain full fine-tuning on captioned images (how the micro base model trains).

Prior preservation comes from the shared data pipeline: each batch holds instance examples and class
examples (`is_prior`), whose loss is weighted by `data.prior_loss_weight`. The class targets are either
class images generated once by the base pipeline, or, image-free, the frozen base denoiser's own prediction
on the class prompt. The text encoder(s) can train throughout or only for the first N steps; the denoiser
whole or only the blocks `train_blocks` names (the rest stays bitwise the base).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from tuner.conditioning import encode_tokens
from tuner.config import MethodConfig
from tuner.errors import ConfigError, TunerError
from tuner.losses import LossOptions, diffusion_loss
from tuner.models import Parts
from tuner.trainer import Artifact, ArtifactFile, Trainables, Trainer

log = logging.getLogger(__name__)

# Identifiers that are ordinary words carry a prior of their own; DreamBooth wants a rare token.
COMMON_WORDS = frozenset(
    """a an the of in on at to and or with for by from photo picture image dog cat man woman person toy car house
    red green blue yellow white black orange purple pink gray brown big small star circle square triangle heart
    cross style painting drawing art cute beautiful old new one two three""".split()
)
CONTEXTS = ("{} on a blue background", "{} on a white background", "a painting of {}")


class DreamBoothConfig(MethodConfig):
    train_text_encoder: bool = False
    """Also fine-tune the text encoder(s) (better likeness, more drift)."""
    text_encoder_steps: int | None = Field(None, ge=1)
    """Train the text encoder(s) only for the first N steps (none: throughout, when enabled)."""
    lora: bool = False
    """Train a LoRA instead of the full UNet (DreamBooth-LoRA); `[lora]`-style settings below apply."""
    rank: int = Field(16, ge=1)
    """LoRA rank (with `lora = true`)."""
    alpha: float | None = None
    """LoRA alpha (default: the rank)."""
    save_format: Literal["pipeline", "unet", "transformer", "single_file", "both"] = "pipeline"
    """Full fine-tune output: a whole pipeline folder; only the denoiser's folder (`unet` or `transformer`, the
    same choice: the folder takes the model's own component name; smaller, load it into the base); one
    `.safetensors` checkpoint in the original LDM/SGM key names, with VAE and text encoders (loads in A1111,
    Forge, ComfyUI and diffusers' `from_single_file`; SD1/SD2/SDXL); or `both` (pipeline folder and single file)."""
    train_blocks: Literal["all"] | list[int | str] = "all"
    """Full fine-tune: which denoiser blocks train. `"all"`, or a list of block indices (the family's block lists
    numbered one after another: SD3 `transformer_blocks`; FLUX.1 its double-stream `transformer_blocks`, then
    the single-stream ones) and parameter-name patterns (`"transformer_blocks.1.*"`, `"*.attn.*"`). With a
    selection the other blocks stay in the weight dtype (less memory), and the saved denoiser is in it too."""
    single_file_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Precision of the tensors in the single-file checkpoint (fp16 is what UIs expect; bf16 keeps the range)."""
    validation_contexts: list[str] = list(CONTEXTS)
    """Prompts that put the subject in new contexts; `{}` is the instance phrase (e.g. "sks dog")."""


def identifier_of(instance_prompt: str, class_prompt: str | None, token: str | None) -> str | None:
    """The rare identifier: `data.token`, else the word of the instance prompt that the class prompt lacks."""
    if token:
        return token
    class_words = set((class_prompt or "").lower().split())
    extra = [w for w in instance_prompt.lower().split() if w not in class_words]
    return extra[0] if class_prompt and len(extra) == 1 else None


def check_identifier(parts: Parts, identifier: str) -> list[str]:
    """Warnings for an identifier that is a common word or that the tokenizer splits into many pieces."""
    warnings = []
    if identifier.lower() in COMMON_WORDS:
        warnings.append(f"identifier {identifier!r} is a common word; its existing meaning will leak in")
    for tokenizer in parts.tokenizers:
        pieces = tokenizer.tokenize(identifier)
        if len(pieces) > 2:
            warnings.append(
                f"identifier {identifier!r} splits into {len(pieces)} tokens {pieces}; a rare single-token "
                "identifier (such as 'sks') learns faster and interferes less"
            )
            break
    return warnings


class DreamBoothTrainer(Trainer):
    name = "dreambooth"
    Config = DreamBoothConfig
    data_kinds = frozenset({"dreambooth", "captioned"})

    def __init__(self, config):
        super().__init__(config)
        if config.data.with_prior_preservation and not config.data.class_prompt:
            raise ConfigError('data.class_prompt: prior preservation needs one, e.g. "a photo of dog"')
        if self.method_config.lora and self.method_config.train_blocks != "all":
            raise ConfigError(
                f"dreambooth.train_blocks = {self.method_config.train_blocks!r} picks full-weight blocks; with "
                "lora = true set the LoRA's targets instead (method = 'lora', lora.unet_target_modules)"
            )
        self.loss_options = LossOptions.from_config(config)
        self.frozen_unet = None
        self.adapter = None  # the LoRA trainer, for DreamBooth-LoRA

    @property
    def _te_trains(self) -> bool:
        return self.method_config.train_text_encoder

    # --- contract -------------------------------------------------------------------------------------
    def capability(self) -> str:
        return "dreambooth-lora" if self.method_config.lora else "dreambooth"

    def prepare(self, parts: Parts) -> Trainables:
        cfg, data = self.method_config, self.config.data
        identifier = self._identifier()
        for warning in check_identifier(parts, identifier) if identifier else []:
            log.warning("warning: %s", warning)
        if cfg.lora:  # DreamBooth-LoRA is the LoRA trainer's own path, with this table's rank and alpha
            self.adapter = self._lora_trainer()
            return self.adapter.prepare(parts)
        if data.with_prior_preservation and data.prior_mode == "model":
            # Image-free prior: the frozen base denoiser's prediction on the class prompt is the class target.
            self.frozen_unet = copy.deepcopy(parts.denoiser).requires_grad_(False).eval()
        lr = self.config.optimizer.learning_rate
        te_lr = self.config.optimizer.text_encoder_lr or lr
        self._check_save_format(parts)
        if cfg.train_blocks == "all":
            parts.denoiser.to(torch.float32)  # saved in fp32, as trained
        # else only what trains becomes fp32 (the loop's `apply_precision`): frozen blocks keep the weight dtype.
        chosen = selected_parameters(parts.denoiser, parts.family.block_lists, cfg.train_blocks)
        parts.denoiser.requires_grad_(False)
        for _, param in chosen:
            param.requires_grad_(True)
        trained = [p for p in parts.denoiser.parameters() if p.requires_grad]
        groups = [{"name": "denoiser", "params": trained, "lr": lr}]
        modules: dict[str, Any] = {"denoiser": parts.denoiser}
        if self._te_trains:
            # Trained text encoders go to accelerate too, so DDP syncs them like the denoiser.
            modules.update(parts.text_encoder_modules(adaptable_only=True))
            for name, encoder in parts.text_encoder_modules(adaptable_only=True).items():
                encoder.requires_grad_(True)
                encoder.to(torch.float32)
                groups.append({"name": name, "params": list(encoder.parameters()), "lr": te_lr})
        needs = {"latents", "input_ids" if self._te_trains else "text_embeds"}
        return Trainables(modules=modules, param_groups=groups, needs=frozenset(needs))

    def compute_loss(self, parts: Parts, batch: dict[str, Any]) -> torch.Tensor:
        limit = self.method_config.text_encoder_steps
        if self._te_trains and limit is not None and self.global_step >= limit and "input_ids" in batch:
            # Text encoders are done: condition without their graph (their grads stay None, so no update).
            with torch.no_grad():
                embeds, pooled = encode_tokens(parts, batch["input_ids"])
            batch = {**batch, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.adapter is not None:
            self.adapter.global_step = self.global_step
            return self.adapter.compute_loss(parts, batch)
        prior_target = functools.partial(self._frozen_prediction, parts) if self.frozen_unet is not None else None
        return diffusion_loss(parts, batch, self.loss_options, batch.get("generator"), prior_target=prior_target)

    def _frozen_prediction(self, parts: Parts, noisy, timesteps, cond: dict[str, Any]) -> torch.Tensor:
        frozen = self.frozen_unet
        if frozen.device != noisy.device:
            frozen.to(noisy.device)
        return parts.family.predict(parts, frozen, noisy, timesteps, cond)

    def save(self, parts: Parts, out_dir: Path) -> Artifact:
        if self.adapter is not None:
            self.adapter.global_step = self.global_step
            artifact = self.adapter.save(parts, out_dir)
            artifact.method, artifact.trigger = self.name, self._identifier() or artifact.trigger
            artifact.extra["lora"] = True
            return artifact
        import diffusers

        from tuner import single_file

        family = parts.family
        denoiser = parts.unwrapped(parts.denoiser)
        if self.method_config.train_blocks != "all":  # one dtype in the files: the frozen blocks' (the base's)
            with torch.no_grad():
                for param in denoiser.parameters():
                    param.data = param.data.to(parts.weight_dtype)
        component, cls = family.denoiser_component, family.denoiser_class
        base = self.config.model.pretrained_model_name_or_path
        save_format = self.method_config.save_format
        files = []
        if save_format in ("unet", "transformer"):
            target = out_dir / component
            denoiser.save_pretrained(target, safe_serialization=True)
            _check_same_denoiser(denoiser, getattr(diffusers, cls).from_pretrained(target))
            base_pipe = f'DiffusionPipeline.from_pretrained("{base}", {component}={component})'
            if single_file.is_single_file(base):  # a single-file base loads as one, configured by its family
                cls_name, config = single_file.PIPELINE_CLASS[family.name], single_file.TOKENIZER_HINT[family.name]
                base_pipe = f'{cls_name}.from_single_file("{base}", config="{config}", {component}={component})'
            load = f'{component} = {cls}.from_pretrained("{target}"); pipe = {base_pipe}'
            files.append(ArtifactFile(str(target.relative_to(out_dir)), f"diffusers-{component}", load, ["diffusers"]))
        if save_format in ("pipeline", "both"):
            target = out_dir / "pipeline"
            parts.pipeline().save_pretrained(target, safe_serialization=True)
            _check_same_denoiser(denoiser, getattr(diffusers.DiffusionPipeline.from_pretrained(target), component))
            load = f'pipe = DiffusionPipeline.from_pretrained("{target}")'
            files.append(ArtifactFile(str(target.relative_to(out_dir)), "diffusers-pipeline", load, ["diffusers"]))
        if save_format in ("single_file", "both"):
            files.append(self._save_single_file(parts, out_dir))
        return self.artifact(parts, files, self._identifier())

    def _check_save_format(self, parts: Parts) -> None:
        """Refuse, before training, an output this family has no writer for (single files: the UNet families)."""
        from tuner import single_file

        save_format = self.method_config.save_format
        if save_format in ("single_file", "both") and parts.family.name not in single_file.PIPELINE_CLASS:
            raise ConfigError(
                f"dreambooth.save_format = {save_format!r}: no single-file checkpoint writer for "
                f"{parts.family.name} ({parts.family.pipeline_class}); use 'pipeline' or "
                f"'{parts.family.denoiser_component}'"
            )

    def _save_single_file(self, parts: Parts, out_dir: Path) -> ArtifactFile:
        """One A1111/Forge/ComfyUI checkpoint (LDM/SGM names, VAE and text encoders included), checked by
        loading it back through diffusers' `from_single_file` and comparing the UNet's output."""
        import re

        from tuner import single_file
        from tuner.export import ldm_checkpoint
        from tuner.export.metadata import architecture, modelspec

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            self.method_config.single_file_dtype
        ]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(out_dir).resolve().name).strip("._") or "dreambooth"
        target = out_dir / f"{name}.safetensors"
        spec = modelspec(
            parts.family, parts.prediction_type, name, self.config.data.resolution, self._identifier(), adapter="x"
        )
        spec["modelspec.architecture"] = architecture(parts.family, parts.prediction_type, "x").rsplit("/", 1)[0]
        ldm_checkpoint.save_checkpoint(parts, target, dtype, spec)
        ldm_checkpoint.check_checkpoint(parts.unwrapped(parts.denoiser), target, dtype)
        pipeline_class = single_file.PIPELINE_CLASS[parts.family.name]
        # `config`: the base's own folder or hub id (for a single-file base, the family's standard hub repo).
        base = self.config.model.pretrained_model_name_or_path
        config = single_file.TOKENIZER_HINT[parts.family.name] if single_file.is_single_file(base) else base
        config = parts.source if base.startswith("builtin:") else config
        load = f'pipe = {pipeline_class}.from_single_file("{target}", config="{config}")'
        tools = ["A1111", "Forge", "ComfyUI", "diffusers"]
        return ArtifactFile(str(target.relative_to(out_dir)), "ldm-checkpoint", load, tools)

    def validation_prompts(self) -> list[str]:
        data = self.config.data
        if not data.instance_prompt:  # captioned fine-tuning (no subject): the default prompts
            return super().validation_prompts()
        instance = data.instance_prompt
        phrase = instance
        for lead in ("a photo of ", "a picture of ", "an image of "):
            phrase = phrase.removeprefix(lead)
        prompts = [instance, *(c.format(phrase) for c in self.method_config.validation_contexts)]
        return prompts + ([data.class_prompt] if data.class_prompt else [])

    # --- DreamBooth-LoRA -------------------------------------------------------------------------------
    def _lora_trainer(self):
        """The LoRA trainer on this run, its `[lora]` table made from `[dreambooth]`'s rank and alpha: one
        DreamBooth-LoRA code path whether a run says `method = "lora"` with prior preservation or `lora = true`."""
        from trainers.lora import LoraConfig, LoraTrainer

        cfg = self.method_config
        settings = LoraConfig(rank=cfg.rank, alpha=cfg.alpha or cfg.rank, train_text_encoder=self._te_trains)
        trainer = LoraTrainer(self.config, settings)
        trainer.global_step = self.global_step
        return trainer

    def set_adapter_scale(self, parts: Parts, scale: float) -> bool:
        return self.adapter.set_adapter_scale(parts, scale) if self.adapter is not None else False

    def _identifier(self) -> str | None:
        data = self.config.data
        return identifier_of(data.instance_prompt or "", data.class_prompt, data.token)


def selected_parameters(
    model: torch.nn.Module, block_lists: tuple[str, ...], selection: str | list[int | str]
) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs `dreambooth.train_blocks` picks: all, or the blocks given by index (the family's
    block lists numbered one after another) or by parameter-name pattern; a pick that matches nothing is refused."""
    named = list(model.named_parameters())
    if selection == "all":
        return named
    blocks = [f"{name}.{i}" for name in block_lists for i in range(len(getattr(model, name, ())))]
    patterns = []
    for item in selection:
        if isinstance(item, int):
            if not 0 <= item < len(blocks):
                known = f"0..{len(blocks) - 1} ({', '.join(block_lists)})" if blocks else "none on this denoiser"
                raise ConfigError(f"dreambooth.train_blocks: block index {item} does not exist; indices: {known}")
            patterns.append(f"{blocks[item]}.*")
        else:
            patterns.append(item)
    chosen = []
    for pattern in patterns:
        hits = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(
                f"dreambooth.train_blocks: {pattern!r} matches no parameter of the denoiser; parameter names look "
                f"like {named[0][0]!r}; blocks: {', '.join(blocks[:3]) or '-'}..."
            )
        chosen += hits
    return list({n: (n, p) for n, p in chosen}.values())


def _check_same_denoiser(trained: torch.nn.Module, reloaded: torch.nn.Module) -> None:
    """The saved denoiser must reproduce the trained one exactly (a broken save fails the run, not the user)."""
    trained_state = trained.state_dict()
    worst = 0.0
    for key, value in reloaded.state_dict().items():
        worst = max(worst, (value.float() - trained_state[key].float()).abs().max().item())
    if worst > 0:
        raise TunerError(f"saved denoiser does not match the trained one (max difference {worst:.3g})")
