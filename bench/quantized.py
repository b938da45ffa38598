"""Peak memory of a LoRA run on a quantized (fp8) frozen base against the same run on the full-precision base.

Run from the repository root: `python bench/quantized.py [--steps 5]`. A small FLUX.1-shaped pipeline (the tiny
one with its transformer widened so its weights, the part quantization shrinks, dominate) trains the same LoRA
through `tuner.loop.train` with `model.quantize = "none"` and `"fp8"`, with and without gradient checkpointing, each
in its own child process; each figure is
the child's peak resident set (VmHWM) over its resident set once its imports are done, so the ratio compares what
the runs themselves hold. int8/nf4 (bitsandbytes) need CUDA and are not measured here. Writes
bench/results/quantized.md.
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
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tuner.config import RunConfig
from tuner.loop import train

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

import threading, time
table = json.loads(sys.argv[1])
config = RunConfig.for_method("lora").model_validate(table)
before, peak, done = status("RssAnon"), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.002)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
train(config, summary=False)
done.set()
sampler.join()
print(json.dumps({"peak": peak[0] - before}))
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


def peak(model: Path, images: Path, out: Path, quantize: str, steps: int, checkpointing: bool) -> int:
    table = {
        "method": "lora",
        "model": {"pretrained_model_name_or_path": str(model), "quantize": quantize},
        "data": {"path": str(images), "resolution": 256, "enable_bucket": False, "token": "sks"},
        "lora": {"rank": 8, "verify_export": False},
        "optimizer": {"name": "adamw", "learning_rate": 1e-3},
        "train": {
            "output_dir": str(out),
            "max_train_steps": steps,
            "train_batch_size": 1,
            "report_to": "none",
            "checkpointing_steps": 10_000,
        },  # fmt: skip
        "validation": {"enabled": False},
    }
    # Tensors of 64 KiB and more get pages of their own, freed at once: glibc's default raises that threshold after
    # each large free, and then the per-step up-cast copies of fp8 weights churn the heap, whose freed memory the
    # resident set keeps (a CPU allocator effect, not memory the run holds). The peak is of anonymous memory only:
    # the weights file is memory-mapped, and its pages (host page cache on a GPU machine) are no run's own.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(table)], cwd=ROOT, capture_output=True,
                            text=True, check=True, env=env)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build(tmp)
        images = tmp / "images"
        images.mkdir()
        for i in range(4):
            pixels = np.full((256, 256, 3), 255, np.uint8)
            pixels[40 + 8 * i : 140 + 8 * i, 40:140] = [220, 20, 20]
            Image.fromarray(pixels).save(images / f"{i}.png")
            (images / f"{i}.txt").write_text("a photo of sks toy", encoding="utf-8")
        from diffusers import FluxTransformer2DModel

        params = sum(p.numel() for p in FluxTransformer2DModel.from_pretrained(model / "transformer").parameters())
        runs = {(q, ckpt): peak(model, images, tmp / f"{q}-{ckpt}", q, args.steps, ckpt)
                for ckpt in (True, False) for q in ("none", "fp8")}  # fmt: skip
    mib = 2**20
    lines = [
        "# Quantized frozen base: peak memory of a LoRA run, fp8 base vs bf16 base",
        "",
        f"`python bench/quantized.py --steps {args.steps}` on {platform.machine()}, torch {torch.__version__}, "
        f"one thread. A FLUX.1-shaped pipeline whose transformer has {params / 1e6:.1f}M parameters (fp32), LoRA "
        "rank 8 on the attention projections, 256 px, batch 1, AdamW, through `tuner.loop.train`; each run in its own "
        "process (glibc mmap threshold fixed at 64 KiB), bf16 mixed precision (the base in bf16, or fp8 computed in "
        "bf16, as the GPU tiers run), its peak anonymous resident memory (RssAnon sampled every 2 ms; the mapped "
        "weights file excluded) over that after imports.",
        "",
        "| base | gradient checkpointing | peak MiB |",
        "|---|---|---|",
        *(
            f"| {'fp8' if q == 'fp8' else 'bf16'} | {'on' if c else 'off'} | {v / mib:.1f} |"
            for (q, c), v in runs.items()
        ),  # fmt: skip
        "",
        f"**fp8 / bf16 peak with gradient checkpointing (as every quantized tier runs): "
        f"{runs['fp8', True] / runs['none', True]:.2f}**; without it: {runs['fp8', False] / runs['none', False]:.2f}.",
        "",
        "The transformer's linear weights are stored in 1 byte instead of 2 (norms, convolutions, the VAE, CLIP and "
        "the activations are unchanged). Each fp8 layer computes on an up-cast copy of its weight, and autograd keeps "
        "that copy for the backward pass (a linear layer's input gradient needs its weight): without checkpointing "
        "every layer's copy is held until the backward pass, so the fp8 run holds the float8 weights *and* a "
        "bf16 copy of them. With checkpointing only the block being recomputed holds its copies, which is "
        "why the presets quantize only together with `train.gradient_checkpointing = true`, and why "
        "`tuner.memory` counts the copies as activations.",
    ]
    out = ROOT / "bench" / "results" / "quantized.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
