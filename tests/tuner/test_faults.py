"""Faults a long run meets, each a clear stop with nothing lost: a full disk, a second run on the same folder,
a damaged cache entry, a lost process, a finished run resumed or re-run, a closed pipe, an unwritable folder.

Real files and processes throughout: a small tmpfs mounted for the full disk and the read-only folder (the
suite runs as root; elsewhere those tests skip), real `tuner train` processes for the lock and the lost rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file, save_file

from tuner.checkpoint import list_checkpoints, verify
from tuner.errors import TunerError

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("loop_tests", HERE / "test_loop.py")
loop_tests = sys.modules.setdefault("loop_tests", importlib.util.module_from_spec(_spec))
if not hasattr(loop_tests, "make_config"):
    _spec.loader.exec_module(loop_tests)

images = loop_tests.images  # the loop tests' six-image data set, as a fixture here too
_registered = loop_tests._registered
make_config, train_here, run_cli = loop_tests.make_config, loop_tests.train_here, loop_tests.run_cli
trained, assert_bitwise_equal = loop_tests.trained, loop_tests.assert_bitwise_equal


def no_nulls(config: dict) -> dict:
    """TOML has no null: leave those keys to their defaults (as the loop tests' `run_cli` does)."""
    return {k: {kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v
            for k, v in config.items()}  # fmt: skip


def outputs(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run (but its lock) with its bytes and mtime."""
    return {
        str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".tuner.lock"
    }


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs of its own; `options` such as 'ro' via the `mount` helper it returns."""
    mounted = []

    def mount(name: str, size: str = "2m", options: str = "") -> Path:
        point = tmp_path / name
        point.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


# --- a full disk -----------------------------------------------------------------------------------------------


def test_disk_full_mid_checkpoint_stops_cleanly_and_resumes_bitwise(tiny_models, images, tmp_path, small_disk):
    disk = small_disk("disk")
    model = tiny_models["sd1"]
    straight = train_here(make_config(model, images, tmp_path / "straight", train={"max_train_steps": 6}))
    config = make_config(model, images, disk / "run", train={"max_train_steps": 6})
    result = run_cli(config, tmp_path, env={"TUNER_TEST_FILL_DISK_AT_STEP": "3"})  # fills before checkpoint-4
    run = disk / "run"
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: no space left on the disk of") and str(run) in message, message
    assert "checkpoint-4" in message and "is needed" in message and "checkpoint-2" in message, message
    assert [p.name for p in run.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-2"]  # no .tmp
    assert verify(run / "checkpoint-2") is None
    (disk / "filler").unlink()  # space freed
    result = run_cli(config, tmp_path, "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_bitwise_equal(trained(straight), trained(run))


def test_a_checkpoint_that_cannot_fit_is_not_started(tiny_models, images, tmp_path, small_disk):
    disk = small_disk("disk", size="1m")
    config = make_config(tiny_models["sd1"], images, disk / "run")
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * (free - 48 * 1024))  # 48 KB left: a checkpoint needs ~88 KB
    with pytest.raises(TunerError) as info:
        train_here(config)
    message = str(info.value)
    assert "checkpoint-2" in message and "is needed" in message and "No checkpoint was written yet" in message
    assert not list((disk / "run").glob("checkpoint-*"))


def test_a_full_disk_while_caching_names_the_cache(tiny_models, images, tmp_path, small_disk):
    from tuner.data.cache import TensorCache
    from tuner.storage import DiskFull

    disk = small_disk("cache", size="64k")
    cache = TensorCache(disk, "latents")
    with pytest.raises(DiskFull) as info:
        for i in range(100):
            cache.put(f"{i:064x}", {"latents": torch.randn(4, 16, 16)})
    assert f"{disk / 'latents'}" in str(info.value) and "data.cache_dir" in str(info.value)
    assert not list(disk.rglob("*.tmp")), "a half-written entry stayed behind"
    assert all(cache.has(p.stem) for p in disk.rglob("*.safetensors"))  # every entry written is intact


# --- one run per folder -------------------------------------------------------------------------------------------


def test_a_second_run_on_a_busy_folder_is_refused_and_a_dead_runs_lock_taken_over(
    tiny_models, images, tmp_path, caplog
):
    config = make_config(tiny_models["sd1"], images, tmp_path / "run")
    path = tmp_path / "first.toml"
    path.write_text(tomli_w.dumps(no_nulls(config)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(loop_tests.ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, str(loop_tests.RUNNER), "train", "--config", str(path)],
        env={**env, "TUNER_TEST_SLEEP_AT_STEP": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = tmp_path / "run" / ".tuner.lock"
        deadline = time.monotonic() + 50
        while not (lock.is_file() and lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid
        second = run_cli(config, tmp_path)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"pid {first.pid} on host {holder['host']}" in second.stderr and "is in use" in second.stderr
        other_output = make_config(tiny_models["sd1"], images, tmp_path / "other")  # same data, same cache folder
        third = run_cli(other_output, tmp_path)
        assert third.returncode == 1 and "data.cache_dir" in third.stderr and f"pid {first.pid}" in third.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    from tuner.run_folder import RunLock

    caplog.set_level("WARNING")
    with RunLock(tmp_path / "run", "train.output_dir"):  # the dead run's lock is taken over, with a note
        notes = [r.getMessage() for r in caplog.records]
        assert any(f"took over the lock left by a run that did not end cleanly (pid {first.pid}" in n for n in notes)
    assert (tmp_path / "run" / ".tuner.lock").read_text() == ""  # a clean end leaves no holder behind


# --- damaged cache entries -------------------------------------------------------------------------------------


def test_damaged_cache_entries_are_recomputed_with_a_note_never_trained_on(tiny_models, images, tmp_path, caplog):
    model = tiny_models["sd1"]
    cache = tmp_path / "cache"
    first = train_here(make_config(model, images, tmp_path / "a", data={"cache_dir": str(cache)}))
    entries = sorted((cache / "latents").rglob("*.safetensors"))
    truncated, edited, foreign = entries[0], entries[1], entries[2]
    truncated.write_bytes(truncated.read_bytes()[:100])
    tensors = load_file(str(edited))
    tensors = {k: v + 0.5 for k, v in tensors.items()}  # a valid file with other numbers under the old header
    from safetensors import safe_open

    with safe_open(str(edited), "pt") as fh:
        metadata = fh.metadata()
    save_file(tensors, str(edited), metadata)
    shutil.copyfile(entries[3], foreign)  # another image's (or model's) entry under this key
    text_entry = next((cache / "text").rglob("*.safetensors"))
    text_entry.write_bytes(b"not a safetensors file")
    caplog.set_level("WARNING")
    second = train_here(make_config(model, images, tmp_path / "b", data={"cache_dir": str(cache)}))
    notes = [r.getMessage() for r in caplog.records if "cache entry" in r.getMessage()]
    assert any(str(truncated) in n and "unreadable" in n for n in notes), notes
    assert any(str(edited) in n and "does not match the recorded hash" in n for n in notes), notes
    assert any(str(foreign) in n and "recorded key differs" in n for n in notes), notes
    assert any(str(text_entry) in n for n in notes), notes
    assert_bitwise_equal(trained(first), trained(second))  # the damaged values never reached training


# --- a lost process --------------------------------------------------------------------------------------------


def test_a_lost_process_stops_the_others_with_its_name_and_the_run_resumes(tiny_models, images, tmp_path):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate CLI not installed next to this python")
    config = make_config(tiny_models["sd1"], images, tmp_path / "run", train={"max_train_steps": 6})
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--multi_gpu",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", loop_tests.free_port()]  # fmt: skip
    started = time.monotonic()
    result = run_cli(config, tmp_path, env={"TUNER_TEST_KILL_AT_STEP": "3", "TUNER_TEST_KILL_RANK": "1"},
                     launcher=launcher)  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - started < 240
    output = result.stdout + result.stderr
    assert "error: process 1 was lost" in output and "so process 0 stopped too" in output, output[-3000:]
    assert "checkpoint-2; continue with --resume latest" in output
    assert "[rank0]: Traceback" not in output  # the survivor's own report is one line (the launcher adds its own)
    resumed = train_here(config, resume="latest")  # the last good checkpoint resumes (here on one process)
    assert [p.name for p in list_checkpoints(resumed)][-1] == "checkpoint-6"


# --- finished runs -----------------------------------------------------------------------------------------------


def test_a_finished_run_is_never_retrained_and_extends_bitwise(tiny_models, images, tmp_path, capsys):
    model = tiny_models["sd1"]
    constant = {"optimizer": {"lr_scheduler": "constant"}}
    # checkpoints every 3 steps: the 4th step's checkpoint exists only because the final one is always kept
    four = make_config(model, images, tmp_path / "run", train={"checkpointing_steps": 3}, **constant)
    run = train_here(four)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-3", "checkpoint-4"]
    before = outputs(run)
    capsys.readouterr()
    train_here(four, resume="latest")
    assert "is a finished run (4 steps); nothing to do, nothing was changed" in capsys.readouterr().out
    assert outputs(run) == before  # bytes and mtimes
    with pytest.raises(TunerError, match="holds a finished run .*--overwrite"):
        train_here(four)
    assert outputs(run) == before
    six = make_config(model, images, tmp_path / "run", train={"checkpointing_steps": 3, "max_train_steps": 6},
                      **constant)  # fmt: skip
    train_here(six, resume="latest")  # trains on from the final checkpoint
    straight = train_here(make_config(model, images, tmp_path / "straight", train={"checkpointing_steps": 3,
                                      "max_train_steps": 6}, **constant))  # fmt: skip
    assert_bitwise_equal(trained(straight), trained(run))


def test_overwrite_replaces_a_finished_run_and_a_run_without_checkpoints_cannot_extend(
    tiny_models, images, tmp_path, caplog
):
    model = tiny_models["sd1"]
    config = make_config(model, images, tmp_path / "run", train={"keep_final_checkpoint": False,
                                                                  "checkpointing_steps": 10})  # fmt: skip
    run = train_here(config)
    assert not list_checkpoints(run)
    before = outputs(run)
    longer = json.loads(json.dumps(config))
    longer["train"]["max_train_steps"] = 6
    with pytest.raises(TunerError, match="finished run that kept no checkpoint .*nothing was changed"):
        train_here(longer, resume="latest")
    assert outputs(run) == before
    caplog.set_level("INFO")
    train_here(config, overwrite=True)
    assert any("--overwrite: removed the earlier run" in r.getMessage() for r in caplog.records)
    assert outputs(run).keys() == before.keys() and outputs(run) != before


# --- the CLI's edges ----------------------------------------------------------------------------------------------


def test_a_closed_pipe_ends_quietly():
    command = [sys.executable, "-m", "tuner.cli", "presets", "list"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=loop_tests.ROOT)
    proc.stdout.close()  # the reader is gone before the first line is written (`tuner presets list | head -0`)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and stderr == "", stderr


def test_unwritable_output_and_unreadable_data_are_reported_before_loading(tiny_models, images, tmp_path, small_disk):
    read_only = small_disk("ro", options="ro")
    config = make_config(tiny_models["sd1"], images, read_only / "runs" / "one")
    result = run_cli(config, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"train.output_dir = '{read_only / 'runs' / 'one'}': {read_only} is on a read-only file system" in (
        result.stderr
    )
    assert "Loading weights" not in result.stderr  # before any model loads
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = run_cli(make_config(tiny_models["sd1"], images, a_file / "run"), tmp_path)
    assert result.returncode == 1 and f"{a_file} is a file, not a folder" in result.stderr
    locked = tmp_path / "photos"
    shutil.copytree(images, locked)
    locked.chmod(0o000)
    command = [sys.executable, "-m", "tuner.cli", "check-data", str(locked)]
    if os.geteuid() == 0:  # root reads anything: drop the two capabilities that let it, and stay uid 0
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv, so a folder cannot be made unreadable")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    env = {**os.environ, "PYTHONPATH": str(loop_tests.ROOT), "HF_HUB_OFFLINE": "1"}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"data.path = '{locked}': permission denied" in result.stderr
