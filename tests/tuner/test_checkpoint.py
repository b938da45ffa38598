"""Checkpoint mechanics without a training run: the pickle-free tree format, RNG states, optimizer state
round trips (8-bit included), atomic writes, manifests, damaged folders and pruning."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tuner.checkpoint import (
    capture_rng,
    decode_tree,
    encode_tree,
    list_checkpoints,
    prune,
    read_tree,
    resolve_resume,
    restore_rng,
    save_atomically,
    verify,
    write_tree,
)
from tuner.errors import TrainingStopped, TunerError


def test_tree_round_trip_keeps_types_keys_and_tensors(tmp_path):
    shared = torch.arange(6, dtype=torch.float32)
    value = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3)}, 1: {"q": torch.ones(4, dtype=torch.uint8)}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1], "name": "unet", "flag": None}],
        "__bnb_like__": {"state1": torch.zeros(3, dtype=torch.uint8), "qmap1": shared, "qmap2": shared},
        "bf16": torch.randn(5).to(torch.bfloat16),
        "view": shared[2:4],
        "empty": torch.zeros(0),
        "floats": [math.inf, -math.inf, 0.1 + 0.2],
        "numpy": np.arange(5, dtype=np.uint32),
        "np_scalar": np.float64(2.5),
        "dtype": torch.float16,
    }
    write_tree(tmp_path, "x", value)
    back = read_tree(tmp_path, "x")
    assert set(back["state"]) == {0, 1}  # int keys stay ints (torch maps optimizer state by them)
    assert torch.equal(back["state"][0]["m"], value["state"][0]["m"]) and back["state"][0]["step"].dim() == 0
    assert back["state"][1]["q"].dtype == torch.uint8
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and back["param_groups"][0]["flag"] is None
    assert back["__bnb_like__"]["qmap1"] is back["__bnb_like__"]["qmap2"]  # one tensor stored once
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], value["bf16"])
    assert torch.equal(back["view"], shared[2:4]) and back["empty"].shape == (0,)
    assert back["floats"][:2] == [math.inf, -math.inf] and back["floats"][2] == 0.1 + 0.2
    assert back["numpy"].dtype == np.uint32 and back["numpy"].tolist() == [0, 1, 2, 3, 4]
    assert back["np_scalar"] == 2.5 and back["dtype"] is torch.float16
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}


def test_tree_refuses_objects_it_would_need_pickle_for():
    class Opaque:
        pass

    with pytest.raises(TunerError, match="without pickle"):
        encode_tree({"loss_scaler": Opaque()})


def test_rng_states_restore_every_stream():
    generator = torch.Generator().manual_seed(5)
    state = capture_rng(generator)
    structure, tensors = encode_tree(state)
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=generator))
    restore_rng(decode_tree(json.loads(json.dumps(structure)), tensors), generator)
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=generator))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


def _optimizer(name: str, params):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-2)
    return torch.optim.AdamW(params, lr=1e-2)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizer_state_round_trip_is_bitwise(tmp_path, name):
    """Two optimizers, one restored from the other's stored state, take identical further steps."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(7))]  # 8-bit and 32-bit state
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = _optimizer(name, a), _optimizer(name, b)

    def step(params, opt, seed):
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()

    for seed in range(3):
        step(a, opt_a, seed)
    write_tree(tmp_path, "opt", opt_a.state_dict())
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    step(b, opt_b, 99)  # give b some state of its own first, which loading must replace
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt_b.load_state_dict(read_tree(tmp_path, "opt"))
    if name == "adamw8bit":
        assert opt_b.state[b[0]]["state1"].dtype == torch.uint8
    for seed in range(3, 6):
        step(a, opt_a, seed)
        step(b, opt_b, seed)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def _save(run_dir: Path, step: int, limit=None) -> Path:
    def shared(d: Path) -> None:
        write_tree(d, "trainable", {"w": torch.full((3,), float(step))})

    def rank(d: Path) -> None:
        write_tree(d, "rng-rank0", capture_rng())

    return save_atomically(run_dir, step, shared, rank, True, lambda: None, limit)


def test_atomic_save_manifest_and_leftover_tmp(tmp_path):
    (tmp_path / "checkpoint-9.tmp").mkdir()  # what a crash during a write leaves behind
    path = _save(tmp_path, 3)
    assert path.name == "checkpoint-3" and not (tmp_path / "checkpoint-3.tmp").exists()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == {
        "trainable.json",
        "trainable.safetensors",
        "rng-rank0.json",
        "rng-rank0.safetensors",
    }
    assert verify(path) is None
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert _save(tmp_path, 3) == path and verify(path) is None  # the same step written again replaces it


def test_damaged_checkpoint_is_refused_with_the_file_named(tmp_path):
    _save(tmp_path, 2)
    latest = _save(tmp_path, 4)
    (latest / "trainable.safetensors").write_bytes(b"garbage")
    with pytest.raises(TrainingStopped, match=r"trainable\.safetensors does not match") as info:
        resolve_resume(tmp_path, "latest")
    assert "checkpoint-2" in str(info.value) and "latest-good" in str(info.value)
    assert resolve_resume(tmp_path, "latest-good").name == "checkpoint-2"
    assert resolve_resume(tmp_path, "latest", fallback=True).name == "checkpoint-2"
    with pytest.raises(TrainingStopped, match="damaged"):
        resolve_resume(tmp_path, str(latest))
    (tmp_path / "checkpoint-2" / "manifest.json").unlink()
    with pytest.raises(TrainingStopped, match=r"manifest\.json is missing"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-2"))
    with pytest.raises(TrainingStopped, match="no intact checkpoint"):
        resolve_resume(tmp_path, "latest-good")


def test_resume_paths_and_fresh_starts(tmp_path):
    assert resolve_resume(tmp_path / "nothing", "latest") is None
    _save(tmp_path, 5)
    assert resolve_resume(tmp_path, "checkpoint-5").name == "checkpoint-5"  # relative to the run folder
    assert resolve_resume("elsewhere", str(tmp_path)).name == "checkpoint-5"  # a run folder: its newest
    with pytest.raises(TunerError, match="no such checkpoint"):
        resolve_resume(tmp_path, "checkpoint-6")


def test_total_limit_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 10):
        _save(tmp_path, step, limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]
    assert prune(tmp_path, None) == []
    assert [p.name for p in prune(tmp_path, 1)] == ["checkpoint-3"]
