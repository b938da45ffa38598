"""Our LoRA run side by side with diffusers' `train_dreambooth_lora.py` on the same model, data and settings.

`python bench/vs_diffusers.py --peer PATH/train_dreambooth_lora.py [--width 0.25] [--steps 12] [--device cpu]`

The peer's script comes from a diffusers checkout of the installed version (`examples/dreambooth/`); it is run
as it is, never copied into this project. Both runs are separate processes timed the same way by
`bench/step_probe.py` (one step = the time between consecutive optimizer steps, after warm-up steps) on an
SD1.5-shaped pipeline (`bench/shapes.py`, random weights, written once) at `--resolution` px, `--batch`,
LoRA rank `--rank` on the UNet's attention projections, torch AdamW at 1e-4, fp32, no validation, each with
its defaults otherwise (ours caches latents and text embeddings; the peer encodes every step). Peak memory
is each process's peak RSS, and on CUDA its peak allocated GPU memory. Writes `--out` (markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROBE = ROOT / "bench" / "step_probe.py"


def run_probed(argv: list[str], out: Path, env: dict[str, str], log: Path) -> dict:
    """Run `argv` under the step probe; its step intervals and peak memory."""
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        proc = subprocess.run([sys.executable, str(PROBE), str(out), *argv], env=env, stdout=sink, stderr=sink)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{argv[0]} failed (exit {proc.returncode}); the end of its output:\n{tail}")
    result = json.loads(out.read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - started
    return result


def peer_argv(peer: Path, model: Path, images: Path, out: Path, args) -> list[str]:
    return [
        str(peer),
        f"--pretrained_model_name_or_path={model}",
        f"--instance_data_dir={images}",
        "--instance_prompt=a photo of thing",
        f"--output_dir={out}",
        f"--resolution={args.resolution}",
        f"--train_batch_size={args.batch}",
        f"--rank={args.rank}",
        "--learning_rate=1e-4",
        f"--max_train_steps={args.warmup + args.steps + 1}",
        "--checkpointing_steps=1000000",
        "--seed=0",
        f"--mixed_precision={args.precision}",
        "--report_to=tensorboard",
        "--dataloader_num_workers=0",
    ]


def our_config(model: Path, images: Path, out: Path, args) -> dict:
    return {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(model)},
        "data": {"path": str(images), "resolution": args.resolution, "enable_bucket": False,
                 "instance_prompt": "a photo of thing"},
        "lora": {"rank": args.rank, "alpha": float(args.rank), "unet_target_modules": "attn"},
        "optimizer": {"name": "adamw", "learning_rate": 1e-4, "max_grad_norm": 1.0},
        "train": {"output_dir": str(out), "max_train_steps": args.warmup + args.steps + 1,
                  "train_batch_size": args.batch, "checkpointing_steps": 1000000, "seed": 0,
                  "mixed_precision": args.precision, "report_to": "tensorboard"},
        "validation": {"enabled": False},
    }  # fmt: skip


def step_times(result: dict, warmup: int, key: str = "step_ends") -> list[float]:
    ends = result[key]
    return [b - a for a, b in zip(ends, ends[1:])][warmup:]


def side_by_side(peer: Path, model: Path, images: Path, work: Path, args, env: dict[str, str]) -> dict[str, dict]:
    """Both runs (peer first, then ours) -> {"peer": result, "ours": result} with `steps` (seconds each)."""
    import tomli_w

    results = {}
    results["peer"] = run_probed(peer_argv(peer, model, images, work / "peer-out", args), work / "peer.json",
                                 {**env, **args.peer_env}, work / "peer.log")  # fmt: skip
    config = work / "ours.toml"
    config.write_bytes(tomli_w.dumps(our_config(model, images, work / "ours-out", args)).encode())
    results["ours"] = run_probed(["tuner.cli:main", "train", "--config", str(config)], work / "ours.json", env,
                                 work / "ours.log")  # fmt: skip
    if args.variant:  # ours again with `--set` overrides, to see where a figure comes from
        sets = [f"--set={item}" for item in args.variant]
        results["variant"] = run_probed(["tuner.cli:main", "train", "--config", str(config), *sets,
                                         f"--set=train.output_dir={work / 'variant-out'}"], work / "variant.json", env,
                                        work / "variant.log")  # fmt: skip
    for result in results.values():
        result["steps"] = step_times(result, args.warmup)
        result["cpu_steps"] = step_times(result, args.warmup, "cpu_at_steps")
    return results


def table(results: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    med = {k: statistics.median(r["steps"]) for k, r in results.items()}
    cpu = {k: statistics.median(r["cpu_steps"]) for k, r in results.items()}
    rows = [
        ("step, median wall (s)", f"{med['peer']:.3f}", f"{med['ours']:.3f}",
         f"{med['peer'] / med['ours']:.2f}x faster"),
        ("step, median CPU time (s)", f"{cpu['peer']:.3f}", f"{cpu['ours']:.3f}",
         f"{cpu['peer'] / cpu['ours']:.2f}x less"),
        ("peak RSS (MiB)", *(f"{results[k]['peak_rss_bytes'] / 2**20:,.0f}" for k in ("peer", "ours")),
         f"{results['ours']['peak_rss_bytes'] / results['peer']['peak_rss_bytes']:.2f}x"),
        ("peak RSS during the training steps (MiB)",
         *(f"{max(results[k]['rss_at_steps']) / 2**20:,.0f}" for k in ("peer", "ours")),
         f"{max(results['ours']['rss_at_steps']) / max(results['peer']['rss_at_steps']):.2f}x"),
        ("whole run, wall (s)", f"{results['peer']['wall_s']:.1f}", f"{results['ours']['wall_s']:.1f}", ""),
    ]  # fmt: skip
    if results["ours"].get("cuda_peak_bytes"):
        peer, ours = results["peer"]["cuda_peak_bytes"], results["ours"]["cuda_peak_bytes"]
        rows.insert(
            2, ("peak GPU memory (MiB)", f"{peer / 2**20:,.0f}", f"{ours / 2**20:,.0f}", f"{ours / peer:.2f}x")
        )
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peer", type=Path, required=True, help="diffusers' examples/dreambooth/train_dreambooth_lora.py"
    )
    parser.add_argument("--width", type=float, default=0.25, help="fraction of SD1.5's channel widths")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per run")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run (OMP_NUM_THREADS)")
    parser.add_argument("--peer-pythonpath", default="", help="extra PYTHONPATH for the peer (e.g. torchvision)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="also run ours with this --set override (repeatable), reported on its own line",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vs_diffusers.md")
    args = parser.parse_args(argv)
    args.peer_env = {"PYTHONPATH": args.peer_pythonpath} if args.peer_pythonpath else {}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from bench.shapes import make_images, sd1_pipeline

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    if args.peer_pythonpath:
        args.peer_env = {"PYTHONPATH": os.pathsep.join([args.peer_pythonpath, str(ROOT)])}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = sd1_pipeline(work / "model", args.width)
        images = make_images(work / "images", args.images, args.resolution, captions=False)
        results = side_by_side(args.peer.resolve(), model, images, work, args, env)
        params = _unet_params(model)
    rows = table(results)
    if "variant" in results:
        v, peer = results["variant"], results["peer"]
        rows.append((f"tuner with {', '.join(args.variant)}: step (s) / peak RSS / during steps (MiB)", "",
                     f"{statistics.median(v['steps']):.3f} / {v['peak_rss_bytes'] / 2**20:,.0f} / "
                     f"{max(v['rss_at_steps']) / 2**20:,.0f}",
                     f"{statistics.median(peer['steps']) / statistics.median(v['steps']):.2f}x faster, "
                     f"{v['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}x peak RSS"))  # fmt: skip
    for row in rows:
        print(" | ".join(row))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = [
        "# LoRA side by side with diffusers' train_dreambooth_lora.py",
        "",
        f"Produced by `python bench/vs_diffusers.py {' '.join(argv or sys.argv[1:])}` on {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s) per run; load average "
        f"{load} at the end).",
        "",
        f"Model: SD1.5's topology at {args.width:g} of its widths (UNet {params / 1e6:.1f}M parameters, VAE and "
        f"12-layer CLIP text encoder to match, random weights); {args.images} images at {args.resolution}px, batch "
        f"{args.batch}, LoRA rank {args.rank} on the UNet attention projections, AdamW 1e-4, precision "
        f"{args.precision}; median of {args.steps} steps after {args.warmup} warm-up steps.",
        "",
        "| measurement | diffusers example | tuner | tuner vs example |",
        "|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in rows],
        "",
        "Each run is its own process, timed by `bench/step_probe.py` (the time between consecutive optimizer steps);",
        "with one torch thread per run, the CPU time per step is the work a step does, whatever else runs beside it.",
        "Ours reads cached latents and text embeddings and frees the VAE and the text encoder after caching; the",
        "example script encodes every batch with both. Peak RSS is the whole process, imports included.",
        "What was tried to move these figures, and what each did: [speed-levers.md](speed-levers.md).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def _unet_params(model: Path) -> int:
    from diffusers import UNet2DConditionModel

    return sum(p.numel() for p in UNet2DConditionModel.from_pretrained(model, subfolder="unet").parameters())


if __name__ == "__main__":
    main()
