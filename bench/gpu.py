"""GPU training figures per family x method x memory tier, from full-size random-init models built in code.

`bench/gpu.sh [--tiny] [--out FILE] [--peer PATH/train_dreambooth_lora.py] [--only sd1,sdxl,flux]`

For SD1.5's UNet, SDXL's UNet and FLUX.1-dev's transformer (`bench/shapes.py`, no downloads) and for LoRA
and full fine-tuning (the suite's own `lora` and `dreambooth` trainers, `prepare` + `compute_loss`), each in
the memory tiers below, it times optimizer steps on cached-shaped batches (random latents and text
embeddings, as a cached run reads them) and reports s/step, images/s, peak GPU memory and model FLOPs
utilization: FLOPs of one forward + backward counted by `torch.utils.flop_counter`, over the card's dense
bf16 peak. A configuration whose weights, gradients and optimizer state cannot fit is skipped with its
estimate. With `--peer`, SD1.5 LoRA also runs side by side with diffusers' example script through
`bench/vs_diffusers.py` (both whole processes, same model folder). `--tiny` runs all of it on tiny shapes
(the test suite does, on the CPU). Writes bench/results/gpu.md (or `--out`) with the machine's name.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import shapes  # noqa: E402
from tuner.errors import TunerError  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of `torch.cuda.get_device_name()`.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
               "L40": 181.0, "A10G": 125.0, "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
               "V100": 125.0, "T4": 65.0}  # fmt: skip

TIERS = {
    "fast": "AdamW, no gradient checkpointing",
    "low": "AdamW8bit, gradient checkpointing (full: + fused backward)",
}


@dataclass
class Case:
    family: str
    method: str
    tier: str
    batch: int
    resolution: int


@dataclass
class Shape:
    """One family's benchmark shape: its denoiser, VAE config, text-embedding shapes and batch."""

    family: str
    build: object
    latent_channels: int
    vae: dict
    text: tuple[int, int]
    pooled: int | None
    batch: int
    resolution: int


def family_shapes(tiny: bool) -> dict[str, Shape]:
    if tiny:
        w, res = 0.01, 64  # the narrowest channels (32; SDXL 64), one layer per block
        return {
            "sd1": Shape("sd1", lambda: shapes.sd15_unet(w, 1), 4, {}, (77, shapes._channels(768, w)), None, 2, res),
            "sdxl": Shape("sdxl", lambda: shapes.sdxl_unet(w, (1, 1, 1), 1), 4, {"scaling_factor": 0.13025},
                          (77, shapes._channels(2048, w)), shapes._channels(1280, w), 2, res),
            "flux": Shape("flux", lambda: shapes.flux_transformer(0.05, 1, 1), 16, _FLUX_VAE,
                          (32, shapes._channels(4096, 0.05)), shapes._channels(768, 0.05), 1, res),
        }  # fmt: skip
    return {
        "sd1": Shape("sd1", shapes.sd15_unet, 4, {}, (77, 768), None, 4, 512),
        "sdxl": Shape("sdxl", shapes.sdxl_unet, 4, {"scaling_factor": 0.13025}, (77, 2048), 1280, 2, 1024),
        "flux": Shape("flux", shapes.flux_transformer, 16, _FLUX_VAE, (512, 4096), 768, 1, 1024),
    }


_FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}


def run_config(method: str, tier: str, device: torch.device, out: Path):
    from tuner.config import RunConfig

    low = tier == "low"
    full = method == "dreambooth"
    table = {"lora": {"rank": 16, "unet_target_modules": "attn"}} if method == "lora" else {}
    return RunConfig.for_method(method).model_validate({
        "method": method,
        "model": {"pretrained_model_name_or_path": "bench"},
        "data": {"path": str(out)},
        **table,
        "optimizer": {"name": "adamw8bit" if low else "adamw", "learning_rate": 1e-5 if full else 1e-4,
                      "fused_backward": low and full, "max_grad_norm": None if (low and full) else 1.0},
        "train": {"output_dir": str(out), "mixed_precision": _precision(device), "gradient_checkpointing": low,
                  "report_to": "none"},
        "validation": {"enabled": False},
    })  # fmt: skip


def make_parts(shape: Shape, device: torch.device):
    """Parts as the loop has them once the caches are full: the denoiser on the device; a VAE whose config
    scales latents (its small weights are never run); no text encoders (embeddings come from the batch)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from tuner.families import FAMILIES
    from tuner.families.transformers import variant_of
    from tuner.models import Parts

    default = torch.get_default_dtype()
    try:  # built in its training dtype on the device: FLUX.1 in fp32 would take 48 GB before any cast
        torch.set_default_dtype(_dtype(device))
        with torch.device(device):
            torch.manual_seed(0)
            denoiser = shape.build()
    finally:
        torch.set_default_dtype(default)
    family = FAMILIES[shape.family]
    if shape.family == "flux":
        family = variant_of(family, dict(denoiser.config))
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        prediction = "flow_matching"
    else:
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        prediction = "epsilon"
    vae = shapes.sd_vae(1 / 16, shape.latent_channels, **shape.vae)
    return Parts(family=family, source="bench", prediction_type=prediction, denoiser=denoiser, vae=vae,
                 text_encoders=[], tokenizers=[], noise_scheduler=scheduler, weight_dtype=_dtype(device),
                 device=device)  # fmt: skip


def make_batch(shape: Shape, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = shape.resolution // 8
    batch = {
        "latents": torch.randn(shape.batch, shape.latent_channels, side, side, generator=g).to(device),
        "prompt_embeds": torch.randn(shape.batch, *shape.text, generator=g).to(device, _dtype(device)),
    }
    if shape.pooled:
        batch["pooled_prompt_embeds"] = torch.randn(shape.batch, shape.pooled, generator=g).to(device, _dtype(device))
    batch["generator"] = torch.Generator().manual_seed(seed)
    return batch


def trainable_fits(params: int, tier: str, method: str, device: torch.device) -> str | None:
    """None when the trained weights, gradients and optimizer state fit the device, else the estimate."""
    if device.type != "cuda":
        return None
    per_param = 4 + (1 if tier == "low" else 4) * 2 + (0 if (tier == "low" and method == "dreambooth") else 4)
    need = params * per_param
    total = torch.cuda.get_device_properties(device).total_memory
    return (
        None
        if need < 0.85 * total
        else f"needs ~{need / 2**30:.0f} GiB for weights + state (card {total / 2**30:.0f})"
    )


def measure(shape: Shape, method: str, tier: str, device: torch.device, steps: int, warmup: int, work: Path) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from tuner import runtime, speed
    from tuner.optim import build_optimizer
    from tuner.registry import get_trainer

    config = run_config(method, tier, device, work)
    parts = make_parts(shape, device)
    trainer = get_trainer(method)(config)
    trainables = trainer.prepare(parts)
    params = trainables.parameters()
    trained = sum(p.numel() for p in params)
    too_big = trainable_fits(trained, tier, method, device)
    if too_big:
        return {"trained": trained, "skipped": too_big}
    runtime.apply_precision(parts, params, _precision(device))
    runtime.memory_levers(parts, config)
    speed.apply(parts, config)
    optimizer = build_optimizer(config.optimizer, trainables.param_groups, device)
    max_norm = config.optimizer.max_grad_norm
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(index: int) -> float:
        batch = make_batch(shape, device, index)
        with autocast:
            loss = trainer.compute_loss(parts, batch)
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for index in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        losses.append(step(index))
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    counter = FlopCounterMode(display=False)
    denoiser = parts.unwrapped(parts.denoiser)
    if config.train.gradient_checkpointing:  # model FLOPs count no recomputation
        denoiser.disable_gradient_checkpointing()
    with counter:  # model FLOPs of one forward + backward (the optimizer's are negligible)
        batch = make_batch(shape, device, 0)
        with autocast:
            loss = trainer.compute_loss(parts, batch)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    per_step = statistics.median(times[warmup:])
    return {"trained": trained, "s_step": per_step, "images_s": shape.batch / per_step, "peak": peak,
            "flops": counter.get_total_flops(), "finite": all(map(_finite, losses))}  # fmt: skip


def _precision(device: torch.device) -> str:
    """bf16 autocast on a GPU; fp32 on a CPU, whose bf16 kernels are emulated and slower than fp32."""
    return "bf16" if device.type == "cuda" else "no"


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak in FLOP/s (None when unknown, e.g. a CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        return name, peak * 1e12 if peak else None
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}", None


def rows_for(results: list[tuple[Case, dict]], peak_flops: float | None) -> list[str]:
    lines = []
    for case, r in results:
        head = f"| {case.family} | {case.method} | {case.tier} | {r['trained'] / 1e6:,.1f}M | "
        head += f"{case.batch} x {case.resolution}px |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} | | | | |")
            continue
        vram = f"{r['peak'] / 2**30:.1f} GiB" if r["peak"] is not None else "n/a (CPU)"
        tflop = r["flops"] / 1e12
        mfu = f"{r['flops'] / r['s_step'] / peak_flops:.1%}" if peak_flops else "n/a"
        lines.append(f"{head} {r['s_step']:.3f} | {r['images_s']:.2f} | {vram} | {tflop:.3g} | {mfu} |")
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the same code; CI runs it on the CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.md")
    parser.add_argument("--only", default="sd1,sdxl,flux", help="families, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 6; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; tiny 1)")
    parser.add_argument("--peer", type=Path, default=None, help="diffusers' train_dreambooth_lora.py (side by side)")
    parser.add_argument("--peer-pythonpath", default="", help="extra PYTHONPATH for the peer script")
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.tiny else 6)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the dtype cast of a model built in code is meant
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, peak_flops = machine(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    results: list[tuple[Case, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, shape in family_shapes(args.tiny).items():
            if family not in args.only.split(","):
                continue
            for method in ("lora", "dreambooth"):
                for tier in TIERS:
                    case = Case(family, method, tier, shape.batch, shape.resolution)
                    try:
                        result = measure(shape, method, tier, device, args.steps, args.warmup, Path(tmp))
                    except (TunerError, torch.cuda.OutOfMemoryError) as exc:  # e.g. no CUDA bitsandbytes here
                        result = {"trained": 0, "skipped": str(exc).splitlines()[0][:200]}
                    results.append((case, result))
                    print(*rows_for([(case, result)], peak_flops), flush=True)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        side = side_by_side(args, Path(tmp), device)
    lines = [
        "# Training speed and memory per family, method and memory tier",
        "",
        f"Machine: **{name}** (torch {torch.__version__}); produced by `bench/gpu.sh {' '.join(argv or sys.argv[1:])}`"
        f" in {time.perf_counter() - started:.0f} s{'; tiny shapes' if args.tiny else ''}.",
        "",
        f"Precision: {_precision(device)} (bf16 autocast on a GPU, fp32 on a CPU). Tiers: "
        + "; ".join(f"**{k}**: {v}" for k, v in TIERS.items())
        + ". `dreambooth` is full fine-tuning of the "
        f"denoiser. Median of {args.steps} steps after {args.warmup} warm-up steps; MFU = counted model FLOPs of "
        "forward + backward per second over the card's dense bf16 peak.",
        "",
        "| family | method | tier | trained params | batch | s/step | images/s | peak GPU memory | TFLOP/step | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows_for(results, peak_flops),
        "",
        *side,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    bad = [case for case, r in results if "skipped" not in r and not r["finite"]]
    if bad:
        print(f"non-finite loss in {bad}", file=sys.stderr)
        return 1
    return 0


def side_by_side(args, work: Path, device: torch.device) -> list[str]:
    """SD1.5 LoRA against diffusers' example script, both as whole processes on the same model folder."""
    if args.peer is None:
        return ["SD1.5 LoRA side by side with diffusers' `train_dreambooth_lora.py`: not run (give `--peer PATH`)."]
    from bench import vs_diffusers

    tiny = args.tiny
    peer_args = vs_diffusers.parse([
        "--peer", str(args.peer), "--width", "0.1" if tiny else "1", "--resolution", "64" if tiny else "512",
        "--batch", "4", "--rank", "4", "--steps", str(args.steps * 2), "--warmup", str(args.warmup),
        "--images", "8", "--precision", "bf16" if device.type == "cuda" else "no",
        "--threads", str(os.cpu_count() or 1), "--peer-pythonpath", args.peer_pythonpath,
    ])  # fmt: skip
    model = shapes.sd1_pipeline(
        work / "sd15", peer_args.width, torch.float16 if device.type == "cuda" else torch.float32
    )
    images = shapes.make_images(work / "sd15-images", peer_args.images, peer_args.resolution, captions=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if args.peer_pythonpath:
        peer_args.peer_env = {"PYTHONPATH": os.pathsep.join([args.peer_pythonpath, str(ROOT)])}
    results = vs_diffusers.side_by_side(args.peer.resolve(), model, images, work, peer_args, env)
    rows = vs_diffusers.table(results)
    return [
        f"SD1.5 LoRA side by side with diffusers' `train_dreambooth_lora.py` ({peer_args.resolution}px, batch "
        f"{peer_args.batch}, rank 4, AdamW, {peer_args.precision}; whole processes, `bench/vs_diffusers.py`):",
        "",
        "| measurement | diffusers example | tuner | tuner vs example |",
        "|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in rows],
    ]


if __name__ == "__main__":
    sys.exit(main())
