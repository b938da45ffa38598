"""Shared fixtures: tiny pipelines of each family, built once per session into a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow run first, so that with `--dist worksteal` (the README's command) the two workers finish
    together: a two-minute test started last would leave one worker waiting on the other."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Lazily built tiny pipelines: `tiny_models["sd1"]` is a diffusers folder."""
    from tuner.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny-models")

    class Models(dict):
        def __missing__(self, family: str) -> Path:
            path = make_tiny(root / family, family)
            self[family] = path
            return path

    return Models()


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    """Four 64 px photos of a toy subject (a red square on white, shifted a little), each captioned
    `a photo of sks toy` (the flow-family and quantization tests' TRIGGER)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("subject")
    for i in range(4):
        img = np.full((64, 64, 3), 255, np.uint8)
        o = 10 + 4 * i
        img[o : o + 28, o : o + 28] = [220, 20, 20]
        Image.fromarray(img).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of sks toy", encoding="utf-8")
    return folder


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def family(request) -> str:
    return request.param


@pytest.fixture
def toy_method():
    """A registered method `toy` with its own table, for config tests that need no real trainer."""
    from tuner import registry
    from tuner.config import MethodConfig
    from tuner.trainer import Trainer

    class ToyConfig(MethodConfig):
        rank: int = 4
        """Adapter rank."""
        alpha: float = 4.0
        """Adapter alpha."""

    class ToyTrainer(Trainer):
        name = "toy"
        Config = ToyConfig

    registry.register("toy", ToyTrainer)
    yield ToyTrainer
    registry._extra.pop("toy", None)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread: tiny models run fastest so on 2 cores (OpenMP spin-waits cost more than they give),
    and in-process and subprocess runs use the same kernels, bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Each in-process training run starts its own accelerate state (mixed precision differs between runs)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
