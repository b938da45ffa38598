"""Write a micro-world data set to a folder: numbered PNGs, one-line caption sidecars and a labels.jsonl.

The folder layout is what the suite's image-folder loader reads (`00000.png` + `00000.txt`), and labels.jsonl
keeps the ground truth next to it for evaluation. Same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuner.micro import world

DEFAULT_TOKEN = "sks"


def render_set(
    out_dir: str | Path, kind: str, count: int, seed: int, token: str = DEFAULT_TOKEN, style: str | None = None
) -> list[Path]:
    """Render `count` items of `kind` for `seed` into `out_dir`; returns the image paths in order.

    Concept captions get `token` in place of the identifier placeholder. Files of an earlier, larger run in the
    same folder are left alone, but labels.jsonl always describes exactly this run.
    """
    if kind not in world.KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(world.KINDS)}")
    if count < 1 or seed < 0:
        raise ValueError("count must be at least 1 and seed non-negative")
    _check_token(token)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i, item in enumerate(world.scenes(kind, count, seed, style)):
        name = f"{i:05d}"
        image_path = out / f"{name}.png"
        item.render().save(image_path, format="PNG")
        text = item.caption(token)
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        rows.append(json.dumps({"file_name": image_path.name, "text": text, **item.labels()}))
        paths.append(image_path)
    (out / "labels.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return paths


def _check_token(token: str) -> None:
    """The identifier must stay one whitespace-free word that the world's vocabulary does not already use."""
    if not token or any(ch.isspace() for ch in token) or token != token.lower():
        raise ValueError(f"token must be one lowercase word without spaces, got {token!r}")
    if token in world.WORDS:
        raise ValueError(f"token {token!r} is a word of the micro world; pick a rare one such as 'sks'")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tuner.micro.render",
        description="Render a deterministic micro-world data set: OUT_DIR/00000.png, 00000.txt (caption) and "
        "labels.jsonl (file_name, text and ground-truth labels per image).",
        epilog="kinds: base = captioned shapes for base training; concept = photos of the personalization "
        f"subject ('{world.CONCEPT.template}'); style = scenes in {' or '.join(world.STYLES)} style; "
        "pattern = high-frequency textures the micro VAE learns from; domain = polka dots for decoder tuning. "
        "Example: python -m tuner.micro.render data/concept --kind concept --count 8 --seed 0",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--kind", choices=world.KINDS, default="base", help="what to render (default: base)")
    parser.add_argument("--count", type=_positive, required=True, help="number of images")
    parser.add_argument("--seed", type=_non_negative, default=0, help="seed; same seed, same bytes (default: 0)")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="identifier word in concept captions (default: sks)")
    parser.add_argument("--style", choices=world.STYLES, help="with --kind style: render only this style")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_token(args.token)
    except ValueError as err:
        parser.error(str(err))
    try:
        paths = render_set(args.out_dir, args.kind, args.count, args.seed, args.token, args.style)
    except OSError as err:
        print(f"error: cannot write to {args.out_dir}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} {args.kind} images with captions and labels.jsonl to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
