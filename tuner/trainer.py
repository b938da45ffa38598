"""The trainer contract: the few methods the shared loop calls, and the small records they exchange.

A trainer holds the *semantics* of a method (what trains, the loss, the artifact). Everything mechanical
(devices, precision, accumulation, checkpoints, logging) lives in `tuner.loop` and never branches on the
method. Subclasses set `name`, `Config` and `data_kinds`, then implement `prepare`, `compute_loss`, `save`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

    from tuner.config import MethodConfig, RunConfig
    from tuner.models import Parts


@dataclass
class Trainables:
    """What `prepare` hands to the loop.

    `modules` are the modules that hold trainable parameters, keyed by the `Parts` attribute they live in
    (the loop wraps them with accelerate and puts the wrapped module back on `parts` during training).
    `param_groups` are torch optimizer groups; each carries a `name` and may carry its own `lr`.
    `needs` tells the data pipeline what a batch must carry: any of `latents` (cached VAE latents are
    fine), `pixels` (decoded-space targets), `text_embeds` (cached prompt embeddings are fine) or
    `input_ids` (the text encoders run in the step, e.g. because they train).
    """

    modules: dict[str, nn.Module]
    param_groups: list[dict[str, Any]]
    needs: frozenset[str] = frozenset({"latents", "text_embeds"})

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]


@dataclass
class ArtifactFile:
    """One file or folder a trainer wrote, its format, and the line of Python that loads it."""

    path: str
    format: str
    load: str
    tools: list[str] = field(default_factory=list)


@dataclass
class Artifact:
    """What `save` wrote. Serialized as `artifact.json` in the output folder; read by the hub and the CLI."""

    method: str
    family: str
    base_model: str
    files: list[ArtifactFile]
    trigger: str | None = None
    instance_prompt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> Path:
        """Write `artifact.json`, and give every listed file the user's normal mode (some writers, such as
        safetensors' atomic save, leave 0600, which a ComfyUI or web server running as another user cannot read)."""
        from tuner.public import normal_mode

        path = Path(out_dir) / "artifact.json"
        tmp = path.with_name(".artifact.json.tmp")  # written last and whole: its presence means a finished run
        tmp.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        normal_mode(*(Path(out_dir) / f.path for f in self.files if not Path(f.path).is_absolute()), path)
        return path

    @classmethod
    def read(cls, out_dir: str | Path) -> Artifact:
        data = json.loads((Path(out_dir) / "artifact.json").read_text(encoding="utf-8"))
        data["files"] = [ArtifactFile(**f) for f in data["files"]]
        return cls(**data)


class Trainer:
    """Base class of the four methods. The loop calls these methods and nothing else."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    data_kinds: ClassVar[frozenset[str]] = frozenset({"captioned"})

    def __init__(self, config: RunConfig):
        self.config = config
        # The optimizer step about to run (0-based); the loop sets it before every step, resumes included,
        # so phased methods (text encoder for the first N steps, pivotal tuning) need no counter of their own.
        self.global_step = 0

    @property
    def method_config(self) -> MethodConfig:
        return getattr(self.config, self.name)

    # --- required -------------------------------------------------------------------------------------
    def prepare(self, parts: Parts) -> Trainables:
        """Freeze everything, then unfreeze or inject what this method trains."""
        raise NotImplementedError

    def compute_loss(self, parts: Parts, batch: dict[str, Any]) -> torch.Tensor:
        """The scalar loss of one micro-batch."""
        raise NotImplementedError

    def save(self, parts: Parts, out_dir: Path) -> Artifact:
        """Write every output format into `out_dir`, check each loads back, and describe them."""
        raise NotImplementedError

    def artifact(
        self, parts: Parts, files: list[ArtifactFile], trigger: str | None = None, extra: dict[str, Any] | None = None
    ) -> Artifact:
        """The record `save` returns: this method, the base model and its family, and what was written."""
        return Artifact(
            method=self.name,
            family=parts.family.name,
            base_model=self.config.model.pretrained_model_name_or_path,
            files=files,
            trigger=trigger,
            instance_prompt=self.config.data.instance_prompt,
            extra=extra or {},
        )

    # --- optional -------------------------------------------------------------------------------------
    def capability(self) -> str:
        """What this run asks of the model family (`Family.methods`): the method name unless a setting makes
        it another capability (DreamBooth with `lora = true` is `dreambooth-lora`)."""
        return self.name

    def load(self, parts: Parts, directory: Path) -> None:
        """Restore trainer-owned state that is not a trainable parameter (the loop restores parameters)."""

    def after_optimizer_step(self, parts: Parts) -> None:
        """Called after every optimizer step (textual inversion restores frozen embedding rows here)."""

    def set_adapter_scale(self, parts: Parts, scale: float) -> bool:
        """Scale what was trained (0 = base model, 1 = as trained) for validation grids.

        Return False when the method cannot scale; grids then show only base (rendered before the first
        step) and tuned columns.
        """
        return False

    def validation_prompts(self) -> list[str]:
        """Prompts used when `[validation] prompts` is empty (methods override with their own): the instance prompt
        (else what the caption template says without a caption, `{token}` expanded) and the class prompt."""
        data = self.config.data
        template = data.caption_template.replace("{token}", data.token or "").replace("{caption}", "")
        prompt = data.instance_prompt or " ".join(template.split()).strip(" ,;:")
        return [p for p in [prompt, data.class_prompt] if p]

    def validation_images(self, parts: Parts, step: int) -> Image.Image | None:
        """A grid showing progress; the default renders prompts through the stock diffusers pipeline."""
        from tuner.validation import render_validation_grid

        return render_validation_grid(self, parts, step)
