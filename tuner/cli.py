"""The `tuner` command: argument parsing only; every command calls into the library.

Exit codes: 0 done, 1 failed (the message says why), 2 usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import sys
from collections.abc import Callable

from tuner.errors import TunerError

Handler = Callable[[argparse.Namespace], int]


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="preset name (see `tuner presets list`)")
    p.add_argument("--config", help="TOML config file (overrides the preset)")
    p.add_argument("--model", help="base model: diffusers folder or hub id (model.pretrained_model_name_or_path)")
    p.add_argument("--data", help="training data folder or dataset id (data.path)")
    p.add_argument("--output-dir", help="run folder (train.output_dir)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="override one field")


def _overrides(args: argparse.Namespace) -> dict:
    out: dict = {}
    if args.model:
        out.setdefault("model", {})["pretrained_model_name_or_path"] = args.model
    if args.data:
        out.setdefault("data", {})["path"] = args.data
    if args.output_dir:
        out.setdefault("train", {})["output_dir"] = args.output_dir
    return out


def _load(args: argparse.Namespace):
    from tuner.config import load_config

    return load_config(args.config, args.preset, args.set, _overrides(args), vram=getattr(args, "vram", None))


# --- commands ----------------------------------------------------------------------------------------


MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def check_model_source(name: str) -> None:
    """What a new user gets wrong about `--model`, said before any model loads: a mistyped `builtin:` name (with the
    built-in names), and a local path that does not exist (instead of the hub's complaint about repo ids)."""
    from pathlib import Path

    from tuner.data.sources import _looks_like_hub_id
    from tuner.errors import ConfigError
    from tuner.models import BUILTIN_DIR, BUILTIN_PREFIX, has_builtin_model

    field = f"model.pretrained_model_name_or_path = {name!r}"
    if name.startswith(BUILTIN_PREFIX):
        wanted = name[len(BUILTIN_PREFIX) :]
        shipped = (
            sorted(p.name for p in BUILTIN_DIR.iterdir() if has_builtin_model(p.name)) if BUILTIN_DIR.is_dir() else []
        )
        if shipped and wanted not in shipped:
            close = difflib.get_close_matches(wanted, shipped, n=1, cutoff=0.5)
            hint = f"did you mean {BUILTIN_PREFIX}{close[0]}? " if close else ""
            names = ", ".join(BUILTIN_PREFIX + n for n in shipped)
            raise ConfigError(f"{field}: no such built-in model; {hint}built-in models: {names}")
        return
    local = Path(name).expanduser()
    if local.exists():
        return  # a folder or a file: the loader says what it is and what it lacks
    if name.lower().endswith(MODEL_FILE_SUFFIXES):
        raise ConfigError(f"{field}: no such file")
    if not _looks_like_hub_id(name):
        raise ConfigError(
            f"{field}: no such local folder (and not a hub id, which looks like `org/name`); give a diffusers "
            "pipeline folder (`tuner make-tiny DIR` writes a tiny one) or a hub id"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from tuner.data.check import check_paths
    from tuner.loop import train

    config = _load(args)
    check_model_source(config.model.pretrained_model_name_or_path)
    check_paths(config)
    train(config, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from tuner.data import check_data_main

    if args.path and args.data and args.path != args.data:
        raise TunerError(f"check-data: PATH {args.path!r} and --data {args.data!r}: give the folder once")
    path = args.path or args.data
    return check_data_main(path, config_file=args.config, sets=args.set, as_json=args.json, preset=args.preset,
                           vram=args.vram)  # fmt: skip


def cmd_presets(args: argparse.Namespace) -> int:
    from tuner.config import explain
    from tuner.presets import describe_extras, find_preset, list_presets, preset_table, read_preset

    if args.action == "list":
        print(preset_table(list_presets()))
        return 0
    if not args.name:
        raise TunerError("tuner presets show NAME: give a preset name (see `tuner presets list`)")
    info = find_preset(args.name)
    print(f"# {info.path}")
    if not args.explain:
        print(info.path.read_text(encoding="utf-8"))
        if args.vram is not None:
            from tuner.memory import preset_estimate

            print("\n".join(preset_estimate(args.name, args.vram)))
        return 0
    from tuner.config import load_config

    for key, value, doc in explain(load_config(preset=args.name, vram=args.vram)):
        print(f"{key} = {value!r}")
        if doc:
            print(f"    {doc}")
    print("\n".join(describe_extras(read_preset(args.name))))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tuner.demo import run_demo

    run_demo(args.output_dir, model=args.model, steps=args.steps)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from tuner.tiny import make_tiny

    path = make_tiny(args.directory, args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} pipeline to {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from tuner.guidance import GuidanceSchedule
    from tuner.sampling import Embedding, sample

    if len(args.token) > len(args.embedding):
        raise TunerError("--token: at most one per --embedding")
    check_model_source(args.model)
    tokens = args.token + [None] * (len(args.embedding) - len(args.token))
    result = sample(
        args.model,
        args.prompt,
        args.seeds,
        args.out,
        lora=args.lora,
        lora_scales=args.lora_scale,
        embeddings=[Embedding(f, t) for f, t in zip(args.embedding, tokens)],
        vae=args.vae,
        scheduler=args.scheduler,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance=GuidanceSchedule(args.guidance_schedule, args.guidance_rescale, args.guidance_interval),
        init_image=args.init_image,
        mask=args.mask,
        strengths=args.strength,
        width=args.width,
        height=args.height,
        write_images=args.command == "sample",
    )
    print(f"wrote {len(result.images)} images" + (f" and the grid {result.grid}" if result.grid else ""))
    return 0


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers folder, hub id or builtin:NAME")
    p.add_argument("--prompt", action="append", required=True, help="one grid row; repeat for more")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one column per seed")
    p.add_argument("--lora", action="append", default=[], help="LoRA .safetensors (diffusers or kohya) or run folder")
    p.add_argument("--lora-scale", type=float, nargs="+", default=[1.0], help="adapter scales; 0 = base model")
    p.add_argument("--embedding", action="append", default=[], help="textual-inversion .safetensors")
    p.add_argument("--token", action="append", default=[], help="token of the Nth --embedding (default: from file)")
    p.add_argument("--vae", help="AutoencoderKL folder to use instead of the model's")
    p.add_argument("--scheduler", "--sampler", nargs="+", help="A1111 sampler names ('DPM++ 2M Karras') or diffusers "
                   "scheduler classes; several: one column group each")  # fmt: skip
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int, default=25, help="inference steps")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--guidance-schedule", default="constant", choices=["constant", "linear", "cosine"],
                   help="CFG scale over the steps (linear/cosine rise from 1, mean = --guidance-scale)")  # fmt: skip
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale phi (0 = plain CFG)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("START", "END"),
                   help="guide only within these fractions of the steps")  # fmt: skip
    p.add_argument("--init-image", help="render img2img rows from this image instead of from noise")
    p.add_argument("--strength", type=float, nargs="+", default=[0.6], help="img2img/inpaint strengths (0-1)")
    p.add_argument("--mask", help="inpainting mask for --init-image (white = repaint)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(handler=cmd_sample)


def cmd_export(args: argparse.Namespace) -> int:
    from tuner.export.convert import export
    from tuner.public import normal_mode

    path = export(args.input, args.to, args.out, model=args.model, scale=args.scale, name=args.name)
    normal_mode(path)  # safetensors writes 0600; an exported file is for other tools and users to read
    print(f"wrote {path}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from tuner.ui.server import serve

    serve(args.host, args.port, args.runs_dir, args.auth, args.max_upload_mb)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from tuner import hub

    return hub.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuner",
        description="Fine-tune latent diffusion models: DreamBooth, LoRA, textual inversion, VAE decoder.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train from a preset and/or a TOML config")
    _config_arguments(p)
    p.add_argument("--vram", type=float, metavar="GB", help="GPU memory: picks the preset's largest tier not above it")
    p.add_argument(
        "--resume", help="continue a run: `latest`, `latest-good` (newest intact checkpoint) or a checkpoint folder"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished or interrupted run in the output folder (refused without it; its cache is kept)",
    )
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("check-data", help="check a data set: what training will use, skip or refuse, and why")
    p.add_argument("path", nargs="?", help="image folder, kohya .toml, saved `datasets` folder or hub id (data.path)")
    p.add_argument("--data", dest="data", help="the same as PATH, spelled as for `tuner train`")
    p.add_argument("--preset", help="judge the data as this preset trains (its resolution, captions, class set)")
    p.add_argument("--vram", type=float, metavar="GB", help="with --preset: its memory tier (resolution may differ)")
    p.add_argument("--config", help="run config TOML (any method, or only a [data] table)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="override one field")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_check_data)

    p = sub.add_parser("presets", help="list presets or show one")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", help="preset to show")
    p.add_argument("--explain", action="store_true", help="every field with its value and meaning")
    p.add_argument("--vram", type=float, metavar="GB", help="a tier: its memory estimate (--explain: values)")
    p.set_defaults(handler=cmd_presets)

    _sample_arguments(sub.add_parser("sample", help="render prompts x seeds x LoRA scales: PNGs and a grid"))
    _sample_arguments(sub.add_parser("grid", help="like sample, but write only the labeled grid.png"))

    p = sub.add_parser("export", help="convert a LoRA between diffusers and kohya formats, or fuse it into a pipeline")
    p.add_argument("input", metavar="INPUT", help="LoRA .safetensors file (diffusers/peft or kohya keys)")
    p.add_argument("--to", required=True, choices=["diffusers", "kohya", "fused"], help="target format")
    p.add_argument("--out", required=True, help="output .safetensors file or folder (a folder for fused)")
    p.add_argument("--model", help="base model; needed to read kohya files and to fuse")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA scale when fusing")
    p.add_argument("--name", help="output file stem")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("publish", help="upload a finished run (artifacts, model card, grids) to a model hub")
    p.add_argument("run_dir", metavar="RUN_DIR", help="finished run folder (holds artifact.json)")
    p.add_argument("--repo-id", help="target repository user/name (default: hub.repo_id of the run)")
    p.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    p.add_argument("--dry-run", action="store_true", help="write the exact upload folder and list it; upload nothing")
    p.add_argument("--endpoint", help="hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--base-model", metavar="ID",
                   help="hub id (org/name) of the base when it was trained from a local folder or file; the card's "
                        "base_model (default: hub.base_model of the run)")  # fmt: skip
    p.set_defaults(handler=cmd_publish)

    p = sub.add_parser("demo", help="personalize the built-in micro model from the example photos, and show it")
    p.add_argument("--output-dir", default="tuner-demo", help="run folder (default: ./tuner-demo)")
    p.add_argument("--model", help="another base model (default: builtin:micro)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("ui", help="the personalization workflow in a browser: photos, task, train, compare, publish")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; others need --auth)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--runs-dir", default="tuner-runs", help="folder of the runs (default: ./tuner-runs)")
    p.add_argument("--auth", metavar="USER:PASSWORD|TOKEN_FILE", help="require HTTP credentials (needed off loopback)")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest photo accepted (default: 25)")
    p.set_defaults(handler=cmd_ui)

    p = sub.add_parser("make-tiny", help="write a tiny random pipeline (for tests and trying things out)")
    p.add_argument("directory")
    p.add_argument(
        "--family",
        # tuner.tiny.FAMILIES (not imported: it loads diffusers)
        choices=["sd1", "sd2", "sdxl", "sd3", "flux", "zimage"],
        default="sd1",
        help="sd1, sd2 (v-prediction), sdxl, sd3 (SD3.5-shaped MMDiT, 3 text encoders), flux (FLUX.1-dev-shaped) "
        "or zimage (Z-Image-shaped, Qwen3 encoder); default: sd1",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args)
    except TunerError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`tuner presets list | head -1`): stop quietly, and point stdout at /dev/null so
        # the interpreter's final flush does not fail again. 141 = 128 + SIGPIPE, as a shell reports such a tool.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        from tuner.storage import is_no_space

        if args.verbose or not (is_no_space(exc) or exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot write{where}: {exc.strerror}; nothing else was changed", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
