"""Regenerate the micro base model end to end with the suite's own trainers and presets.

render the training scenes and the pattern corpus -> `tuner.micro.init` (random SD1-architecture pipeline) ->
`tuner train --preset micro-vae` (whole autoencoder, scenes + patterns) -> the trained VAE, with its measured latent
scale, goes into the pipeline -> `tuner train --preset micro-base` (UNet from random init, captioned) -> the final
diffusers folder. Each stage runs as the plain command it prints, by default as two single-threaded processes over
both cores (DDP over gloo; on 2 shared cores one thread per process is several times faster than two). Optional
stage 3, beside a one-process stage 2: `micro-vae` as decoder-only fine-tuning (frozen encoder, so the UNet's latents
keep their meaning).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA_SEED = 1
STATS_IMAGES = 256
PATTERN_SEED, PATTERN_REPEATS = 7, 2
"""Stage 1 also learns from the world's `pattern` kind (stripes, checks, noise, glyphs), twice per epoch: a VAE
trained on flat shapes alone decodes any two-tone pattern, such as a personalization subject's, as its average."""

DECODER_SETS = ["decoder.train_whole_vae=false", "optimizer.learning_rate=1e-3", "train.checkpointing_steps=400"]
"""Stage 3 is the micro-vae preset as plain decoder fine-tuning: the encoder, hence the UNet's latents, stays put."""


def pattern_subset(folder: Path) -> str:
    """The `--set` that adds the pattern corpus to stage 1's data (a TOML inline table; JSON quoting is valid TOML)."""
    return f"data.subsets=[{{path = {json.dumps(str(folder))}, num_repeats = {PATTERN_REPEATS}}}]"


def tuner_command(
    preset: str, model: Path, data: Path, out: Path, steps: int, extra: list[str], processes: int = 1
) -> list[str]:
    """`tuner train` for one stage; with several processes under `accelerate launch` (DDP over gloo on CPU)."""
    sets = [f"train.max_train_steps={steps}", *extra]
    launcher = ["-m", "tuner.cli"]
    if processes > 1:
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), *launcher]
    return [sys.executable, *launcher, "train", "--preset", preset, "--model", str(model), "--data", str(data),
            "--output-dir", str(out), *(a for s in sets for a in ("--set", s))]  # fmt: skip


def render_once(folder: Path, kind: str, count: int, seed: int) -> str:
    """Render a set unless `folder` holds one already (a killed build resumes); returns the command it stands for."""
    from tuner.micro.render import render_set

    if not (folder / "labels.jsonl").is_file():
        render_set(folder, kind, count, seed=seed)
    return f"python -m tuner.micro.render {folder} --kind {kind} --count {count} --seed {seed}"


def split_batch(sets: list[str], global_batch: int, processes: int) -> list[str]:
    """The preset's (or a --*-set's) batch is the global one: each process gets its share, stated once."""
    per_process = f"train.train_batch_size={max(1, global_batch // processes)}"
    return [*(s for s in sets if s.partition("=")[0].strip() != "train.train_batch_size"), per_process]


def shown(command: list[str]) -> str:
    """The command as a user would type it."""
    text = shlex.join(command[1:]).replace("-m accelerate.commands.launch", "accelerate launch")
    return text.replace("-m tuner.cli ", "tuner ", 1) if "accelerate" not in text else text


def start_stage(name: str, command: list[str], log: Path) -> subprocess.Popen:
    """Start one `tuner train` command, single-threaded per process, with its output in `log`."""
    print(f"[{name}] {shown(command)}\n[{name}] log: {log}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def finish_stage(name: str, process: subprocess.Popen, start: float, log: Path) -> float:
    """Wait for a stage; returns its wall seconds."""
    if process.wait():
        raise SystemExit(f"[{name}] failed (exit {process.returncode}); see {log}")
    seconds = time.time() - start
    print(f"[{name}] done in {seconds / 60:.1f} min", flush=True)
    return seconds


def latent_scale(vae_dir: Path, data_dir: Path) -> float:
    """1 / std of the trained encoder's latent means over training images: SD's `scaling_factor` convention."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from tuner.micro.evaluate import encode_means

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    paths = sorted(data_dir.glob("*.png"))[:STATS_IMAGES]
    return float(1.0 / encode_means(vae, [Image.open(p).convert("RGB") for p in paths]).std())


def install_vae(pipe_dir: Path, vae_dir: Path, scale: float | None) -> None:
    """Replace the pipeline's VAE by the trained one, with the measured scaling factor (None: keep its own)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir)
    if scale is not None:
        vae.register_to_config(scaling_factor=round(scale, 5))
    shutil.rmtree(pipe_dir / "vae", ignore_errors=True)
    vae.save_pretrained(pipe_dir / "vae", safe_serialization=True)


def assemble(pipe_dir: Path, unet_run: Path, vae_dir: Path, out_dir: Path) -> None:
    """The final folder: trained UNet + text encoder, the refined VAE, tokenizer and DDIM from `pipe_dir`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None, requires_safety_checker=False)
    trained = unet_run / "pipeline" if (unet_run / "pipeline" / "model_index.json").is_file() else unet_run
    pipe.unet = UNet2DConditionModel.from_pretrained(trained / "unet")
    pipe.text_encoder = CLIPTextModel.from_pretrained(trained / "text_encoder")
    pipe.vae = AutoencoderKL.from_pretrained(vae_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuner.micro.build", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="work folder; the final model lands in OUT_DIR/micro")
    parser.add_argument("--images", type=int, default=8000, help="training images rendered (seed 1)")
    parser.add_argument(
        "--patterns", type=int, default=2000, help="pattern images (seed 7) stage 1 also learns from; 0: none"
    )
    parser.add_argument("--vae-steps", type=int, help="stage-1 steps (default: the micro-vae preset's)")
    parser.add_argument("--unet-steps", type=int, help="stage-2 steps (default: the micro-base preset's)")
    parser.add_argument(
        "--decoder-steps", type=int, default=0, help="stage-3 steps (decoder only, frozen encoder; 0: skipped)"
    )
    parser.add_argument("--decoder-set", action="append", default=[], metavar="K=V", help="extra --set for stage 3")
    parser.add_argument("--vae-set", action="append", default=[], metavar="K=V", help="extra --set for stage 1")
    parser.add_argument("--unet-set", action="append", default=[], metavar="K=V", help="extra --set for stage 2")
    parser.add_argument("--vae-processes", type=int, default=2, help="stage-1 processes (DDP over gloo)")
    parser.add_argument(
        "--unet-processes", type=int, help="stage-2 processes (DDP over gloo; default 2, or 1 beside stage 3)"
    )
    parser.add_argument(
        "--vae",
        type=Path,
        metavar="DIR",
        help="start from this trained AutoencoderKL folder (scaling_factor kept), skipping stage 1",
    )
    parser.add_argument("--install", action="store_true", help="also copy the result to tuner/micro/weights/micro")
    args = parser.parse_args(argv)
    from tuner.config import load_config
    from tuner.micro.init import build_micro_pipeline
    from tuner.models import BUILTIN_DIR

    began, out = time.time(), args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data, init, pipe = out / "data", out / "init", out / "pipe"
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    commands = [render_once(data, "base", args.images, DATA_SEED)]
    vae_sets = list(args.vae_set)
    if args.patterns and not args.vae:
        commands.append(render_once(out / "patterns", "pattern", args.patterns, PATTERN_SEED))
        vae_sets.insert(0, pattern_subset(out / "patterns"))
    commands.append(f"python -m tuner.micro.init {init}")
    if not (init / "model_index.json").is_file():
        build_micro_pipeline(seed=0).save_pretrained(init, safe_serialization=True)
    # a decoder stage runs beside the unet: it keeps the stage-1 encoder, so the latents the UNet learns stay valid.
    stages = [
        [] if args.vae else [("vae", "micro-vae", init, args.vae_steps, vae_sets, args.vae_processes)],
        [
            ("unet", "micro-base", pipe, args.unet_steps, [f"data.cache_dir={out / 'cache'}", *args.unet_set],
             args.unet_processes or (1 if args.decoder_steps else 2)),
            *([("decoder", "micro-vae", pipe, args.decoder_steps, [*DECODER_SETS, *args.decoder_set], 1)]
              if args.decoder_steps else []),
        ],
    ]  # fmt: skip
    for group in stages:
        running = []
        for name, preset, model, steps, extra, processes in group:
            defaults = load_config(preset=preset, sets=extra).train
            steps = steps or defaults.max_train_steps
            if processes > 1:
                extra = split_batch(extra, defaults.train_batch_size, processes)
            command = tuner_command(preset, model, data, out / name, steps, extra, processes)
            commands.append("OMP_NUM_THREADS=1 " + shown(command) + (" &" if len(group) > 1 else ""))
            if (out / name / "artifact.json").is_file() and name in timings:
                print(f"[{name}] reusing the finished run in {out / name}", flush=True)
                continue
            info = {"name": name, "preset": preset, "steps": steps, "batch": defaults.train_batch_size}
            running.append((info, start_stage(name, command, out / f"{name}.log"), time.time()))
        for info, process, start in running:
            timings[info["name"]] = {
                **info,
                "seconds": finish_stage(info["name"], process, start, out / f"{info['name']}.log"),
            }
            timings_path.write_text(json.dumps(timings, indent=1))
        if not group or group[0][0] == "vae":
            vae_dir = args.vae or out / "vae" / "vae"
            shutil.rmtree(pipe, ignore_errors=True)
            shutil.copytree(init, pipe)
            scale = latent_scale(vae_dir, data) if not args.vae else None
            install_vae(pipe, vae_dir, scale)
            factor = f"{scale:.5f}" if scale else "its own"
            print(f"[vae] {vae_dir}, latent scaling factor {factor}", flush=True)
            commands.append(f"# copy {vae_dir} into {pipe / 'vae'} with scaling_factor = {factor}")
    vae_final = out / "decoder" / "vae" if args.decoder_steps else pipe / "vae"
    assemble(pipe, out / "unet", vae_final, out / "micro")
    commands.append(f"# assemble {out / 'micro'}: {pipe} with unet/ and text_encoder/ from {out / 'unet'} and vae/ "
                    f"from {vae_final.parent}")  # fmt: skip
    summary = {
        "stages": [timings[name] for name in ("vae", "unet", "decoder") if name in timings],
        "wall_seconds": time.time() - began,  # this invocation: renders, stages not reused, scale and assembly
        "commands": [
            "python -m tuner.micro.build " + shlex.join(sys.argv[1:] if argv is None else argv),
            "# which runs:",
            *commands,
        ],
    }
    timings_path.write_text(json.dumps({**timings, **summary}, indent=1))
    minutes = ", ".join(f"{t['name']} {t['seconds'] / 60:.1f} min" for t in summary["stages"])
    print(f"wrote {out / 'micro'} ({minutes}; {summary['wall_seconds'] / 60:.1f} min in all)")
    if args.install:
        target = BUILTIN_DIR / "micro"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(out / "micro", target)
        print(f"installed it as builtin:micro ({target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
