"""bench/gpu_micro_base.sh on CPU with 2 steps per stage: it builds, judges both models and refuses to install.

The script is for a GPU day (10x the recipe's steps); here it runs the same code path at a size CI affords. A
2-step base draws noise, so it must lose to the installed model on the adherence figures and leave it untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.models import has_builtin_model, resolve_model_path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "bench" / "gpu_micro_base.sh"

pytestmark = pytest.mark.skipif(not has_builtin_model("micro"), reason="this install has no built-in micro model")


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(
        b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)
    ).hexdigest()


@pytest.mark.slow  # about 90 s: builds and judges a micro base
def test_gpu_script_judges_and_keeps_the_installed_base_when_the_new_one_is_not_better(tmp_path):
    installed = tmp_path / "installed"
    shutil.copytree(resolve_model_path("builtin:micro"), installed)
    before = _digest(installed)
    args = ["--steps", "2", "--out", str(tmp_path / "out"), "--install-dir", str(installed), "--images", "32",
            "--patterns", "8", "--prompts", "2", "--seeds", "2", "--sample-steps", "4",
            "--ceiling-images", "8"]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests, wherever its venv lies
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 3, done.stderr[-2000:]
    assert "NOT INSTALLED" in done.stdout and "NOT BETTER" in done.stdout
    figures = [json.loads((tmp_path / "out" / f"{name}.json").read_text())["figures"] for name in ("installed", "new")]
    assert figures[0].keys() == figures[1].keys() and "g4 fresh shape+color" in figures[0]
    assert _digest(installed) == before, "the installed model must stay as it was"
    assert (tmp_path / "out" / "micro" / "model_index.json").is_file()  # the new model was built, only not installed


def test_gpu_script_rejects_an_unknown_argument(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--stesp", "2"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "unknown argument --stesp" in done.stderr
