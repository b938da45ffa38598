"""The peak-memory estimate (`tuner.memory`): within 25% of a measured CPU peak on small models, what quantizing and
checkpointing change, and `tuner presets show NAME --vram N` printing a tier's estimate for FLUX.1-dev."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.memory import GIB, ModelConfigs, Setup, estimate

BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures the resident set through /proc")
def test_estimate_is_within_a_quarter_of_the_measured_cpu_peak(bench, tmp_path):
    configs = bench.small_configs("flux", tmp_path)
    # bench/memory.py measures more setups (plain, checkpointing, fp8, a UNet); this one takes the most paths. It is
    # measured in a fresh process: this worker's earlier tests leave allocator arenas in its resident set.
    for setup in (
        Setup(resolution=512, mixed_precision="no", optimizer="adamw", quantize="fp8", gradient_checkpointing=True),
    ):
        estimated, measured = estimate(configs, setup).total, bench.measured_peak_alone("flux", setup)
        print(f"{setup.quantize} checkpointing={setup.gradient_checkpointing}: estimate {estimated / 2**20:.1f} MiB, "
              f"measured {measured / 2**20:.1f} MiB")  # fmt: skip
        assert 0.75 <= estimated / measured <= 1.25, (setup, estimated, measured)


def test_presets_show_prints_the_estimate_of_the_tier(capsys):
    assert main(["presets", "show", "style-lora-flux", "--vram", "12"]) == 0
    out = capsys.readouterr().out
    assert "# estimated peak training memory on FLUX.1-dev (bf16, nf4 base, gradient checkpointing" in out, out
    total = float(next(line for line in out.splitlines() if line.strip().startswith("total")).split()[1])
    frozen = float(next(line for line in out.splitlines() if "frozen weights" in line).split()[2])
    assert 6.0 < frozen < 7.5 and frozen < total < 11.0, out  # FLUX.1-dev's 11.9B weights at 4.5 bits, and the VAE
    assert "fits a 12 GB card" in out and "does NOT" not in out


def test_quantizing_and_checkpointing_lower_the_estimate_where_they_should(tiny_models):
    configs = ModelConfigs.from_folder(tiny_models["flux"])
    plain = estimate(configs, Setup(resolution=64, mixed_precision="no"))
    fp8 = estimate(configs, Setup(resolution=64, mixed_precision="no", quantize="fp8"))
    ckpt = estimate(configs, Setup(resolution=64, mixed_precision="no", gradient_checkpointing=True))
    # fp8 stores weights in a byte, and without checkpointing every layer's up-cast copy waits for the backward pass
    assert fp8.frozen < plain.frozen and fp8.activations > plain.activations
    assert ckpt.activations < plain.activations and ckpt.frozen == plain.frozen
    assert plain.trainable == plain.gradients > 0 and plain.total < GIB
