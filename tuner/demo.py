"""`tuner demo`: personalize the built-in micro model from the example subject, then render, judge and explain.

The main job of the suite on its built-in default: DreamBooth-LoRA (preset `micro-subject-lora`) on the eight
example photos in `datasets/micro-subject` (rendered again from the micro world when the folder is not there): a
large black heart, a subject the base can draw but has no word for, photographed on three backgrounds. Then a
validation grid (base vs tuned) on the instance prompt, on backgrounds the photos never show and on the class prompt,
judge figures in `metrics.json`, a model card, what the figures mean, and how to load the result.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tuner.errors import TunerError

PRESET = "micro-subject-lora"
MARKER = ".tuner-demo"
NEW_BACKGROUNDS = ("blue", "green", "red")


def _photos(out: Path) -> Path:
    shipped = Path(__file__).resolve().parent.parent / "datasets" / "micro-subject"
    if any(shipped.glob("*.png")):
        return shipped
    from tuner.micro.render import render_set

    target = out / "photos"
    render_set(target, "subject", 8, seed=1)  # the same bytes as datasets/micro-subject
    return target


def _model(out: Path, model: str | None) -> tuple[str, str | None]:
    """(model, note): the built-in micro model, or a random tiny one when this install lacks it."""
    if model:
        return model, None
    from tuner.models import builtin_model_path

    try:
        builtin_model_path("micro")
        return "builtin:micro", None
    except TunerError:
        from tuner.tiny import make_tiny

        path = out.parent / f"{out.name}-tiny-base"
        if not (path / "model_index.json").is_file():
            make_tiny(path, "sd1")
        return str(path), "this install has no built-in micro model: trained a random tiny model (expect noise)"


def _fresh(out: Path) -> None:
    """Reuse the folder of an earlier demo; refuse to touch anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise TunerError(f"--output-dir {out}: exists and is not an earlier demo; pick another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `tuner demo`; the next demo run replaces this folder\n")


def run_demo(output_dir: str | Path = "tuner-demo", model: str | None = None, steps: int | None = None) -> Path:
    import torch

    from tuner.config import load_config
    from tuner.hub import write_model_card
    from tuner.loop import train

    if not torch.cuda.is_available():  # the micro model is tiny: on shared CPU cores one thread per process trains
        torch.set_num_threads(1)  # it many times faster than several (7.5 s a step against 0.4 s at load 4-5)
    out = Path(output_dir).resolve()
    _fresh(out)
    model, note = _model(out, model)
    if note:
        print(f"note: {note}")
    photos = _photos(out)
    sets = [f"train.max_train_steps={steps}"] if steps else []
    token = "sks"
    instance, contexts, klass = _prompts(token)
    overrides = {
        "model": {"pretrained_model_name_or_path": model},
        "data": {
            "path": str(photos),
            "class_data_dir": str(out / "cache" / "class_images"),
            "cache_dir": str(out / "cache"),
        },
        "train": {"output_dir": str(out)},
        "validation": {"prompts": [instance, *contexts, klass]},
    }
    config = load_config(preset=PRESET, sets=sets, overrides=overrides)
    if model == "builtin:micro":
        from tuner.micro.quality import prior_images

        prior_images(model, Path(config.data.class_data_dir), config.data.num_class_images)
    started = time.perf_counter()
    run = train(config, summary=False)  # the summary comes last, with the judge's figures
    seconds = time.perf_counter() - started
    metrics = {"train_seconds": round(seconds, 1), "steps": config.train.max_train_steps}
    metrics["judge"] = _judge(model, run, config.data.token or token)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_model_card(run)
    _explain(run, photos, metrics)
    return run


def _prompts(token: str) -> tuple[str, list[str], str]:
    """(instance prompt, the subject on backgrounds its photos never show, the class prompt) for the grid."""
    from tuner.micro.world import INSTANCE

    instance = INSTANCE.caption(INSTANCE.photo_backgrounds[0], token)
    return instance, [INSTANCE.caption(bg, token) for bg in NEW_BACKGROUNDS], INSTANCE.class_caption("blue")


def _judge(model: str, run: Path, token: str) -> dict:
    from tuner.micro.evaluate import judge_subject
    from tuner.sampling import load_loras, load_pipeline, lora_file, set_lora_scale

    pipe = load_pipeline(model)
    names = load_loras(pipe, [lora_file(run)])
    print("judging samples of the tuned and base model ...", flush=True)

    def pipe_at(scale: float):
        set_lora_scale(pipe, names, scale)
        return pipe

    return judge_subject(pipe_at, token=token).to_dict()


def _explain(run: Path, photos: Path, metrics: dict) -> None:
    """The summary `tuner train` prints, with the photos, the judge's figures and a sample line for the subject."""
    from tuner.progress import closing_summary

    judge = metrics["judge"]
    details = [
        ("photos used", f"{photos} (a large black heart, on yellow, pink and purple backgrounds)"),
        ("grid rows", "the instance prompt; the subject on blue, green and red (backgrounds no photo shows); the "
                      "class prompt `a photo of a heart on a blue background`, which should look as before"),
        ("metrics.json", f"subject fidelity {judge['fidelity']:.2f} (base {judge['base_fidelity']:.2f}), context "
                         f"adherence {judge['context_adherence']:.2f}, prior drift {judge['prior_drift']:.2f}"),
    ]  # fmt: skip
    print(
        closing_summary(
            run,
            details=details,
            headline=f"Done in {metrics['train_seconds']} s of training.",
            prompt="a photo of a sks heart on a green background",
            size=64,
            repo_id="you/micro-sks-heart",
        )
    )
    print(meaning(judge))


def meaning(judge: dict) -> str:
    """The judge's figures in words: what a user should read from them."""
    samples = judge["samples"]
    return "\n".join([
        "What the figures mean (the micro world's judge read every sample; 1.00 = all of them):",
        f"- fidelity {judge['fidelity']:.2f}: the share of `a photo of a sks heart on a <photo background>` samples "
        f"that show the subject, a black heart (the base without the LoRA: {judge['base_fidelity']:.2f}).",
        f"- context adherence {judge['context_adherence']:.2f}: the share of samples that put it on a background "
        "the prompt names and no photo shows (blue, green, red, white): "
        + ("it learned the heart, not the photos." if judge["context_adherence"] >= 0.7 else
           "under 0.7, it learned the photos' backgrounds with the heart, and new ones often lose it."),
        f"- prior drift {judge['prior_drift']:.2f}: how much more often the plain class prompt `a photo of a heart "
        "on a <color> background` now draws the subject than the base did; 0 means `heart` still means any heart.",
        f"({samples} samples, seeds 0-3, 20 DDIM steps, guidance 4.)",
    ])  # fmt: skip
