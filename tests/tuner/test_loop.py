"""The training loop end to end on the tiny SD1 model with a small real trainer (UNet biases and norms).

Runs that must be their own process (SIGKILL, `accelerate launch`, the CLI's exit code) go through
`run_loop.py`; the rest run in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from PIL import Image
from safetensors.torch import load_file

from tuner.checkpoint import list_checkpoints, verify
from tuner.config import RunConfig
from tuner.errors import TrainingStopped, TunerError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNNER = HERE / "run_loop.py"

_spec = importlib.util.spec_from_file_location("loop_trainer", HERE / "loop_trainer.py")
loop_trainer = sys.modules.setdefault("loop_trainer", importlib.util.module_from_spec(_spec))
if not hasattr(loop_trainer, "register"):
    _spec.loader.exec_module(loop_trainer)


@pytest.fixture(autouse=True)
def _registered():
    """The test trainer is registered for every test here (subprocess runs register it themselves)."""
    loop_trainer.register()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six 64x64 PNGs with distinct captions: three batches of two per epoch, so steps cross epochs."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")
    return folder


def make_config(model: Path, images: Path, out: Path, **tables) -> dict:
    config = {
        "method": loop_trainer.METHOD,
        "model": {"pretrained_model_name_or_path": str(model)},
        "data": {"path": str(images), "resolution": 64, "enable_bucket": False, "min_bucket_reso": 32},
        "optimizer": {"name": "adamw", "learning_rate": 1e-3},
        "train": {
            "output_dir": str(out),
            "max_train_steps": 4,
            "train_batch_size": 2,
            "checkpointing_steps": 2,
            "checkpoints_total_limit": None,
            "logging_steps": 1,
            "report_to": "none",
        },
        "validation": {"enabled": False},
    }
    for table, values in tables.items():
        config.setdefault(table, {}).update(values)
    return config


def train_here(config: dict, resume: str | None = None, overwrite: bool = False) -> Path:
    from tuner.loop import train

    return train(RunConfig.for_method(config["method"]).model_validate(config), resume=resume, overwrite=overwrite)


def run_cli(config: dict, tmp: Path, *args: str, env: dict | None = None, launcher: list[str] | None = None):
    path = tmp / f"run-{len(list(tmp.glob('run-*.toml')))}.toml"
    config = {
        k: {kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v for k, v in config.items()
    }  # fmt: skip  (TOML has no null: leave those keys to their defaults)
    path.write_bytes(tomli_w.dumps(config).encode())
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [*(launcher or [sys.executable]), str(RUNNER), "train", "--config", str(path), *args]
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def trained(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "unet_trained.safetensors"))


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- exact resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        {"optimizer": {"name": "adamw"}, "train": {"gradient_checkpointing": True}},
        {
            "optimizer": {"name": "adamw"},
            "train": {"gradient_accumulation_steps": 2, "use_ema": True, "ema_decay": 0.9},
        },
        {"optimizer": {"name": "adamw8bit"}, "unet_bias": {"train": "attention"}},
    ],
    ids=["adamw", "accumulation2", "adamw8bit"],
)
def test_sigkill_then_resume_is_bitwise_identical(tiny_models, images, tmp_path, variant):
    model = tiny_models["sd1"]
    straight = train_here(make_config(model, images, tmp_path / "straight", **variant))

    killed_dir = tmp_path / "killed"
    config = make_config(model, images, killed_dir, **variant)
    result = run_cli(config, tmp_path, env={"TUNER_TEST_KILL_AT_STEP": "2"})
    assert result.returncode == -9, result.stderr[-3000:]
    assert [p.name for p in list_checkpoints(killed_dir)] == ["checkpoint-2"]
    assert not (killed_dir / "artifact.json").exists()

    train_here(config, resume="latest")
    assert_bitwise_equal(trained(straight), trained(killed_dir))
    if variant["optimizer"]["name"] == "adamw8bit":  # the 8-bit state really is 8-bit, and it round-trips
        meta = json.loads((killed_dir / "checkpoint-4" / "optimizer.json").read_text())
        assert "state1" in json.dumps(meta) and "qmap1" in json.dumps(meta)
        a = load_file(str(straight / "checkpoint-4" / "optimizer.safetensors"))
        b = load_file(str(killed_dir / "checkpoint-4" / "optimizer.safetensors"))
        assert any(t.dtype == torch.uint8 for t in a.values())
        assert_bitwise_equal(a, b)
    assert losses(straight) == losses(killed_dir)  # steps the killed run logged after its checkpoint are dropped


# --- a whole run: outputs, cadence, limits -------------------------------------------------------------------


def test_run_writes_outputs_checkpoints_grids_and_logs(tiny_models, images, tmp_path):
    out = tmp_path / "run"
    config = make_config(
        tiny_models["sd1"],
        images,
        out,
        train={
            "max_train_steps": 6,
            "checkpointing_steps": 1,
            "checkpoints_total_limit": 2,
            "report_to": "tensorboard",
            "use_ema": True,
        },
        validation={"enabled": True, "validation_steps": 3},
        optimizer={"lr_scheduler": "linear", "lr_warmup_steps": 2},
    )
    assert train_here(config) == out
    assert json.loads((out / "config.json").read_text())["train"]["max_train_steps"] == 6
    assert json.loads((out / "artifact.json").read_text())["files"][0]["path"] == "unet_trained.safetensors"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5", "checkpoint-6"]
    assert not list(out.glob("*.tmp"))
    for checkpoint in list_checkpoints(out):
        assert verify(checkpoint) is None
        assert {p.suffix for p in checkpoint.iterdir()} <= {".json", ".safetensors"}  # no pickle anywhere
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["final.png", "step-000003.png", "step-000006.png"]
    assert (out / "grids" / "final.png").read_bytes() == (out / "grids" / "step-000006.png").read_bytes()
    assert "library_name: diffusers" in (out / "README.md").read_text()  # the model card
    assert list((out / "logs").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    # the rate each step used: linear warmup over 2 steps, then linear decay to 0 at step 6
    assert [r["lr/unet"] for r in records] == pytest.approx([0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_fresh_run_refuses_a_folder_with_checkpoints(tiny_models, images, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(TunerError, match="--resume latest"):
        train_here(make_config(tiny_models["sd1"], images, out))


def test_bf16_autocast_on_cpu_trains(tiny_models, images, tmp_path):
    out = train_here(
        make_config(
            tiny_models["sd1"], images, tmp_path / "bf16", train={"mixed_precision": "bf16", "max_train_steps": 2}
        )
    )
    weights = trained(out)
    assert all(t.dtype == torch.float32 for t in weights.values())  # trained weights stay fp32
    base = load_file(str(tiny_models["sd1"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(weights[k], base[k]) for k in weights)
    assert all(np.isfinite(losses(out)))


# --- guard, interrupt, damaged checkpoints -------------------------------------------------------------------


def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tiny_models, images, tmp_path):
    out = tmp_path / "nan"
    config = make_config(tiny_models["sd1"], images, out, optimizer={"name": "adamw8bit"})
    result = run_cli(config, tmp_path, env={"TUNER_TEST_NAN_AT_STEP": "3"})
    assert result.returncode == 1
    message = result.stderr
    assert "step 3" in message and "loss = nan" in message
    assert "learning rate" in message and str(out / "checkpoint-2") in message
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "artifact.json").exists()
    assert verify(out / "checkpoint-2") is None
    train_here(config, resume=str(out / "checkpoint-2"))  # the checkpoint from before the NaN loads and trains on
    assert (out / "artifact.json").exists()


def test_sigint_saves_a_checkpoint_then_exits_1(tiny_models, images, tmp_path):
    out = tmp_path / "interrupted"
    config = make_config(tiny_models["sd1"], images, out, train={"checkpointing_steps": 100})
    result = run_cli(config, tmp_path, env={"TUNER_TEST_SIGINT_AT_STEP": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "interrupted after step 2" in result.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert verify(out / "checkpoint-2") is None


def test_damaged_checkpoint_is_refused_unless_fallback_is_asked(tiny_models, images, tmp_path):
    out = tmp_path / "damaged"
    config = make_config(tiny_models["sd1"], images, out)
    train_here(config)
    target = out / "checkpoint-4" / "optimizer.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    longer = make_config(tiny_models["sd1"], images, out, train={"max_train_steps": 6})
    with pytest.raises(TrainingStopped) as info:
        train_here(longer, resume="latest")
    assert "optimizer.safetensors" in str(info.value) and "damaged" in str(info.value)
    assert "checkpoint-2" in str(info.value)  # it names the earlier intact one
    assert target.read_bytes() == bytes(raw)  # refused, untouched
    train_here(longer, resume="latest-good")  # falls back to checkpoint-2, trains through 6
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert verify(out / "checkpoint-4") is None  # rewritten intact


# --- several processes ---------------------------------------------------------------------------------------


@pytest.mark.slow  # about 25 s: two processes
def test_two_process_cpu_run_matches_one_process(tiny_models, images, tmp_path):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate CLI not installed next to this python")
    # Same noise per example however the batch is split, and one trained scalar outside the DDP-wrapped UNet
    # (the loop averages its gradient itself).
    per_example = {"unet_bias": {"per_example_noise": True, "loss_scale": True}}
    single = make_config(tiny_models["sd1"], images, tmp_path / "one", train={"train_batch_size": 4}, **per_example)
    one = train_here(single)
    double = make_config(tiny_models["sd1"], images, tmp_path / "two", **per_example)
    # accelerate 1.15 starts one process for `--cpu --num_processes 2` (it needs mpirun for more); `--multi_gpu`
    # starts two, and on a machine without CUDA the loop joins them over gloo on the CPU.
    launcher = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--num_processes",
        "2",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        free_port(),
    ]  # fmt: skip  (a port of its own: test workers run side by side)
    result = run_cli(double, tmp_path, launcher=launcher)
    assert result.returncode == 0, result.stderr[-4000:]
    two = tmp_path / "two"
    assert len(losses(two)) == 4  # one set of outputs: only the main process logs
    assert json.loads((two / "artifact.json").read_text())["method"] == loop_trainer.METHOD
    checkpoint = two / "checkpoint-4"
    assert {p.name for p in checkpoint.glob("rng-rank*.json")} == {"rng-rank0.json", "rng-rank1.json"}
    assert np.allclose(losses(one), losses(two), rtol=1e-4, atol=1e-5), (losses(one), losses(two))
    a, b = trained(one), trained(two)
    assert a["loss_scale"] != 1 and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_trained_modules_go_back_where_their_keys_say():
    from types import SimpleNamespace

    from torch import nn

    from tuner.runtime import place

    family = SimpleNamespace(denoiser_component="transformer")
    parts = SimpleNamespace(denoiser=nn.Linear(1, 1), vae=nn.Linear(1, 1), text_encoders=[nn.Linear(1, 1)] * 2,
                            family=family)  # fmt: skip
    wrapper = nn.Linear(2, 2)
    assert place(parts, "text_encoder_2", wrapper) and parts.text_encoders[1] is wrapper
    assert place(parts, "text_encoders.0", wrapper) and parts.text_encoders[0] is wrapper
    assert place(parts, "transformer", wrapper) and parts.denoiser is wrapper  # the pipeline's name for it
    other = nn.Linear(3, 3)
    assert place(parts, "denoiser", other) and parts.denoiser is other
    assert not place(parts, "network", wrapper) and not place(parts, "text_encoder_3", wrapper)


def test_divergence_message_names_fp16_and_the_last_checkpoint():
    from tuner.loop import _diverged

    config = RunConfig.for_method(loop_trainer.METHOD).model_validate(
        {"method": loop_trainer.METHOD, "train": {"mixed_precision": "fp16"}, "optimizer": {"learning_rate": 0.5}}
    )
    message = str(_diverged(config, 7, float("inf"), 3.0, Path("runs/x/checkpoint-4")))
    assert message.startswith("step 7: loss = inf") and "learning_rate = 0.5" in message
    assert "fp16 overflow" in message and "'bf16'" in message and "--resume runs/x/checkpoint-4" in message
    message = str(_diverged(config, 1, 0.3, float("nan"), None))
    assert "gradient norm = nan" in message and "no checkpoint was written yet" in message
