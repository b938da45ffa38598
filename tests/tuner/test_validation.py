"""Validation grids rendered during training: base memoized, tuned re-rendered, training state left intact."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tuner import registry
from tuner.config import MethodConfig, RunConfig
from tuner.errors import TunerError
from tuner.grid import cell_size, grid_layout, grid_size
from tuner.models import load_parts
from tuner.trainer import Trainables, Trainer
from tuner.validation import model_scheduler_name, render_validation_grid, validation_pipeline


class GridToyConfig(MethodConfig):
    noise: float = 0.05
    """Weight noise `train_a_bit` adds to the UNet."""


class FullToyTrainer(Trainer):
    """Trains the whole UNet (so it cannot scale its change): `train_a_bit` stands in for optimizer steps."""

    name = "gridtoy"
    Config = GridToyConfig

    def prepare(self, parts):
        parts.denoiser.requires_grad_(True)
        return Trainables({"unet": parts.denoiser}, [{"name": "unet", "params": list(parts.denoiser.parameters())}])

    def train_a_bit(self, parts, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in parts.denoiser.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * self.method_config.noise)


class ScalableToyTrainer(FullToyTrainer):
    """Keeps base weights and a delta, like an adapter: weight = base + scale * delta."""

    name = "gridtoy_scaled"

    def prepare(self, parts):
        self.base = {k: v.clone() for k, v in parts.denoiser.state_dict().items()}
        self.train_a_bit(parts)
        self.delta = {k: v - self.base[k] for k, v in parts.denoiser.state_dict().items()}
        self.scales: list[float] = []
        return super().prepare(parts)

    def set_adapter_scale(self, parts, scale):
        self.scales.append(scale)
        parts.denoiser.load_state_dict({k: self.base[k] + scale * self.delta[k] for k in self.base})
        return True


@pytest.fixture(autouse=True)
def _registered():
    for cls in (FullToyTrainer, ScalableToyTrainer):
        registry.register(cls.name, cls)
    yield
    for cls in (FullToyTrainer, ScalableToyTrainer):
        registry._extra.pop(cls.name, None)


def _config(method: str, **validation):
    validation = {"seeds": [0, 1], "num_inference_steps": 2, "guidance_scale": 1.0, **validation}
    return RunConfig.for_method(method)(
        method=method, data={"resolution": 64, "instance_prompt": "a photo of sks dog"}, validation=validation
    )


def _cells(grid, rows: int, cols: int, groups: int) -> list[list[np.ndarray]]:
    layout = grid_layout(rows, cols, cell_size((64, 64)), title=True, groups=groups)
    arr = np.asarray(grid)
    out = []
    for r in range(rows):
        row = []
        for c in range(cols):
            x, y = layout.cell_origin(r, c)
            row.append(arr[y : y + layout.cell_h, x : x + layout.cell_w].copy())
        out.append(row)
    return out


@pytest.mark.parametrize(("family", "seeds"), [("sd1", [0, 1]), ("sdxl", [0])])
def test_full_finetune_grid_keeps_base_and_rerenders_tuned(tiny_models, family, seeds):
    parts = load_parts(str(tiny_models[family]))
    trainer = FullToyTrainer(_config("gridtoy", prompts=["a photo of {token}", "a red circle"], seeds=seeds))
    trainer.config.data.token = "sks"
    trainer.prepare(parts)
    parts.denoiser.train()
    parts.denoiser.conv_out.eval()  # a mixed-mode module tree must come back exactly as it was
    modes = {name: m.training for name, m in parts.denoiser.named_modules()}
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    rng = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    weights = {k: v.clone() for k, v in parts.denoiser.state_dict().items()}

    first = render_validation_grid(trainer, parts, 0)

    assert torch.equal(torch.random.get_rng_state(), rng[0])
    assert random.getstate() == rng[1] and np.array_equal(np.random.get_state()[1], rng[2])
    assert {name: m.training for name, m in parts.denoiser.named_modules()} == modes
    assert all(p.grad is None and p.requires_grad for p in parts.denoiser.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in parts.denoiser.state_dict().items())
    assert trainer._base_images is not None and len(trainer._base_images) == 2
    n = len(seeds)
    # 2 prompts x (base, tuned) x seeds
    assert first.size == grid_size(2, 2 * n, cell_size((64, 64)), title=True, groups=2)

    trainer.train_a_bit(parts)
    later = render_validation_grid(trainer, parts, 10)

    a, b = _cells(first, 2, 2 * n, 2), _cells(later, 2, 2 * n, 2)
    for r in range(2):
        for c in range(n):  # base columns: the memoized step-0 images, pixel for pixel
            assert np.array_equal(a[r][c], b[r][c])
        for c in range(n, 2 * n):  # tuned columns: rendered again from the changed UNet
            assert not np.array_equal(a[r][c], b[r][c])
    # At step 0 "tuned" is the base model itself.
    assert np.array_equal(a[0][0], a[0][n])
    assert torch.equal(torch.random.get_rng_state(), rng[0])


def test_scalable_method_gets_one_column_set_per_scale_and_ends_at_scale_one(tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = ScalableToyTrainer(_config("gridtoy_scaled", scales=[0.0, 0.5, 1.0], seeds=[3]))
    trainer.prepare(parts)
    tuned = {k: v.clone() for k, v in parts.denoiser.state_dict().items()}

    grid = render_validation_grid(trainer, parts, 4)

    # The default prompts (the instance prompt only) x 3 scales x 1 seed.
    assert grid.size == grid_size(1, 3, cell_size((64, 64)), title=True, groups=3)
    assert trainer.scales[-1] == 1.0 and {0.0, 0.5, 1.0} <= set(trainer.scales)
    assert all(torch.equal(v, tuned[k]) for k, v in parts.denoiser.state_dict().items())
    cells = _cells(grid, 1, 3, 3)[0]
    assert not np.array_equal(cells[0], cells[2])  # base vs scale 1
    assert not hasattr(trainer, "_base_images")  # scaling needs no memoized base


def test_mixed_precision_parts_render(tiny_models):
    """Frozen parts in bf16 next to a trained fp32 UNet, as the loop keeps them under mixed precision."""
    parts = load_parts(str(tiny_models["sd1"]), weight_dtype=torch.bfloat16)
    parts.denoiser.to(torch.float32)
    grid = render_validation_grid(FullToyTrainer(_config("gridtoy", seeds=[0])), parts, 0)
    assert grid.size == grid_size(1, 2, cell_size((64, 64)), title=True, groups=2)
    assert {p.dtype for p in parts.denoiser.parameters()} == {torch.float32}
    assert {p.dtype for p in parts.vae.parameters()} == {torch.bfloat16}


def test_disabled_validation_renders_nothing(tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = FullToyTrainer(_config("gridtoy", enabled=False))
    assert render_validation_grid(trainer, parts, 0) is None


def test_token_placeholder_needs_a_token(tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = FullToyTrainer(_config("gridtoy", prompts=["a photo of {token}"]))
    with pytest.raises(TunerError, match="data.token"):
        render_validation_grid(trainer, parts, 0)


def test_sampling_uses_the_models_own_scheduler_and_never_the_training_one(tiny_models):
    parts = load_parts(str(tiny_models["sd1"]))
    assert model_scheduler_name(parts) == "PNDMScheduler"
    pipe = validation_pipeline(parts)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler is not parts.noise_scheduler
    assert pipe.scheduler is not getattr(parts, "sample_scheduler", None)
    assert pipe.scheduler.config.skip_prk_steps  # configured as the model's own scheduler
    assert type(validation_pipeline(parts, "DDIMScheduler").scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(TunerError, match="EulerDiscreteScheduler"):
        validation_pipeline(parts, "NoSuchScheduler")


@pytest.mark.parametrize(("family", "scales"), [("sd1", [0.0, 1.0]), ("sdxl", [1.0])])
def test_img2img_and_inpainting_rows_render_base_vs_tuned(tiny_models, family, scales, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "face.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    mask.save(tmp_path / "mask.png")
    parts = load_parts(str(tiny_models[family]))
    validation = {"seeds": [0], "num_inference_steps": 2, "guidance_scale": 1.0, "scales": scales,
                  "init_images": [str(tmp_path / "face.png")] * 2, "masks": ["", str(tmp_path / "mask.png")],
                  "strength": 0.7, "scheduler": "Euler a"}  # fmt: skip
    config = RunConfig.for_method("gridtoy_scaled")(
        method="gridtoy_scaled", data={"resolution": 32, "instance_prompt": "a (sks:1.3) dog"}, validation=validation
    )
    trainer = ScalableToyTrainer(config)
    trainer.prepare(parts)

    grid = render_validation_grid(trainer, parts, 5)

    # Rows: text-to-image, img2img, inpainting; columns: base | tuned (SD1), tuned (SDXL).
    cols = len(scales)
    layout = grid_layout(3, cols, cell_size((32, 32)), title=True, groups=cols)
    assert grid.size == layout.size
    arr = np.asarray(grid)
    origins = [[layout.cell_origin(r, c) for c in range(cols)] for r in range(3)]
    cells = [[arr[y : y + layout.cell_h, x : x + layout.cell_w] for x, y in row] for row in origins]
    if cols == 2:
        assert all(not np.array_equal(row[0], row[1]) for row in cells)  # base vs tuned differ on every row
    assert not np.array_equal(cells[0][-1], cells[1][-1]) and not np.array_equal(cells[1][-1], cells[2][-1])
    assert trainer.scales[-1] == 1.0


def test_bad_image_rows_are_named(tiny_models, tmp_path):
    with pytest.raises(Exception, match="validation.masks: 1 masks for 2 init_images"):
        _config("gridtoy", init_images=["a.png", "b.png"], masks=["m.png"])
    parts = load_parts(str(tiny_models["sd1"]))
    trainer = FullToyTrainer(_config("gridtoy", init_images=[str(tmp_path / "missing.png")]))
    with pytest.raises(TunerError, match=r"validation.init_images\[0\] '.*missing.png': file not found"):
        render_validation_grid(trainer, parts, 0)
