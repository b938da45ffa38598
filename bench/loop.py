"""What the shared loop costs: its step time against a bare forward + backward + optimizer step of the same
UNet on the same batch, its peak memory, and the optimizer-state bytes of AdamW vs AdamW8bit.

Run from the repository root: `python bench/loop.py [--steps 30] [--warmup 5] [--resolution 128] [--threads 1]`.
It writes a small SD-shaped pipeline (SD's UNet topology at a fraction of its width, so most weight tensors
exceed bitsandbytes' 4096-element `min_8bit_size` as in a real UNet) and captioned images to a temporary
folder, runs `tuner.loop.train` once to warm the data caches, then times a second run of a trainer that
trains the whole UNet. The bare step runs afterwards in the same process on the first batch that run saw.
Writes bench/results/loop.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tuner import registry  # noqa: E402
from tuner.config import MethodConfig, RunConfig  # noqa: E402
from tuner.losses import LossOptions, diffusion_loss  # noqa: E402
from tuner.trainer import Artifact, Trainables, Trainer  # noqa: E402

METHOD = "bench_full_unet"


class FullUNetConfig(MethodConfig):
    """No options: the whole UNet trains."""


class FullUNetTrainer(Trainer):
    """Trains every UNet weight with the shared loss; records when each step starts and keeps its first batch."""

    name = METHOD
    Config = FullUNetConfig
    starts: list[tuple[float, float]] = []
    first_batch: dict | None = None

    def prepare(self, parts) -> Trainables:
        parts.denoiser.requires_grad_(True)
        return Trainables({"unet": parts.denoiser}, [{"name": "unet", "params": list(parts.denoiser.parameters())}])

    def compute_loss(self, parts, batch):
        FullUNetTrainer.starts.append(_now())
        if FullUNetTrainer.first_batch is None:
            FullUNetTrainer.first_batch = {k: v for k, v in batch.items() if k != "generator"}
        options = LossOptions.from_config(self.config)
        return diffusion_loss(parts, batch, options, generator=batch.get("generator"))

    def save(self, parts, out_dir: Path) -> Artifact:
        return Artifact(METHOD, parts.family.name, parts.source, [])

    def validation_images(self, parts, step: int):
        return None


def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): on a shared machine the CPU time shows the work, not the waiting."""
    return time.perf_counter(), time.process_time()


def _durations(starts: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    wall = [b[0] - a[0] for a, b in zip(starts, starts[1:])]
    cpu = [b[1] - a[1] for a, b in zip(starts, starts[1:])]
    return wall, cpu


def make_model(folder: Path) -> Path:
    """SD1's UNet topology (3 cross-attention down blocks + 1 plain, 2 layers each) at 1/10 of its width."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from tuner.tiny import tiny_text_encoder, tiny_vae
    from tuner.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(len(tokenizer), hidden=64),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012, skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_images(folder: Path, count: int, resolution: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")


def config(model: Path, images: Path, out: Path, steps: int, args) -> RunConfig:
    return RunConfig.for_method(METHOD).model_validate(
        {
            "method": METHOD,
            "model": {"pretrained_model_name_or_path": str(model)},
            "data": {"path": str(images), "resolution": args.resolution, "enable_bucket": False},
            "optimizer": {"name": "adamw8bit", "learning_rate": 1e-5},
            "train": {
                "output_dir": str(out),
                "max_train_steps": steps,
                "train_batch_size": args.batch,
                "checkpointing_steps": steps + 1,
                "report_to": "tensorboard",
            },
            "validation": {"enabled": False},
        }
    )


def bare_steps(model: Path, cfg: RunConfig, batch: dict, count: int) -> tuple[list[tuple[float, float]], dict]:
    """The same UNet, loss, optimizer and batch with nothing around them; then optimizer-state bytes."""
    from tuner.models import load_parts
    from tuner.optim import build_optimizer, optimizer_state_bytes

    parts = load_parts(str(model))
    parts.denoiser.requires_grad_(True)
    groups = [{"name": "unet", "params": list(parts.denoiser.parameters())}]
    optimizer = build_optimizer(cfg.optimizer, groups)
    generator = torch.Generator().manual_seed(0)
    options = LossOptions.from_config(cfg)
    starts = []
    for _ in range(count + 1):
        starts.append(_now())
        loss = diffusion_loss(parts, {**batch, "generator": generator}, options, generator=generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sizes = {}
    for name in ("adamw", "adamw8bit"):
        other = build_optimizer(cfg.optimizer.model_copy(update={"name": name}), groups)
        for p in groups[0]["params"]:
            p.grad = torch.zeros_like(p)
        other.step()
        sizes[name] = optimizer_state_bytes(other)
    return starts, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps of each phase")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    registry.register(METHOD, FullUNetTrainer)
    from tuner.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model")
        make_images(tmp / "images", args.images, args.resolution)
        train(config(model, tmp / "images", tmp / "warm", 2, args))  # fills the latent / text caches
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        batch, steps = FullUNetTrainer.first_batch, args.warmup + args.steps
        cfg = config(model, tmp / "images", tmp / "timed", steps + 1, args)
        before, _ = bare_steps(model, cfg, batch, steps)  # bare runs before and after the loop: no order bias
        FullUNetTrainer.starts = []
        train(cfg)
        loop_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        loop_wall, loop_cpu = (d[args.warmup :] for d in _durations(FullUNetTrainer.starts))
        after, sizes = bare_steps(model, cfg, batch, steps)
        bare_wall, bare_cpu = (
            [*a[args.warmup :], *b[args.warmup :]] for a, b in zip(_durations(before), _durations(after))
        )
        unet_params, big = _unet_sizes(model)

    med = statistics.median
    rows = [
        ("loop step, median wall (s)", f"{med(loop_wall):.4f}"),
        ("bare forward+backward+optimizer step, median wall (s)", f"{med(bare_wall):.4f}"),
        ("loop efficiency, wall (bare / loop), target >= 0.9", f"{med(bare_wall) / med(loop_wall):.3f}"),
        ("loop step, median CPU time (s)", f"{med(loop_cpu):.4f}"),
        ("bare step, median CPU time (s)", f"{med(bare_cpu):.4f}"),
        ("loop efficiency, CPU time (bare / loop), target >= 0.9", f"{med(bare_cpu) / med(loop_cpu):.3f}"),
        ("peak RSS of the process after the timed loop run (MiB)", f"{loop_rss / 2**20:.0f}"),
        ("optimizer state AdamW (MiB)", f"{sizes['adamw'] / 2**20:.2f}"),
        ("optimizer state AdamW8bit (MiB)", f"{sizes['adamw8bit'] / 2**20:.2f}"),
        ("AdamW / AdamW8bit state, target >= 3.5", f"{sizes['adamw'] / sizes['adamw8bit']:.2f}"),
    ]
    for name, value in rows:
        print(f"{name:<52} {value}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python bench/loop.py " + " ".join(sys.argv[1:])
    text = [
        "# Training loop: step overhead, memory, 8-bit optimizer state",
        "",
        f"Produced by `{command.strip()}` ({platform.machine()} CPU x{os.cpu_count()}, torch threads "
        f"{torch.get_num_threads()}, load average {load} at the end, Python {platform.python_version()}, "
        f"torch {torch.__version__}).",
        "",
        f"Model: SD1 UNet topology at 1/10 width, {unet_params / 1e6:.1f}M parameters, "
        f"{big:.1%} of them in tensors of >= 4096 elements (bitsandbytes keeps smaller ones in 32-bit); "
        f"whole UNet trained, AdamW8bit, batch {args.batch} at {args.resolution}px, latents and text "
        f"embeddings from a warm cache; {args.steps} timed steps after {args.warmup} warm-up steps (bare: "
        "twice, before and after the loop run).",
        "",
        "| measurement | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        "The loop step is measured from one `compute_loss` call to the next, so it includes everything the",
        "loop does per step: reading the batch from the cache, moving it, autocast and accumulation contexts,",
        "gradient-norm clipping (also the NaN/inf guard's input), the one all-reduce of loss and stop flag,",
        "the optimizer and schedule steps, the progress bar and tensorboard logging. The bare step is",
        "`diffusion_loss` + `backward` + `optimizer.step` + `zero_grad` on one batch held in memory.",
        "On a shared CPU the wall-clock times vary with the other processes' load (shown above); with one",
        "torch thread the CPU-time ratio measures the work each step does and is the figure to read there.",
    ]
    out = ROOT / "bench" / "results" / "loop.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")


def _unet_sizes(model: Path) -> tuple[int, float]:
    """Parameter count, and the share of it in tensors big enough for 8-bit optimizer state."""
    from diffusers import UNet2DConditionModel

    params = list(UNet2DConditionModel.from_pretrained(model, subfolder="unet").parameters())
    total = sum(p.numel() for p in params)
    return total, sum(p.numel() for p in params if p.numel() >= 4096) / total


if __name__ == "__main__":
    main()
