"""Single-file (A1111 / Forge / ComfyUI) SD1.x, SD2.x and SDXL checkpoints: recognize, load and write them.

Reading: a `.safetensors` checkpoint is recognized by its key names (`model.diffusion_model.*` UNet,
`first_stage_model.*` VAE, `cond_stage_model.transformer.*` CLIP for SD1, `cond_stage_model.model.*` OpenCLIP
for SD2, `conditioner.embedders.{0,1}.*` for SDXL) without loading a tensor, then converted once, through
diffusers' `from_single_file` loaders, into a diffusers folder cached under `~/.cache/tuner/single-file/`
(keyed by the file's sha256), so every later reload by path (export checks, validation, class images) reads
an ordinary folder. Component configs come from the `tuner.diffusers_config` metadata the suite writes into
its own checkpoints, else from the standard configs of the recognized family built in code below. Tokenizers
are not inside a checkpoint: they come from `model.tokenizer_from` (a diffusers folder or a cached hub id),
else the Hugging Face cache, else a TunerError says how to provide one. Pickles are refused.

Writing one is `tuner.export.ldm_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
CONFIG_KEY = "tuner.diffusers_config"
"""safetensors metadata key holding the diffusers configs of the components (written by the suite)."""
ROUND_TRIP_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""Largest |difference| of UNet outputs between the trained UNet and the reloaded file, relative to the
largest |output|: exact up to kernel noise in fp32 (measured 1e-6 on the tiny models), and the rounding of the
stored dtype otherwise (measured 6e-4 in fp16, 8e-3 in bf16); a misplaced tensor gives differences of order 1."""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
PIPELINE_CLASS = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}

# Where the CLIP tokenizers of each family may sit in the Hugging Face cache: (repo id, subfolder).
CACHED_TOKENIZERS: dict[str, list[list[tuple[str, str]]]] = {
    "sd1": [[("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"), ("runwayml/stable-diffusion-v1-5",
             "tokenizer"), ("CompVis/stable-diffusion-v1-4", "tokenizer"), ("openai/clip-vit-large-patch14", "")]],
    "sd2": [[("stabilityai/stable-diffusion-2-1", "tokenizer"), ("stabilityai/stable-diffusion-2", "tokenizer"),
             ("stabilityai/stable-diffusion-2-1-base", "tokenizer"), ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "")]],
    "sdxl": [[("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"), ("openai/clip-vit-large-patch14", "")],
             [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
              ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "")]],
}  # fmt: skip
TOKENIZER_HINT = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


class MissingTokenizer(TunerError):
    """A single-file base whose CLIP tokenizer(s) were found nowhere (the message names the fix)."""


def is_single_file(name_or_path: str) -> bool:
    """Whether `name_or_path` names a checkpoint file (by suffix, existing or not), not a folder or a hub id."""
    suffix = Path(str(name_or_path)).suffix.lower()
    return suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES and not Path(name_or_path).is_dir()


def check_file(path: str | Path) -> Path:
    """The checkpoint path, after refusing a missing file and a pickle."""
    path = Path(path).expanduser()
    flag = "model.pretrained_model_name_or_path"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TunerError(
            f"{flag} = {str(path)!r}: refusing a pickle checkpoint ({path.suffix}); unpickling can run arbitrary "
            "code. Use the model's .safetensors release, or convert this file to .safetensors with a tool you trust"
        )
    if not path.is_file():
        raise TunerError(f"{flag} = {str(path)!r}: file not found")
    return path


# --- reading the header -------------------------------------------------------------------------------------
@dataclass
class Header:
    """Key names, shapes and metadata of a safetensors file, read without loading any tensor."""

    shapes: dict[str, list[int]]
    metadata: dict[str, str] = field(default_factory=dict)

    def width(self, key: str, dim: int = -1) -> int | None:
        shape = self.shapes.get(key)
        return shape[dim] if shape else None


def read_header(path: str | Path) -> Header:
    path = check_file(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            raw = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise TunerError(f"model {str(path)!r}: not a readable safetensors file ({exc})") from None
    metadata = raw.pop("__metadata__", None) or {}
    return Header({k: list(v.get("shape", [])) for k, v in raw.items()}, metadata)


@dataclass
class Recognized:
    """What a checkpoint is: family, prediction type, and the diffusers configs of its components."""

    family: str
    prediction_type: str
    configs: dict[str, Any]
    from_metadata: bool
    prediction_assumed: bool = False
    """An SD2 file that does not say v or epsilon (no metadata, no `v_pred` key)."""


def recognize(path: str | Path) -> Recognized:
    """Family (`sd1`/`sd2`/`sdxl`) and prediction type of a checkpoint, by its keys and metadata."""
    header = read_header(path)
    keys = header.shapes
    family = _family_of(path, header)
    configs = None
    if CONFIG_KEY in header.metadata:
        try:
            configs = json.loads(header.metadata[CONFIG_KEY])
        except ValueError:
            log.warning("warning: %s: unreadable %s metadata; using the standard %s configs", path, CONFIG_KEY, family)
    from_metadata = configs is not None
    spec = header.metadata.get("modelspec.prediction_type", "")
    if from_metadata:
        prediction = configs["scheduler"].get("prediction_type", "epsilon")
    elif spec in ("v", "v_prediction") or "v_pred" in keys:
        prediction = "v_prediction"
    elif spec == "epsilon" or family != "sd2":
        prediction = "epsilon"
    else:
        prediction = "v_prediction"  # the 768 px SD 2.x models; `load_pipeline` tests the UNet itself
    if configs is None:
        configs = standard_configs(family, prediction)
        in_channels = header.width(UNET_PREFIX + "input_blocks.0.0.weight", 1)
        if in_channels != configs["unet"]["in_channels"]:
            raise TunerError(
                f"model {str(path)!r}: a {family} UNet with {in_channels} input channels (an inpainting or other "
                f"variant model); only the standard {configs['unet']['in_channels']}-channel base can be trained"
            )
    assumed = not from_metadata and family == "sd2" and not spec and "v_pred" not in keys
    return Recognized(family, prediction, configs, from_metadata, assumed)


def _family_of(path: str | Path, header: Header) -> str:
    keys = header.shapes
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    transformer = any(k.startswith(p) for k in keys for p in ("joint_blocks.", "double_blocks.",
                      UNET_PREFIX + "joint_blocks.", UNET_PREFIX + "double_blocks."))  # fmt: skip
    if transformer:
        raise TunerError(
            f"model {str(path)!r}: an SD3/FLUX.1 single-file checkpoint; the suite reads only SD1.x/SD2.x/SDXL "
            "single files. Use the model's diffusers folder (or its hub id) as the base"
        )
    if not has(UNET_PREFIX + "input_blocks."):
        raise TunerError(f"model {str(path)!r}: no SD1.x/SD2.x/SDXL checkpoint recognized; found {_found(keys)}")
    if has(CLIP_PREFIX["sdxl"]) and has(OPEN_CLIP_PREFIX["sdxl"]):
        family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise TunerError(f"model {str(path)!r}: an SDXL refiner checkpoint; train on an SDXL base instead")
    elif has(OPEN_CLIP_PREFIX["sd2"]):
        family = "sd2"
    elif has(CLIP_PREFIX["sd1"]):
        family = "sd1"
    else:
        raise TunerError(
            f"model {str(path)!r}: a UNet without a text encoder the suite knows (CLIP under "
            f"'cond_stage_model.transformer.', OpenCLIP under 'cond_stage_model.model.' or SDXL's "
            f"'conditioner.embedders.'); found {_found(keys)}"
        )
    if not has(VAE_PREFIX):
        raise TunerError(
            f"model {str(path)!r}: a {family} checkpoint without its VAE ('first_stage_model.*'); use a full "
            "checkpoint (UNet, VAE and text encoders)"
        )
    return family


def _found(keys: dict[str, Any]) -> str:
    groups: dict[str, int] = {}
    for key in keys:
        head = ".".join(key.split(".")[:2]) if key.count(".") >= 2 else key.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    top = sorted(groups.items(), key=lambda kv: -kv[1])[:6]
    return f"{len(keys)} tensors, " + ", ".join(f"{n} under '{h}'" for h, n in top) if keys else "no tensors"


# --- standard configs of the families (used when the file carries none) ---------------------------------------
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def standard_configs(family: str, prediction: str) -> dict[str, Any]:
    """The diffusers configs of the released SD 1.5, SD 2.1 and SDXL 1.0 base models."""
    clip_l = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
              "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # fmt: skip
    vae = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
           "sample_size": 512, "scaling_factor": 0.18215}  # fmt: skip
    unet = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "norm_num_groups": 32, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [320, 640, 1280, 1280]}  # fmt: skip
    if family == "sd1":
        unet.update(sample_size=64, attention_head_dim=8, cross_attention_dim=768)
        scheduler = {"_class_name": "PNDMScheduler", **_BETAS, "skip_prk_steps": True, "steps_offset": 1,
                     "set_alpha_to_one": False, "clip_sample": False}  # fmt: skip
        return {"_class_name": PIPELINE_CLASS[family], "unet": unet, "vae": vae, "text_encoder": clip_l,
                "scheduler": {**scheduler, "prediction_type": prediction}}  # fmt: skip
    if family == "sd2":
        size = 96 if prediction == "v_prediction" else 64
        unet.update(sample_size=size, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                    use_linear_projection=True, upcast_attention=prediction == "v_prediction")  # fmt: skip
        open_clip_h = {**clip_l, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                       "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}  # fmt: skip
        scheduler = {"_class_name": "DDIMScheduler", **_BETAS, "steps_offset": 1, "set_alpha_to_one": False,
                     "clip_sample": False, "prediction_type": prediction}  # fmt: skip
        return {"_class_name": PIPELINE_CLASS[family], "unet": unet, "vae": {**vae, "sample_size": size * 8},
                "text_encoder": open_clip_h, "scheduler": scheduler}  # fmt: skip
    unet.update(sample_size=128, attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)  # fmt: skip
    big_g = {**clip_l, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
             "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}  # fmt: skip
    scheduler = {"_class_name": "EulerDiscreteScheduler", **_BETAS, "steps_offset": 1, "timestep_spacing": "leading",
                 "interpolation_type": "linear", "prediction_type": prediction}  # fmt: skip
    return {"_class_name": PIPELINE_CLASS[family], "unet": unet,
            "vae": {**vae, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
            "text_encoder": clip_l, "text_encoder_2": big_g, "scheduler": scheduler}  # fmt: skip


# --- loading as a base ---------------------------------------------------------------------------------------
def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("TUNER_SINGLE_FILE_CACHE", base / "tuner" / "single-file"))


_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 of the file, remembered by path, size and mtime (in the process and in the cache folder's
    `hashes.json`), so a multi-GB checkpoint is read once, not at every run."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    index_file = cache_root() / "hashes.json"
    name = f"{key[0]}|{key[1]}|{key[2]}"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if name not in index:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        index[name] = digest.hexdigest()
        try:  # best effort: a lost race only costs another read of the file
            index_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_file.with_name(f".hashes-{os.getpid()}.json")
            tmp.write_text(json.dumps(index, indent=0), encoding="utf-8")
            os.replace(tmp, index_file)
        except OSError:
            pass
    _HASHES[key] = index[name]
    return _HASHES[key]


def converted_folder(path: str | Path) -> Path:
    """Where the diffusers conversion of the checkpoint lives (whether or not it exists yet)."""
    path = check_file(path)
    return cache_root() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)[:60]}-{file_hash(path)[:16]}"


def cached_conversion(path: str | Path) -> Path | None:
    folder = converted_folder(path)
    return folder if (folder / "model_index.json").is_file() else None


def convert(path: str | Path, tokenizer_from: str | None = None) -> Path:
    """The checkpoint as a diffusers folder: the cached conversion, or a new one made through diffusers'
    `from_single_file`. A `tokenizer_from` other than the one a cached conversion used converts again."""
    path = check_file(path)
    folder = converted_folder(path)
    info_file = folder / "tuner-single-file.json"
    if _converted_with(info_file, tokenizer_from):
        return folder
    pipe = load_pipeline(path, tokenizer_from)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info = {"source": str(path.resolve()), "sha256": file_hash(path)}
        info["tokenizer_from"] = _tokenizer_key(tokenizer_from)
        (tmp / "tuner-single-file.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if _converted_with(info_file, tokenizer_from):  # another process (a DDP rank) finished it meanwhile
            return folder
        if folder.exists():  # converted before with other tokenizers: move it aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}-stale-", dir=folder.parent))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a DDP rank) finished the same conversion first: use its folder
            if not info_file.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s into the diffusers folder %s", path, folder)
    return folder


def _converted_with(info_file: Path, tokenizer_from: str | None) -> bool:
    """Whether a finished conversion exists that used `tokenizer_from` (any, when it is None)."""
    if not info_file.is_file():
        return False
    info = json.loads(info_file.read_text(encoding="utf-8"))
    return tokenizer_from is None or info.get("tokenizer_from") == _tokenizer_key(tokenizer_from)


def _tokenizer_key(tokenizer_from: str | None) -> str | None:
    if tokenizer_from is None:
        return None
    local = Path(tokenizer_from).expanduser()
    return str(local.resolve()) if local.exists() else tokenizer_from


def load_pipeline(path: str | Path, tokenizer_from: str | None = None, torch_dtype: torch.dtype = torch.float32):
    """A stock diffusers pipeline (`StableDiffusionPipeline` / `StableDiffusionXLPipeline`) of the checkpoint,
    loaded offline through diffusers' `from_single_file` with configs from the file or built in code."""
    import diffusers

    path = check_file(path)
    found = recognize(path)
    configs = found.configs
    encoder_names = ["text_encoder", "text_encoder_2"] if found.family == "sdxl" else ["text_encoder"]
    tokenizers = find_tokenizers(path, found.family, tokenizer_from)
    from safetensors import safe_open

    prefixes = (*CLIP_PREFIX.values(), *OPEN_CLIP_PREFIX.values())
    with safe_open(str(path), framework="pt") as f:  # only the text encoders' tensors: the rest is diffusers'
        checkpoint = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}  # noqa: SIM118
    encoders = [encoder.to(torch_dtype) for encoder in _text_encoders(path, found, checkpoint)]
    del checkpoint
    for name, tokenizer, encoder in zip(encoder_names, tokenizers, encoders):
        rows = encoder.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            raise TunerError(
                f"model {str(path)!r}: the {name} tokenizer from {tokenizer_from or 'the Hugging Face cache'} has "
                f"{len(tokenizer)} tokens but the checkpoint's {name} embeds {rows}; set model.tokenizer_from to a "
                f"diffusers folder of the same {found.family} model"
            )
    scheduler_config = dict(configs["scheduler"])
    scheduler_cls = getattr(diffusers, scheduler_config.pop("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
    scheduler = scheduler_cls.from_config(scheduler_config)
    extra: dict[str, Any] = {"scheduler": scheduler}
    for name, tokenizer, encoder in zip(encoder_names, tokenizers, encoders):
        extra[name] = encoder
        extra[name.replace("text_encoder", "tokenizer")] = tokenizer
    if found.family != "sdxl":
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with tempfile.TemporaryDirectory(prefix="tuner-single-file-config-") as config_dir:
        _write_config_folder(Path(config_dir), configs)
        pipeline_cls = getattr(diffusers, PIPELINE_CLASS[found.family])
        try:
            pipe = pipeline_cls.from_single_file(
                str(path), config=config_dir, local_files_only=True, torch_dtype=torch_dtype, **extra
            )
        except TunerError:
            raise
        except Exception as exc:  # noqa: BLE001 - a file that does not fit its configs is one clear message
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            where = "its tuner.diffusers_config metadata" if found.from_metadata else f"the standard {found.family}"
            raise TunerError(
                f"model {str(path)!r}: diffusers could not load it as a {found.family} checkpoint with {where} "
                f"configs ({reason})"
            ) from None
    if found.prediction_assumed:
        prediction = "v_prediction" if predicts_v(pipe.unet) else "epsilon"
        pipe.scheduler.register_to_config(prediction_type=prediction)
        log.info("%s: an SD2 checkpoint without a prediction type; its UNet behaves as %s", path, prediction)
    return pipe


def predicts_v(unet: Any) -> bool:
    """A1111's test of an SD 2.x UNet (`is_using_v_parameterization_for_sd2`): on a flat input at t=999, an
    epsilon model predicts about the input, a v model about its negative."""
    x = torch.ones(1, unet.config.in_channels, 8, 8, dtype=unet.dtype) * 0.5
    context = torch.ones(1, 77, unet.config.cross_attention_dim, dtype=unet.dtype) * 0.5
    with torch.no_grad():
        out = unet(x, torch.tensor([999]), context).sample
    return (out - x).float().mean().item() < -1


def _write_config_folder(folder: Path, configs: dict[str, Any]) -> None:
    """A weightless diffusers folder (model_index.json + component configs) for `from_single_file(config=...)`."""
    index: dict[str, Any] = {"_class_name": configs["_class_name"], "_diffusers_version": "0.0.0"}
    classes = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
               "scheduler": ("diffusers", configs["scheduler"].get("_class_name", "DDIMScheduler"))}  # fmt: skip
    if "text_encoder_2" in configs:
        classes.update(text_encoder_2=("transformers", "CLIPTextModelWithProjection"),
                       tokenizer_2=("transformers", "CLIPTokenizer"))  # fmt: skip
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    index.update({name: list(value) for name, value in classes.items()})
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if name not in configs:
            continue
        sub = folder / name
        sub.mkdir(parents=True)
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        (sub / filename).write_text(json.dumps(configs[name], indent=2), encoding="utf-8")
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")


def _text_encoders(path: Path, found: Recognized, checkpoint: dict[str, torch.Tensor]) -> list[Any]:
    """The text encoder(s), converted with diffusers' own CLIP / OpenCLIP converters at the family's prefixes
    (diffusers' pipeline loader picks the prefix by width, which two equally wide encoders defeat)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def build(name: str, cls) -> Any:
        from accelerate import init_empty_weights

        config = {k: v for k, v in found.configs[name].items() if k not in ("architectures", "_name_or_path")}
        with init_empty_weights():  # parameters come from the file (`assign=True` below); buffers are real
            return cls(CLIPTextConfig(**config))

    def fill(model: Any, state: dict[str, torch.Tensor], name: str) -> Any:
        if not hasattr(model, "text_model"):  # CLIPTextModel is flat in transformers >= 5.6
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        state.pop("embeddings.position_ids", None)
        state.pop("text_model.embeddings.position_ids", None)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:  # shapes that do not fit the config
            reason = str(exc).strip().splitlines()[-1].strip()[:200]
            where = "its tuner.diffusers_config metadata" if found.from_metadata else f"the standard {found.family}"
            raise TunerError(
                f"model {str(path)!r}: its {name} does not fit {where} text encoder config ({reason}); the suite "
                "reads the released SD 1.x / 2.x / SDXL architectures and its own checkpoints"
            ) from None
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise TunerError(
                f"model {str(path)!r}: its {name} does not fit the {found.family} text encoder config "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return model.eval()

    if found.family == "sd1":
        state = convert_ldm_clip_checkpoint(checkpoint)
        return [fill(build("text_encoder", CLIPTextModel), state, "text_encoder")]
    if found.family == "sd2":
        model = build("text_encoder", CLIPTextModel)
        state = convert_open_clip_checkpoint(model, checkpoint, prefix=OPEN_CLIP_PREFIX["sd2"])
        return [fill(model, state, "text_encoder")]
    first = {k: v for k, v in checkpoint.items() if k.startswith(CLIP_PREFIX["sdxl"])}
    state = convert_ldm_clip_checkpoint(first, remove_prefix=CLIP_PREFIX["sdxl"])
    model_2 = build("text_encoder_2", CLIPTextModelWithProjection)
    state_2 = convert_open_clip_checkpoint(model_2, checkpoint, prefix=OPEN_CLIP_PREFIX["sdxl"])
    return [
        fill(build("text_encoder", CLIPTextModel), state, "text_encoder"),
        fill(model_2, state_2, "text_encoder_2"),
    ]


def find_tokenizers(path: str | Path, family: str, tokenizer_from: str | None = None) -> list[Any]:
    """The CLIP tokenizer(s) of a single-file base: from `tokenizer_from` (a local diffusers folder or a cached
    hub id), else from the Hugging Face cache, else a TunerError naming the file and the fix."""
    subfolders = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
    if tokenizer_from:
        local = Path(tokenizer_from).expanduser()
        source = str(local) if local.exists() else tokenizer_from
        out = []
        for sub in subfolders:
            if local.is_dir() and not (local / sub).is_dir() and (local / "vocab.json").is_file():
                sub = ""  # a bare tokenizer folder (serves every encoder)
            tokenizer = _tokenizer(source, sub)
            if tokenizer is None:
                raise TunerError(
                    f"model.tokenizer_from = {tokenizer_from!r}: no CLIP tokenizer in '{sub or '.'}/' for the "
                    f"single-file base {str(path)!r}; give a local diffusers folder of a {family} model (with "
                    f"{' and '.join(s + '/' for s in subfolders)}) or a hub id already in the Hugging Face cache"
                )
            out.append(tokenizer)
        return out
    out = []
    for candidates in CACHED_TOKENIZERS[family]:
        tokenizer = next((t for repo, sub in candidates if (t := _tokenizer(repo, sub)) is not None), None)
        if tokenizer is None:
            hint = TOKENIZER_HINT[family]
            raise MissingTokenizer(
                f"model {str(path)!r}: a single-file {family} checkpoint holds no tokenizer, and none is in the "
                f"Hugging Face cache. Set model.tokenizer_from to a local diffusers folder of a {family} model "
                f"(--set model.tokenizer_from=PATH), or fetch the tokenizer once: "
                f"`hf download {hint} --include 'tokenizer*/*'`"
            )
        out.append(tokenizer)
    return out


def _tokenizer(source: str, subfolder: str) -> Any:
    """A CLIP tokenizer from a local folder or the Hugging Face cache (never the network), or None when its
    files are not there (transformers would otherwise build an empty one)."""
    from transformers import CLIPTokenizer

    names = ("vocab.json", "tokenizer.json")
    local = Path(source) / subfolder
    if Path(source).is_dir():
        if not any((local / name).is_file() for name in names):
            return None
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = [try_to_load_from_cache(source, f"{subfolder}/{n}" if subfolder else n) for n in names]
        except Exception:  # noqa: BLE001 - not a valid repo id (a missing local path, say): not there
            return None
        if not any(isinstance(c, str) for c in cached):
            return None
    try:
        return CLIPTokenizer.from_pretrained(source, subfolder=subfolder or None, local_files_only=True)
    except Exception:  # noqa: BLE001 - unreadable files count as absent
        return None
