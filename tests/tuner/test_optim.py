"""Optimizers and schedules: every choice steps on CPU, per-group rates, clear messages for missing packages."""

from __future__ import annotations

import sys

import pytest
import torch

from tuner.config import OptimizerConfig
from tuner.errors import ConfigError, TunerError
from tuner.optim import build_lr_scheduler, build_optimizer, optimizer_state_bytes, resolve_groups


def _groups():
    torch.manual_seed(0)
    unet = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(64))]
    te = [torch.nn.Parameter(torch.randn(32, 32))]
    emb = [torch.nn.Parameter(torch.randn(2, 32))]
    return [
        {"name": "unet", "params": unet},
        {"name": "text_encoder", "params": te},
        {"name": "embeddings", "params": emb},
    ]


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "prodigy", "adafactor"])
def test_every_optimizer_steps_on_cpu(name):
    groups = _groups()
    config = OptimizerConfig(name=name, learning_rate=1.0 if name == "prodigy" else 1e-2)
    optimizer = build_optimizer(config, groups)
    before = [p.detach().clone() for g in groups for p in g["params"]]
    for _ in range(2):
        for g in groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = [p for g in groups for p in g["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder", "embeddings"]


def test_group_learning_rates_by_name_and_explicit():
    config = OptimizerConfig(name="adamw", learning_rate=1e-4, text_encoder_lr=5e-5, embedding_lr=5e-3)
    groups = _groups()
    groups[0]["lr"] = 2e-4  # a trainer's explicit rate wins
    assert [g["lr"] for g in resolve_groups(config, groups)] == [2e-4, 5e-5, 5e-3]
    plain = OptimizerConfig(name="adamw", learning_rate=1e-4)
    assert [g["lr"] for g in resolve_groups(plain, _groups())] == [1e-4, 1e-4, 1e-4]


def test_no_trainable_parameters_is_a_clear_error():
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(TunerError, match="no trainable parameters"):
        build_optimizer(OptimizerConfig(name="adamw"), [{"name": "unet", "params": [frozen]}])


def test_missing_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes `import prodigyopt` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install prodigyopt"):
        build_optimizer(OptimizerConfig(name="prodigy"), _groups())


def test_old_bitsandbytes_on_cpu_is_refused_with_the_fix(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.49.2")
    with pytest.raises(ConfigError, match=r"bitsandbytes 0\.49\.2 .*>=0\.50"):
        build_optimizer(OptimizerConfig(name="adamw8bit"), _groups(), device="cpu")


def test_adamw8bit_state_is_at_least_3_5x_smaller():
    params = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(4)]
    sizes = {}
    for name in ("adamw", "adamw8bit"):
        optimizer = build_optimizer(OptimizerConfig(name=name), [{"name": "unet", "params": params}])
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        sizes[name] = optimizer_state_bytes(optimizer)
    assert sizes["adamw"] / sizes["adamw8bit"] >= 3.5, sizes


def test_warmup_and_schedules():
    def lrs(**fields):
        config = OptimizerConfig(name="adamw", learning_rate=1.0, **fields)
        optimizer = build_optimizer(config, [{"name": "unet", "params": [torch.nn.Parameter(torch.ones(2))]}])
        scheduler = build_lr_scheduler(config, optimizer, 4)
        out = []
        for _ in range(4):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    assert lrs() == [1.0, 1.0, 1.0, 1.0]
    assert lrs(lr_warmup_steps=2) == [0.0, 0.5, 1.0, 1.0]  # `constant` with warmup: constant after it
    assert lrs(lr_scheduler="linear", lr_warmup_steps=2) == [0.0, 0.5, 1.0, 0.5]
    cosine = lrs(lr_scheduler="cosine")
    assert cosine[0] == 1.0 and cosine == sorted(cosine, reverse=True)
