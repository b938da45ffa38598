"""`bench/gpu.sh --tiny` runs the GPU benchmark's code end to end on tiny shapes (here on the CPU), so it works the
first time it meets a GPU: every family x method x tier trains, and the report names the machine."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = sys.modules.setdefault("bench_gpu", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def test_gpu_sh_runs_the_python_bench_with_its_arguments(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--help"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "--tiny" in proc.stdout and "--peer" in proc.stdout


def test_gpu_bench_runs_on_tiny_shapes(tmp_path):
    """What `bench/gpu.sh --tiny --out FILE` runs, in this process (the imports are paid once per suite)."""
    out = tmp_path / "gpu.md"
    assert load_bench().main(["--tiny", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "Machine: **CPU" in text and "tiny shapes" in text
    rows = [line for line in text.splitlines() if re.match(r"\| (sd1|sdxl|flux) \|", line)]
    cases = {tuple(cell.strip() for cell in row.split("|")[1:4]) for row in rows}
    assert cases == {
        (f, m, t) for f in ("sd1", "sdxl", "flux") for m in ("lora", "dreambooth") for t in ("fast", "low")
    }
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        seconds, images, flops = float(cells[5]), float(cells[6]), float(cells[8])
        assert seconds > 0 and images > 0 and flops > 0, row
    assert "not run (give `--peer PATH`)" in text
