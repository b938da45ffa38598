"""Measure the micro-world judge on fresh renders, clean and degraded, and write bench/results/judge.md.

Run from the repository root: `python bench/judge_accuracy.py [--n 300] [--seed 20240]`. The judge is the yardstick
for every micro-world training run, so its own error bars belong next to the results it produces.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.micro import judge as judge_mod  # noqa: E402
from tuner.micro import world  # noqa: E402

KINDS = ("base", "concept", "style")
DEGRADATIONS = (None, "blur", "jpeg", "noise", "jitter", "mixed")
ATTRIBUTES = ("shape", "color", "background", "concept", "style")
NOTES = """\
Each row judges `n` fresh renders of one kind (scenes from `world.scenes(kind, n, seed)`; the judge's shape
templates come from a separate seed stream, so none of these images was seen while building it). A cell is the
fraction judged right. On base and style scenes, `concept` is 1 - the concept false-positive rate; on concept
scenes it is the detection rate. Concept scenes have no single `color` (the pattern is two-tone), so that cell is
empty. Degradations draw a random strength per image: blur = Gaussian radius 0.6-1.2 px; jpeg = quality 50-85;
noise = Gaussian sigma 4-10; jitter = brightness and contrast x0.9-1.1 plus a per-channel shift of +-10;
mixed = blur 0.4-0.9 px, jitter and noise, then JPEG half of the time (the closest to a soft generated image).
These are renders, not generations: a trained model's images can fail in ways no degradation here imitates.
The few base `style` misses are nearly unrotated squares and crosses whose edges happen to fall on the 4-pixel
mosaic grid, which is what a mosaic of them looks like too.
"""


def run(n: int, seed: int) -> tuple[list[list[str]], list[list[str]], float]:
    start = time.perf_counter()
    judge = judge_mod.Judge()
    rows = []
    for kind in KINDS:
        for degradation in DEGRADATIONS:
            result = judge_mod.accuracy(n=n, seed=seed, kind=kind, degradation=degradation, judge=judge)
            cells = [f"{result[a]:.3f}" if a in result else "" for a in ATTRIBUTES]
            rows.append([kind, degradation or "clean", *cells])
            print(" | ".join(rows[-1]), flush=True)
    hits: dict[tuple[str, str], list[bool]] = {}
    for scene in world.scenes("style", n, seed):  # where the style rows lose shape accuracy
        hits.setdefault((scene.style, scene.size), []).append(judge.judge(scene.render())["shape"] == scene.shape)
    split = [[style, size, str(len(v)), f"{sum(v) / len(v):.3f}"] for (style, size), v in sorted(hits.items())]
    return rows, split, time.perf_counter() - start


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def to_markdown(rows, split, n: int, seed: int, seconds: float, command: str) -> str:
    return (
        "# Micro-world judge accuracy\n\n"
        f"Produced by `{command}` (n={n} per row, seed={seed}, {seconds:.0f} s on "
        f"{platform.machine()} CPU, Python {platform.python_version()}).\n\n"
        + _table(["kind", "degradation", *ATTRIBUTES], rows)
        + "\n\n"
        + NOTES
        + "\nShape accuracy on the clean style scenes above, by style and size (small mosaics are 6-7 cells across, "
        "so a star or cross there can be ambiguous even to a person):\n\n"
        + _table(["style", "size", "n", "shape"], split)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="renders per row (default: 300)")
    parser.add_argument("--seed", type=int, default=20240, help="scene seed (default: 20240)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "judge.md")
    args = parser.parse_args(argv)
    rows, split, seconds = run(args.n, args.seed)
    command = "python bench/judge_accuracy.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(rows, split, args.n, args.seed, seconds, command), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
