"""Peak training memory: `tuner.memory`'s estimate against a measured CPU peak on small models, and its figures for
FLUX.1-dev, SD3.5-large and SDXL at the presets' memory tiers, beside what peer tools publish.

Run from the repository root: `python bench/memory.py`. The check builds small FLUX.1- and SD1-shaped models from
the tiny pipelines' configs, widened so tensors (not the interpreter) dominate the resident set, trains one LoRA
step on the CPU and compares the process's peak resident set (VmHWM, reset before the step, over the resident set
before the models were built) with the estimate. The real models' figures come from their shipped configs
(`tuner/model_configs/`): nothing is downloaded and no weight is loaded. Writes bench/results/memory.md.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tuner import quantize as quantization  # noqa: E402
from tuner.memory import GIB, ModelConfigs, Setup, build_parts, estimate, inject_lora, step_inputs  # noqa: E402

MIB = 2**20
WIDER = {
    "flux": {"attention_head_dim": 32, "num_attention_heads": 4, "num_layers": 2, "num_single_layers": 2,
             "axes_dims_rope": [8, 12, 12]},
    "sd1": {"block_out_channels": [64, 128], "attention_head_dim": 4, "layers_per_block": 1},
}  # fmt: skip
"""How the small models widen the tiny ones' denoisers (the rest of each config stays tiny)."""
PEER_SETUPS = [("none", 1024), ("fp8", 1024), ("int8", 1024), ("nf4", 1024), ("nf4", 512)]
"""FLUX.1-dev rank-16 LoRA on attention + MLP of every block, 8-bit AdamW, checkpointing, embeddings cached: the
settings peers quote, estimated per base storage and resolution."""
PEERS = [
    ("SimpleTuner (FLUX quickstart)", "FLUX.1 rank-16 LoRA, all blocks' MLP + projections",
     "a bit more than 30 GB unquantized; 18 GB int8; 13 GB int4; 9 GB nf4",
     "https://github.com/bghira/SimpleTuner/blob/main/documentation/quickstart/FLUX.md"),
    ("Hugging Face blog: FLUX.1-dev QLoRA", "diffusers FLUX.1-dev LoRA, RTX 4090, 8-bit Adam, checkpointing, cached "
     "latents", "~26 GB bf16 LoRA; ~9 GB peak with an nf4 base", "https://huggingface.co/blog/flux-qlora"),
    ("ostris ai-toolkit (README)", "FLUX.1 LoRA, transformer quantized to 8 bit by default",
     "at least 24 GB of VRAM", "https://github.com/ostris/ai-toolkit"),
    ("kohya sd-scripts (FLUX.1 LoRA, sd3 branch README)", "fp8 base, cached text encoder outputs, split/swap",
     "settings listed for 24, 20, 16 and 12 GB cards", "https://github.com/kohya-ss/sd-scripts/issues/1595"),
]  # fmt: skip
TIERS = [("style-lora-flux", vram) for vram in (48, 24, 16, 12)] + [
    ("style-lora-sd35", None), ("style-lora-sdxl", None)
]  # fmt: skip


def small_configs(family: str, folder: Path) -> ModelConfigs:
    """The tiny pipeline's configs with the denoiser widened (`WIDER`)."""
    from tuner.tiny import make_tiny

    configs = ModelConfigs.from_folder(make_tiny(folder / family, family))
    denoiser = next(name for name in configs.components if name in ("unet", "transformer"))
    components = {**configs.components, denoiser: {**configs.components[denoiser], **WIDER[family]}}
    return ModelConfigs(family, components, f"small {family}")


# --- measuring one step's peak on the CPU (Linux) ---------------------------------------------------------------


def measured_peak(configs: ModelConfigs, setup: Setup, seed: int = 0) -> int:
    """Peak bytes one real LoRA step holds on the CPU: models built from `configs` with random weights, the setup's
    quantization and AdamW, one forward, backward and optimizer step. The process's peak resident set (VmHWM, reset
    before the step) over its resident set before the models were built; tensors of 64 KiB and more get pages of
    their own (`mallopt`), so a freed one leaves the resident set at once. A first step runs unmeasured, so buffers
    libraries allocate once are in the baseline."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, fixed: glibc would raise it after each large free
    peak = 0
    for _ in ("warm-up", "measured"):
        gc.collect()
        libc.malloc_trim(0)
        before = _status_bytes("VmRSS")
        parts, trained, inputs = _ready(configs, setup, seed)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
        _train_step(parts, trained, inputs)
        peak = _status_bytes("VmHWM") - before
        del parts, trained, inputs
    return peak


def measured_peak_alone(family: str, setup: Setup) -> int:
    """`measured_peak` of the small `family` model in a fresh one-thread interpreter: a process that ran other work
    first (a test worker) keeps allocator arenas and thread scratch that would count in its resident set."""
    argv = [sys.executable, __file__, "--measure", family, json.dumps(dataclasses.asdict(setup))]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench/memory.py --measure {family} failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


def _measure_main(family: str, setup_json: str) -> None:
    torch.set_num_threads(1)
    fields = json.loads(setup_json)
    for name in ("targets", "text_lengths"):  # JSON gave lists where the dataclass holds tuples
        if isinstance(fields[name], list):
            fields[name] = tuple(fields[name])
    with tempfile.TemporaryDirectory() as tmp:
        print(measured_peak(small_configs(family, Path(tmp)), Setup(**fields)))


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _ready(configs: ModelConfigs, setup: Setup, seed: int):
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[setup.mixed_precision]
    parts = build_parts(configs, dtype, device="cpu", seed=seed)
    with torch.no_grad():
        inputs = step_inputs(parts, setup)
    if setup.encoders_freed:
        parts.text_encoders = []
    if setup.quantize == "fp8":
        quantization.store_fp8(parts.denoiser, dtype)
    trained = inject_lora(parts, setup)
    if setup.gradient_checkpointing:
        parts.denoiser.enable_gradient_checkpointing()
    return parts, trained, inputs


def _train_step(parts, trained: list[nn.Parameter], inputs) -> None:
    latents, timesteps, cond = inputs
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    pred = parts.family.predict(parts, parts.denoiser, latents, timesteps, cond)
    pred.float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_cases() -> list[tuple[str, str, Setup]]:
    base = {"mixed_precision": "no", "optimizer": "adamw"}
    return [
        ("flux", "LoRA attn, 512 px", Setup(resolution=512, **base)),
        ("flux", "LoRA attn, 512 px, checkpointing", Setup(resolution=512, gradient_checkpointing=True, **base)),
        ("flux", "LoRA attn, 512 px, fp8 base", Setup(resolution=512, quantize="fp8", **base)),
        ("sd1", "LoRA attn, 256 px", Setup(resolution=256, **base)),
    ]


def main() -> None:
    torch.set_num_threads(1)
    lines = ["# Peak training memory: estimate vs measurement, and the real models' tiers", "",
             f"`python bench/memory.py` on {platform.machine()}, torch {torch.__version__}, one thread.", "",
             "## The estimate against a measured CPU peak (small models, one LoRA step, fp32, AdamW)", "",
             "| model | setup | estimate MiB | measured MiB | estimate / measured |",
             "|---|---|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        configs = {family: small_configs(family, Path(tmp)) for family in WIDER}
        for family, label, setup in check_cases():
            est, got = estimate(configs[family], setup).total, measured_peak_alone(family, setup)
            lines.append(f"| {configs[family].name} | {label} | {est / MIB:.1f} | {got / MIB:.1f} | {est / got:.2f} |")
            print(lines[-1], flush=True)
    lines += ["", "## Real models at the presets' tiers (estimate from shipped configs; GB = 2^30 bytes)", "",
              "| preset | tier | model | base | px | batch | frozen | trained+grads+optimizer | activations | "
              "total | fits |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    from tuner.config import load_config
    from tuner.memory import REFERENCE_MODELS, fits
    from tuner.presets import read_preset

    for name, vram in TIERS:
        config = load_config(preset=name, vram=vram)
        family = read_preset(name).meta.family[0]
        model = ModelConfigs.named(REFERENCE_MODELS[family])
        setup = Setup.from_config(config)
        start = time.perf_counter()
        e = estimate(model, setup)
        tier = vram or read_preset(name).meta.default_tier
        base = setup.quantize if setup.quantize != "none" else setup.mixed_precision
        state = (e.trainable + e.gradients + e.optimizer) / GIB
        lines.append(
            f"| {name} | {tier} GB | {model.name} | {base} | {setup.resolution} | {setup.batch_size} | "
            f"{e.frozen / GIB:.1f} | {state:.2f} | {e.activations / GIB:.1f} | {e.total / GIB:.1f} | "
            f"{'yes' if fits(e, tier) else 'NO'} |"
        )
        print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    lines += ["", "## What peer tools publish for FLUX.1 LoRA", "", "| tool | run | published VRAM | source |",
              "|---|---|---|---|", *(f"| {t} | {r} | {v} | {u} |" for t, r, v, u in PEERS)]  # fmt: skip
    lines += [
        "",
        "The estimate for the settings they quote (FLUX.1-dev, rank-16 LoRA on attention + MLP of every block, 8-bit "
        "AdamW, gradient checkpointing, bf16, batch 1, embeddings cached; the CUDA context, about 0.5-1 GB, is not "
        "in it):",
        "",
        "| base | px | estimate GB |",
        "|---|---|---|",
    ]
    flux = ModelConfigs.named("flux1-dev")
    for quantize, px in PEER_SETUPS:
        setup = Setup(quantize=quantize, resolution=px, gradient_checkpointing=True, targets="attn+ff")
        lines.append(
            f"| {quantize if quantize != 'none' else 'bf16'} | {px} | {estimate(flux, setup).total / GIB:.1f} |"
        )
        print(lines[-1], flush=True)
    out = ROOT / "bench" / "results" / "memory.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        _measure_main(*sys.argv[2:4])
    else:
        main()
