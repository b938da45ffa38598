"""Quality of every trainer on the micro world, measured by the judge on fixed seeds.

    python bench/quality.py [--model builtin:micro] [--out /tmp/tuner-quality] [--steps-scale 1.0] [--only NAME ...]

Trains DreamBooth (full), DreamBooth-LoRA, textual inversion, pivotal tuning, a style LoRA and a decoder
fine-tune from their `micro-*` presets on the example sets in `datasets/`, then scores each against the same
model without the adaptation: subject fidelity, context adherence and prior drift for the subject methods,
style adherence for the style LoRA, held-out PSNR/SSIM gain for the decoder. Writes
`bench/results/quality.md` (a table, the targets and the command) and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "datasets"
SUBJECT = "sks"

# name: (preset, data folder, kind of evaluation)
RUNS = {
    "dreambooth": ("micro-subject-dreambooth", "micro-subject", "full"),
    "dreambooth-lora": ("micro-subject-lora", "micro-subject", "lora"),
    "textual-inversion": ("micro-subject-ti", "micro-subject", "embedding"),
    "pivotal": ("micro-subject-pivotal", "micro-subject", "embedding+lora"),
    "style-lora": ("micro-style-lora", "micro-style", "style"),
    "decoder": ("micro-decoder", "micro-domain", "decoder"),
}
TARGETS = {
    "dreambooth-lora": "fidelity ≥ 0.8, context ≥ 0.7, prior drift ≤ 0.1",
    "textual-inversion": "fidelity ≥ 0.6",
    "style-lora": "style adherence ≥ 0.8",
    "decoder": "+2 dB held-out PSNR",
}


def train_one(name: str, model: str, out: Path, steps_scale: float) -> tuple[Path, float, object]:
    from tuner.config import load_config
    from tuner.loop import train

    preset, folder, _ = RUNS[name]
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {
        "model": {"pretrained_model_name_or_path": model},
        "data": {"path": str(DATA / folder), "cache_dir": str(out / "cache"), "class_data_dir": str(out / "class")},
        "train": {"output_dir": str(run_dir), "report_to": "none"},
    }
    config = load_config(preset=preset, overrides=overrides)
    config.train.max_train_steps = max(1, round(config.train.max_train_steps * steps_scale))
    started = time.perf_counter()
    train(config)
    _reset_accelerate()
    return run_dir, time.perf_counter() - started, config


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def evaluate(name: str, model: str, run_dir: Path, config) -> dict:
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
        return judge_subject(lambda s: tuned if s else base, token=SUBJECT).to_dict()
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
        return judge_style(pipe_at)
    return judge_subject(pipe_at, token=token).to_dict()


def table(results: dict) -> str:
    rows = ["| method | train s | figures | target |", "|---|---|---|---|"]
    for name, r in results.items():
        figures = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["metrics"].items())
        rows.append(f"| {name} | {r['seconds']:.0f} | {figures} | {TARGETS.get(name, '-')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:micro")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tuner-quality"))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every preset's step count")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these methods")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "quality.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name in args.only or list(RUNS):
        print(f"== {name}", flush=True)
        run_dir, seconds, config = train_one(name, args.model, args.out, args.steps_scale)
        results[name] = {"seconds": seconds, "metrics": evaluate(name, args.model, run_dir, config)}
        print(json.dumps(results[name], indent=2), flush=True)
    text = table(results)
    print(text)
    command = "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.results.write_text(
        "# Trainer quality on the micro world\n\n"
        f"Produced by `{command.strip()}` ({platform.machine()} CPU, torch threads 1, Python "
        f"{platform.python_version()}, torch {torch.__version__}).\n\n" + text + "\n\n"
        "Subject methods are scored on `a photo of a <token> heart` (fidelity: the judge finds the checkered "
        "heart), on the same prompt on four named backgrounds (context: subject and background both right), and "
        "on the class prompt `a photo of a heart on a <color> background` (prior drift: how much more often the "
        "subject appears than with the base model); 4 seeds each, 20 DDIM steps, guidance 4. `base_fidelity` "
        "is the same model without the adaptation. The style LoRA is scored on three prompts ending in "
        "`in mosaic style`; the decoder on its held-out 20% of datasets/micro-domain.\n",
        encoding="utf-8",
    )
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
