"""Train each method from its `micro-*` preset on an example set and judge what it learned.

The library half of `bench/quality.py` (which writes the results table) and of the in-suite quality test (which
runs it with fewer steps and seeds): one place decides how a method is trained and scored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DATASETS = Path(__file__).resolve().parents[2] / "datasets"
SUBJECT = "sks"
STYLE = "shaded"
"""The style of datasets/micro-style: a palette change on content the base draws (its README says why not the
outline or the mosaic)."""

RUNS = {
    "dreambooth": ("micro-subject-dreambooth", "micro-subject", "full"),
    "dreambooth-lora": ("micro-subject-lora", "micro-subject", "lora"),
    "textual-inversion": ("micro-subject-ti", "micro-subject", "embedding"),
    "pivotal": ("micro-subject-pivotal", "micro-subject", "embedding+lora"),
    "style-lora": ("micro-style-lora", "micro-style", "style"),
    "decoder": ("micro-decoder", "micro-domain", "decoder"),
}
"""name: (preset, example set in datasets/, how it is scored). The subject methods' set is the reachable subject's;
`subject="hard"` trains them on `datasets/micro-subject-hard` instead (`tuner.micro.evaluate.SUBJECTS`)."""
SUBJECT_METHODS = tuple(name for name, run in RUNS.items() if run[1] == "micro-subject")
TARGETS = {
    "dreambooth-lora": "fidelity ≥ 0.8, context ≥ 0.7, prior drift ≤ 0.1",
    "textual-inversion": "fidelity ≥ 0.6",
    "style-lora": "style adherence ≥ 0.8, content kept (≈ base_content)",
    "decoder": "+2 dB held-out PSNR",
}


def example_set(name: str, subject: str = "reachable") -> str:
    """The folder in datasets/ that `name` trains on."""
    from tuner.micro.evaluate import SUBJECTS

    return SUBJECTS[subject].folder if name in SUBJECT_METHODS else RUNS[name][1]


def train_method(
    name: str, model: str, out: Path, steps_scale: float = 1.0, datasets: Path = DATASETS, subject: str = "reachable"
):
    """Train `name` from its preset into `out/name` (`out/name-hard` on the hard subject); returns (run folder,
    training seconds, config)."""
    from tuner.config import load_config
    from tuner.loop import train

    preset, folder = RUNS[name][0], example_set(name, subject)
    run_dir = out / (name if subject == "reachable" or name not in SUBJECT_METHODS else f"{name}-{subject}")
    shutil.rmtree(run_dir, ignore_errors=True)
    data = {
        "path": str(datasets / folder),
        "cache_dir": str(out / "cache"),
        "class_data_dir": str(class_dir(out, model)),
    }
    overrides = {
        "model": {"pretrained_model_name_or_path": model},
        "data": data,
        "train": {"output_dir": str(run_dir), "report_to": "none"},
    }
    config = load_config(preset=preset, overrides=overrides)
    config.train.max_train_steps = max(1, round(config.train.max_train_steps * steps_scale))
    if config.data.with_prior_preservation and config.data.prior_mode == "images":
        prior_images(model, Path(config.data.class_data_dir), config.data.num_class_images, subject)
    started = time.perf_counter()
    train(config)
    _reset_accelerate()
    return run_dir, time.perf_counter() - started, config


def class_dir(out: Path, model: str) -> Path:
    """Class images belong to the base that drew them: one folder per UNet weights file, so a rerun after the base
    changed generates new ones instead of reusing the old base's."""
    from tuner.models import resolve_model_path

    weights = sorted((Path(resolve_model_path(model)) / "unet").glob("*.safetensors"))
    key = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()[:12]
    return out / "class" / key


def prior_images(model: str, folder: Path, count: int, subject: str = "reachable") -> list[Path]:
    """Class images for prior preservation, drawn by the base on the class prompts the judge scores: `a photo of a
    <class> on a <color> background` over every background, captioned so, `count` in all.

    The presets' class prompt (`a photo of a heart`) has no background, and this base never learned a prompt
    without one: class images of it protected that prompt only, and a LoRA on the subject turned `a photo of a heart
    on a blue background` into the subject (measured: prior drift 0.25 at 400 steps, 1.0 of class samples the
    subject's color at 200). The tuner counts these files as the user's own class images and generates none."""
    import torch

    from tuner.micro.evaluate import SUBJECTS
    from tuner.micro.world import COLORS
    from tuner.sampling import load_pipeline

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"prior-{i:05d}.png" for i in range(count)]
    if all(p.is_file() and p.with_suffix(".txt").is_file() for p in paths):
        return paths
    concept = SUBJECTS[subject].concept
    prompts = [concept.class_caption(COLORS[i % len(COLORS)]) for i in range(count)]
    pipe = load_pipeline(model)
    for start in range(0, count, 8):
        chunk = prompts[start : start + 8]
        generators = [torch.Generator("cpu").manual_seed(start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=20, guidance_scale=4.0, height=64, width=64, generator=generators)
        for i, (prompt, image) in enumerate(zip(chunk, images.images)):
            image.save(paths[start + i])
            paths[start + i].with_suffix(".txt").write_text(prompt + "\n", encoding="utf-8")
    return paths


def vae_round_trip(model: str, folder: str, expected: dict, datasets: Path = DATASETS) -> float:
    """Fraction of an example set's images in which the judge still finds `expected` (the subject, a style) after
    the base's VAE encodes and decodes them: the most a method trained on that set can show through this VAE."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from tuner.micro.evaluate import through_vae
    from tuner.micro.judge import Judge
    from tuner.models import resolve_model_path

    vae = AutoencoderKL.from_pretrained(Path(resolve_model_path(model)) / "vae").eval()
    _, images = through_vae(
        vae, [Image.open(path).convert("RGB") for path in sorted((datasets / folder).glob("*.png"))]
    )
    judge = Judge()
    return sum(all(judge.score(image, expected).values()) for image in images) / len(images)


def _reset_accelerate() -> None:
    """Runs in one process share accelerate's singletons; the next `train` must start from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def score_method(
    name: str, model: str, run_dir: Path, config, seeds: Sequence[int] = (0, 1, 2, 3), subject: str = "reachable"
) -> dict[str, Any]:
    """The method's figures: judge scores of tuned vs base samples, or the decoder's held-out PSNR/SSIM gain."""
    from diffusers import DiffusionPipeline

    from tuner.micro.evaluate import judge_style, judge_subject
    from tuner.sampling import Embedding, load_embedding, load_loras, load_pipeline, lora_file

    kind = RUNS[name][2]
    if kind == "decoder":
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return {
            "base_psnr": metrics["base"]["psnr"],
            "tuned_psnr": metrics["tuned"]["psnr"],
            "psnr_gain_db": metrics["gain"]["psnr"],
            "ssim_gain": metrics["gain"]["ssim"],
        }
    base = load_pipeline(model)
    if kind == "full":
        tuned = DiffusionPipeline.from_pretrained(run_dir / "pipeline")
        tuned.set_progress_bar_config(disable=True)
    else:
        tuned = load_pipeline(model)
    token = SUBJECT
    if "embedding" in kind:
        token = config.textual_inversion.placeholder_token
        load_embedding(tuned, Embedding(run_dir / "learned_embeds.safetensors", token))
    if "lora" in kind or kind == "style":
        load_loras(tuned, [lora_file(run_dir)])

    def pipe_at(scale: float):
        return tuned if scale else base

    if kind == "style":
        return judge_style(pipe_at, style=STYLE, seeds=seeds)
    return judge_subject(pipe_at, token=token, seeds=seeds, subject=subject).to_dict()
