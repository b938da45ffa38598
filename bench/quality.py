"""Quality of every trainer on the micro world, measured by the judge on fixed seeds.

    python bench/quality.py [--model builtin:micro] [--out /tmp/tuner-quality] [--steps-scale 1.0] [--only NAME ...]
                            [--subjects reachable hard] [--seeds 4]

Trains DreamBooth (full), DreamBooth-LoRA, textual inversion, pivotal tuning, a style LoRA and a decoder
fine-tune from their `micro-*` presets on the example sets in `datasets/`, then scores each against the same
model without the adaptation: subject fidelity, context adherence and prior drift for the subject methods,
style adherence for the style LoRA, held-out PSNR/SSIM gain for the decoder. The subject methods run on the
example subject within the base's reach (datasets/micro-subject) and, beside it, on the hard one beyond it
(datasets/micro-subject-hard, rows marked "hard"). Writes
`bench/results/quality.md` (a table, the targets and the command) and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuner.micro.evaluate import SUBJECTS  # noqa: E402
from tuner.micro.quality import (  # noqa: E402
    RUNS,
    STYLE,
    SUBJECT_METHODS,
    TARGETS,
    score_method,
    train_method,
    vae_round_trip,
)


def table(results: dict) -> str:
    rows = ["| method | train s | figures | target |", "|---|---|---|---|"]
    for name, r in results.items():
        figures = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["metrics"].items())
        target = TARGETS.get(name, "-") if not name.endswith("(hard)") else "reported"
        rows.append(f"| {name} | {r['seconds']:.0f} | {figures} | {target} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:micro")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tuner-quality"))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every preset's step count")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these methods")
    parser.add_argument("--subjects", nargs="+", choices=list(SUBJECTS), default=list(SUBJECTS))
    parser.add_argument("--seeds", type=int, default=4, help="sampling seeds per prompt (0..N-1)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "quality.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    seeds = tuple(range(args.seeds))
    for name in args.only or list(RUNS):
        for subject in args.subjects if name in SUBJECT_METHODS else ["reachable"]:
            label = name if subject == "reachable" else f"{name} ({subject})"
            print(f"== {label}", flush=True)
            run_dir, seconds, config = train_method(name, args.model, args.out, args.steps_scale, subject=subject)
            metrics = score_method(name, args.model, run_dir, config, seeds, subject)
            results[label] = {"seconds": seconds, "metrics": metrics}
            print(json.dumps(results[label], indent=2), flush=True)
    trips = {s: vae_round_trip(args.model, SUBJECTS[s].folder, SUBJECTS[s].labels) for s in args.subjects}
    style = vae_round_trip(args.model, "micro-style", {"style": STYLE})
    text = table(results) + (
        "\n\nThrough the base's VAE alone (encode, decode, judge) the subject survives in "
        + ", ".join(f"{v:.2f} of the {SUBJECTS[s].folder} photos" for s, v in trips.items())
        + f", and the {STYLE} style in {style:.2f} of the style set: no method trained on them can show more than "
        "its VAE carries."
    )
    print(text)
    command = "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.results.write_text(
        "# Trainer quality on the micro world\n\n"
        f"Produced by `{command.strip()}` ({platform.machine()} CPU, torch threads 1, Python "
        f"{platform.python_version()}, torch {torch.__version__}).\n\n" + text + "\n\n"
        "Subject methods are scored on their photos' caption, `a photo of a <token> heart on a <background> "
        "background`, on purple and yellow (fidelity: the judge finds the subject: a black heart; for the hard "
        "subject `a photo of a <token> heart` and the checkered heart), on the same prompt on blue, green, red and "
        "white, backgrounds no photo of the reachable subject shows (context: subject and background both right), "
        "and on the class prompt `a photo of a heart on a <color> background` (prior drift: how much more often "
        f"the subject appears than with the base model); seeds 0-{args.seeds - 1}, 20 DDIM steps, guidance 4. "
        "`base_fidelity` is the same model without the adaptation. The style LoRA is scored on four prompts the "
        "base draws right, ending in the style's trigger word `painting` (style adherence: the judge reads the "
        "shaded style; content kept: shape and color are the prompt's, beside `base_content`, the base on the same "
        "prompts without the trigger); the decoder on its held-out 20% of datasets/micro-domain.\n",
        encoding="utf-8",
    )
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
