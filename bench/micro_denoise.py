"""Does the micro UNet know what a shape looks like? One denoising step, judged, at fixed noise levels.

Run from the repository root: `python bench/micro_denoise.py [--model builtin:micro] [--images 96]`.
Fresh base scenes are encoded by the model's VAE, noised to timestep t with a fixed generator, and the UNet makes
one prediction of the clean latent from its own caption; the judge reads shape, color and background of the decoded
prediction. Sampling adherence (bench/micro_adherence.py) mixes every skill the sampler needs; this isolates the one
that fails there: at a noise level where the object's outline is still plainly in the input (SNR about 1), a UNet
with a shape prior returns the outline clean, a UNet without one returns the noise's lumps. The VAE round trip
(t = 0, no UNet) is the ceiling. Writes bench/results/micro_denoise.md and a strip of examples next to it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.micro import world  # noqa: E402
from tuner.micro.judge import Judge  # noqa: E402

SCENE_SEED, NOISE_SEED = 9090, 0
TIMESTEPS = (100, 200, 300, 400, 500, 650, 800)
KEYS = ("shape", "color", "background")
EXAMPLES = 4


def prompt_for(scene, shape: str | None = None) -> str:
    """The fully specified prompt of a scene (base captions may leave out its color or size), or another shape's."""
    return f"a {scene.color} {shape or scene.shape} on a {scene.background} background"


def other_shape(scene) -> str:
    """A different shape word for a scene: the next one in the world's list."""
    return world.SHAPES[(world.SHAPES.index(scene.shape) + 1) % len(world.SHAPES)]


def predict_clean(pipe, latents, timestep: int, prompts: list[str], noise):
    """The UNet's one-step estimate of the clean latents from latents noised to `timestep`."""
    import torch

    scheduler = pipe.scheduler
    t = torch.full((latents.shape[0],), timestep, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise, t)
    embeddings, _ = pipe.encode_prompt(prompts, latents.device, 1, do_classifier_free_guidance=False)
    out = pipe.unet(noisy, t, embeddings).sample
    alpha = scheduler.alphas_cumprod[timestep].sqrt()
    sigma = (1 - scheduler.alphas_cumprod[timestep]).sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return alpha * noisy - sigma * out
    return (noisy - sigma * out) / alpha


def to_images(pipe, latents) -> list:
    pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def judged(judge: Judge, images, scenes, shapes: list[str] | None = None) -> dict[str, float]:
    """Fractions judged right; `shapes` replaces each scene's shape as the expected one."""
    shapes = shapes or [s.shape for s in scenes]
    rows = [judge.score(im, {"shape": shape, "color": s.color, "background": s.background})
            for im, s, shape in zip(images, scenes, shapes)]  # fmt: skip
    return {k: sum(bool(r[k]) for r in rows) / len(rows) for k in KEYS}


def table_row(name: str, snr: str, right: dict[str, float], follows: float | None) -> str:
    cells = [name, snr, *(f"{right[k]:.3f}" for k in KEYS), "-" if follows is None else f"{follows:.3f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from tuner.losses import compute_snr
    from tuner.micro.evaluate import through_vae
    from tuner.models import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:micro")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "micro_denoise.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path(args.model), safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    judge = Judge()
    scenes = world.scenes("base", args.images, SCENE_SEED)
    prompts = [prompt_for(s) for s in scenes]
    swapped = [prompt_for(s, other_shape(s)) for s in scenes]
    rows, strip = [], [np.concatenate([np.asarray(s.render()) for s in scenes[:EXAMPLES]], 0)]
    with torch.no_grad():
        means, ceiling = through_vae(pipe.vae, [s.render() for s in scenes])
        latents = means * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
        rows.append(("VAE round trip (no UNet)", "-", judged(judge, ceiling, scenes), None))
        strip.append(np.concatenate([np.asarray(im) for im in ceiling[:EXAMPLES]], 0))
        for t in TIMESTEPS:
            images = to_images(pipe, predict_clean(pipe, latents, t, prompts, noise))
            snr = float(compute_snr(pipe.scheduler, torch.tensor([t]))[0])
            other = to_images(pipe, predict_clean(pipe, latents, t, swapped, noise))
            follows = judged(judge, other, scenes, [other_shape(s) for s in scenes])["shape"]
            rows.append((f"t = {t}", f"{snr:.2f}", judged(judge, images, scenes), follows))
            strip.append(np.concatenate([np.asarray(im) for im in images[:EXAMPLES]], 0))
    strip_path = args.out.with_suffix(".png")
    grid = np.concatenate(strip, 1)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(strip_path)
    lines = [
        "# Micro base model: one-step denoising, judged",
        "",
        f"Produced by `python bench/micro_denoise.py --model {args.model} --images {args.images}` "
        f"({time.time() - started:.0f} s on {platform.machine()} CPU, Python {platform.python_version()}).",
        "",
        f"{args.images} fresh base scenes (seed {SCENE_SEED}), each noised to timestep t with one fixed noise "
        f"(seed {NOISE_SEED}); the UNet predicts the clean latent once from `a {{color}} {{shape}} on a "
        "{background} background`; the judge reads the decoded prediction. SNR is the schedule's alpha-bar / "
        "(1 - alpha-bar) at t. Last column: the same, with the prompt naming the next shape in the world's list "
        "instead; the fraction judged to be that shape (chance 1/6) says whether the prompt or the input draws the "
        "outline at that noise level.",
        "",
        "| input | SNR | shape | color | background | prompt names another shape: judged that shape |",
        "|---|---|---|---|---|---|",
        *(table_row(*row) for row in rows),
        "",
        f"![examples]({strip_path.name}) Columns: the render, the VAE round trip, then the one-step prediction at "
        + ", ".join(f"t = {t}" for t in TIMESTEPS)
        + f"; rows: the first {EXAMPLES} scenes.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
