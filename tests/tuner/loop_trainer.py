"""A small real trainer for the loop's tests: trains the UNet's biases and norms with the shared diffusion loss.

Test hooks come from environment variables so a resumed run can drop them without changing its config:
`TUNER_TEST_KILL_AT_STEP=N` SIGKILLs the process as optimizer step N+1 starts (after checkpoint N),
`TUNER_TEST_NAN_AT_STEP=K` makes the loss of step K NaN, `TUNER_TEST_SIGINT_AT_STEP=N` sends SIGINT (Ctrl-C)
to itself as step N+1 starts, `TUNER_TEST_SLEEP_AT_STEP=N` sleeps there (a live run holding its lock), and
`TUNER_TEST_FILL_DISK_AT_STEP=N` fills the output folder's disk there, so the next checkpoint write runs out.
"""

from __future__ import annotations

import os
import signal
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors.torch import save_file

from trainers.lora import LoraTrainer
from tuner import registry
from tuner.config import MethodConfig
from tuner.losses import LossOptions, diffusion_loss
from tuner.trainer import Artifact, ArtifactFile, Trainables, Trainer

METHOD = "unet_bias"


class UNetBiasConfig(MethodConfig):
    train: Literal["bias", "attention"] = "bias"
    """`bias`: every bias and norm parameter of the UNet; `attention`: the first cross-attention block."""
    per_example_noise: bool = False
    """Draw each example's noise from its caption and the step, so any split of a batch sees the same noise."""
    loss_scale: bool = False
    """Also train a scalar that multiplies the loss: a parameter outside every module the loop wraps."""


class UNetBiasTrainer(Trainer):
    name = METHOD
    Config = UNetBiasConfig
    _interrupted = False

    def prepare(self, parts) -> Trainables:
        parts.denoiser.requires_grad_(False)
        if self.method_config.train == "bias":
            chosen = [p for n, p in parts.denoiser.named_parameters() if n.endswith("bias") or "norm" in n]
        else:
            chosen = list(parts.denoiser.down_blocks[0].attentions[0].parameters())
        for p in chosen:
            p.requires_grad_(True)
        groups = [{"name": "unet", "params": chosen}]
        if self.method_config.loss_scale:
            self.scale = torch.nn.Parameter(torch.ones((), device=parts.device))
            groups.append({"name": "loss_scale", "params": [self.scale], "lr": 1e-2})
        return Trainables({"unet": parts.denoiser}, groups)

    def compute_loss(self, parts, batch: dict[str, Any]) -> torch.Tensor:
        step = self.global_step + 1
        if os.environ.get("TUNER_TEST_KILL_AT_STEP") == str(self.global_step) and _this_rank_dies():
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("TUNER_TEST_SLEEP_AT_STEP") == str(self.global_step):
            time.sleep(120)  # a run that stays alive (holding its lock) until the test kills it
        if os.environ.get("TUNER_TEST_FILL_DISK_AT_STEP") == str(self.global_step):
            _fill_disk_but_one_checkpoint(Path(self.config.train.output_dir))
        if os.environ.get("TUNER_TEST_SIGINT_AT_STEP") == str(self.global_step) and not self._interrupted:
            self._interrupted = True
            os.kill(os.getpid(), signal.SIGINT)
        options = LossOptions.from_config(self.config)
        if self.method_config.per_example_noise:
            losses = []
            for i, caption in enumerate(batch["captions"]):
                seed = zlib.crc32(f"{caption}:{step}".encode())
                one = {k: v[i : i + 1] for k, v in batch.items() if k != "generator"}
                losses.append(diffusion_loss(parts, one, options, generator=torch.Generator().manual_seed(seed)))
            loss = torch.stack(losses).mean()
        else:
            loss = diffusion_loss(parts, batch, options, generator=batch.get("generator"))
        if self.method_config.loss_scale:
            loss = loss * self.scale
        if os.environ.get("TUNER_TEST_NAN_AT_STEP") == str(step):
            loss = loss * float("nan")
        return loss

    def save(self, parts, out_dir: Path) -> Artifact:
        unet = parts.unwrapped(parts.denoiser)
        tensors = {n: p.detach().cpu().contiguous() for n, p in unet.named_parameters() if p.requires_grad}
        if self.method_config.loss_scale:
            tensors["loss_scale"] = self.scale.detach().cpu().reshape(1)
        save_file(tensors, str(Path(out_dir) / "unet_trained.safetensors"))
        load = "safetensors.torch.load_file(path)"
        return Artifact(
            METHOD, parts.family.name, parts.source, [ArtifactFile("unet_trained.safetensors", "pt", load)]
        )

    def validation_images(self, parts, step: int) -> Image.Image:
        """One UNet prediction on fixed inputs, as a small gray image (cheap, and it changes as the UNet trains)."""
        unet = parts.unwrapped(parts.denoiser)
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(1, 4, 8, 8, generator=g)
        hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
        out = unet(sample.to(unet.dtype), 10, encoder_hidden_states=hidden.to(unet.dtype)).sample[0, 0]
        pixels = ((out.float().clamp(-2, 2) + 2) * 63).to(torch.uint8).cpu().numpy()
        return Image.fromarray(pixels).resize((32, 32))


def _fill_disk_but_one_checkpoint(run_dir: Path) -> None:
    """Fill the run's disk so that the room check before the next checkpoint still passes (the newest one's file
    bytes, plus a page, stay free) but the write itself runs out: files take whole pages on disk."""
    from tuner.checkpoint import list_checkpoints
    from tuner.storage import free_bytes, tree_bytes

    leave = tree_bytes(list_checkpoints(run_dir)[-1]) + 4096 + 256
    with open(run_dir.parent / "filler", "wb") as fh:
        fh.write(b"\0" * (free_bytes(run_dir) - leave))


def _this_rank_dies() -> bool:
    """`TUNER_TEST_KILL_RANK=r` limits the kill to process r of a multi-process run (default: every process)."""
    chosen = os.environ.get("TUNER_TEST_KILL_RANK")
    return chosen is None or chosen == os.environ.get("RANK", "0")


class HookedLoraTrainer(LoraTrainer):
    """The real LoRA trainer with the kill hook, for exact-resume and DDP tests on every family.

    `TUNER_TEST_PER_EXAMPLE_NOISE=1` draws each example's noise from its caption and the step (as the test
    trainer above), so a batch split over two processes sees the noise one process would.
    """

    name = "lora_hooked"

    def compute_loss(self, parts, batch: dict[str, Any]) -> torch.Tensor:
        if os.environ.get("TUNER_TEST_KILL_AT_STEP") == str(self.global_step):
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("TUNER_TEST_PER_EXAMPLE_NOISE") != "1":
            return super().compute_loss(parts, batch)

        def example(value: Any, i: int) -> Any:
            if torch.is_tensor(value) and value.ndim:
                return value[i : i + 1]
            if isinstance(value, list) and value and torch.is_tensor(value[0]):
                return [v[i : i + 1] for v in value]  # input_ids: one tensor per tokenizer
            return value[i : i + 1] if isinstance(value, list) else value

        losses = []
        for i, caption in enumerate(batch["captions"]):
            seed = zlib.crc32(f"{caption}:{self.global_step}".encode())
            one = {k: example(v, i) for k, v in batch.items() if k != "generator"}
            losses.append(super().compute_loss(parts, {**one, "generator": torch.Generator().manual_seed(seed)}))
        return torch.stack(losses).mean()


def register() -> None:
    registry.register(METHOD, UNetBiasTrainer)
    registry.register(HookedLoraTrainer.name, HookedLoraTrainer)
