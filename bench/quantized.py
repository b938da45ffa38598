"""Memory of LoRA training on a quantized (fp8) frozen base against the same training on a bf16 base.

Run from the repository root: `python bench/quantized.py [--steps 3]`. A small FLUX.1-shaped pipeline (the tiny
one with its transformer widened so its weights, the part quantization shrinks, dominate) is loaded by
`tuner.models.load_parts` with `quantize = "none"` and `"fp8"`, and the LoRA trainer takes a few steps on it, with and
without gradient checkpointing, each base in its own child process. The figures are anonymous resident memory over
that after imports (held once loaded; peak over the steps). int8/nf4 (bitsandbytes) need CUDA and are not measured
here. Writes bench/results/quantized.md. (A whole `tuner train` run peaks at loading or exporting, not in its steps,
which is why the steps are measured on their own.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WIDER = {"attention_head_dim": 64, "num_attention_heads": 8, "num_layers": 4, "num_single_layers": 8,
         "axes_dims_rope": [16, 24, 24]}  # fmt: skip

CHILD = """
import gc, json, sys, threading, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from trainers.lora import LoraTrainer
from tuner.config import RunConfig
from tuner.models import load_parts

def anon():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024

model, quantize, steps, checkpointing = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
before = anon()
parts = load_parts(model, quantize=quantize, weight_dtype=torch.bfloat16)
trainer = LoraTrainer(RunConfig.for_method("lora").model_validate({"method": "lora", "lora": {"rank": 8},
                                                                    "data": {"token": "sks"}}))
params = trainer.prepare(parts).parameters()
if checkpointing:
    parts.denoiser.enable_gradient_checkpointing()
optimizer = torch.optim.AdamW(params, lr=1e-3)
ids = parts.family.tokenize(parts, ["a photo of sks toy"])
gc.collect()
held = anon() - before
peak, done = [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
for step in range(steps):
    latents = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(step))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(parts, {"latents": latents, "input_ids": ids,
                                            "generator": torch.Generator().manual_seed(step)})
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
done.set()
sampler.join()
print(json.dumps({"held": held, "peak": max(peak[0], anon()) - before}))
"""


def build(folder: Path) -> Path:
    """The tiny FLUX.1 pipeline with a wider, deeper transformer (random weights), saved as a diffusers folder."""
    from diffusers import FluxTransformer2DModel

    from tuner.tiny import make_tiny

    path = make_tiny(folder / "flux", "flux")
    config = json.loads((path / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")} | WIDER
    torch.manual_seed(0)
    FluxTransformer2DModel(**config).save_pretrained(path / "transformer")
    return path


def measure(model: Path, quantize: str, steps: int, checkpointing: bool) -> dict[str, int]:
    # Tensors of 64 KiB and more get pages of their own, freed at once (glibc's default raises that threshold after
    # each large free, and the per-step up-cast copies of fp8 weights would then churn a heap whose freed memory
    # the resident set keeps). Anonymous memory only: the weights file is memory-mapped, its pages are no run's own.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    args = [str(model), quantize, str(steps), "1" if checkpointing else "0"]
    result = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True,
                            check=True, env=env)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from diffusers import FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp))
        params = sum(p.numel() for p in FluxTransformer2DModel.from_pretrained(model / "transformer").parameters())
        runs = {(q, ckpt): measure(model, q, args.steps, ckpt) for ckpt in (True, False) for q in ("none", "fp8")}
    mib = 2**20
    rows = [f"| {'fp8' if q == 'fp8' else 'bf16'} | {'on' if c else 'off'} | {r['held'] / mib:.1f} | "
            f"{r['peak'] / mib:.1f} |" for (q, c), r in runs.items()]  # fmt: skip
    ratio = {c: runs["fp8", c]["peak"] / runs["none", c]["peak"] for c in (True, False)}
    held = runs["fp8", True]["held"] / runs["none", True]["held"]
    lines = [
        "# Quantized frozen base: memory of LoRA training on an fp8 base vs a bf16 base",
        "",
        f"`python bench/quantized.py --steps {args.steps}` on {platform.machine()}, torch {torch.__version__}, one "
        f"thread. A FLUX.1-shaped pipeline whose transformer has {params / 1e6:.1f}M parameters, loaded by "
        "`tuner.models.load_parts` (weight dtype bf16, `quantize` none or fp8), the LoRA trainer's adapters (rank 8, "
        "attention), AdamW, steps at 256 px (32x32 latents) under bf16 autocast; each base in its own process. "
        "Anonymous resident memory over that after imports: held once loaded, and the peak over the steps (sampled "
        "every 2 ms); glibc's mmap threshold fixed at 64 KiB, the memory-mapped weights file not counted.",
        "",
        "| base | gradient checkpointing | held after loading MiB | peak over the steps MiB |",
        "|---|---|---|---|",
        *rows,
        "",
        f"**fp8 / bf16 peak over the training steps: {ratio[True]:.2f} with gradient checkpointing** (as every "
        f"quantized tier runs), {ratio[False]:.2f} without; held after loading: {held:.2f}.",
        "",
        "fp8 stores the transformer's linear weights in 1 byte instead of 2; FLUX.1's norms (including the large "
        "modulation linears diffusers' layerwise casting skips as `norm`), the VAE, CLIP and the activations are "
        "unchanged. Each fp8 layer computes on an up-cast copy of its weight, which autograd keeps for the backward "
        "pass (a linear layer's input gradient needs its weight): without checkpointing every layer's copy waits for "
        "the backward pass, with it only the recomputed block's (`tuner.memory` counts these copies).",
    ]
    out = ROOT / "bench" / "results" / "quantized.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
