"""Speed levers: regional torch.compile keeps the loss curve, the fused backward step keeps the weights, and the
combinations that cannot work are refused with the field and the reason."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from tuner.config import RunConfig
from tuner.errors import ConfigError


def run_config(**tables) -> RunConfig:
    config = {"method": "lora", "model": {"pretrained_model_name_or_path": "unused"}, "train": {"report_to": "none"}}
    for table, values in tables.items():
        config.setdefault(table, {}).update(values)
    return RunConfig.for_method("lora").model_validate(config)


def check(config: RunConfig) -> None:
    from tuner.runtime import check_environment

    check_environment(config)


@pytest.mark.parametrize(
    ("tables", "words"),
    [
        ({"optimizer": {"fused_backward": True, "max_grad_norm": None}, "train": {"gradient_accumulation_steps": 2}},
         ["optimizer.fused_backward", "gradient_accumulation_steps = 2", "nothing left to accumulate"]),
        ({"optimizer": {"fused_backward": True}}, ["max_grad_norm = 1", "global norm", "max_grad_norm = none"]),
        ({"optimizer": {"fused_backward": True, "max_grad_norm": None, "name": "prodigy"}},
         ["prodigy", "one step size"]),
        ({"optimizer": {"fused_backward": True, "max_grad_norm": None}, "train": {"mixed_precision": "fp16"}},
         ["fp16", "grad scaler"]),
        ({"train": {"compile": "blocks", "attention": "xformers"}}, []),  # xformers itself is refused first on CPU
        ({"train": {"sdpa_backend": "flash"}}, ["train.sdpa_backend = 'flash'", "no CUDA"]),
    ],
)  # fmt: skip
def test_combinations_that_cannot_work_are_refused_with_the_reason(tables, words):
    with pytest.raises(ConfigError) as info:
        check(run_config(**tables))
    for word in words:
        assert word in str(info.value)


def test_compile_is_refused_with_deepspeed_and_with_xformers(monkeypatch):
    from tuner import speed

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="compile = 'blocks' with DeepSpeed"):
        speed.check(run_config(train={"compile": "blocks"}))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(ConfigError, match="cannot trace xformers"):
        speed.check(run_config(train={"compile": "denoiser", "attention": "xformers"}))
    speed.check(run_config(train={"compile": "blocks"}, optimizer={"fused_backward": True, "max_grad_norm": None}))
    with pytest.raises(ValueError):
        run_config(train={"compile": "everything"})


def one_block_unet(seed: int = 0):
    """SD1's UNet classes with one transformer-block width and no mid block: regional compilation compiles one
    graph (and its backward) for all three blocks, which keeps CPU inductor's compile time small."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, mid_block_type=None,
    )  # fmt: skip


def sd1_parts(unet):
    from diffusers import DDPMScheduler

    from tuner.families import FAMILIES
    from tuner.models import Parts
    from tuner.tiny import tiny_vae

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return Parts(family=FAMILIES["sd1"], source="test", prediction_type="epsilon", denoiser=unet, vae=tiny_vae(),
                 text_encoders=[], tokenizers=[], noise_scheduler=scheduler)  # fmt: skip


def train_steps(parts, config: RunConfig, steps: int) -> list[float]:
    """Full fine-tuning steps of the denoiser with the suite's loss and optimizer; the losses."""
    from tuner.losses import LossOptions, diffusion_loss
    from tuner.optim import build_optimizer

    params = list(parts.denoiser.parameters())
    optimizer = build_optimizer(config.optimizer, [{"name": "unet", "params": params}])
    options = LossOptions.from_config(config)
    data = torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        batch = {
            "latents": torch.randn(2, 4, 8, 8, generator=data),
            "prompt_embeds": torch.randn(2, 7, 32, generator=data),
        }
        loss = diffusion_loss(parts, batch, options, generator=noise)
        loss.backward()
        if config.optimizer.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.optimizer.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    return losses


def test_fused_backward_gives_the_weights_of_the_ordinary_step():
    """10 AdamW steps of a whole UNet: stepping each parameter inside backward (and freeing its gradient there)
    lands on the weights the ordinary step after backward does."""
    from tuner.fused_backward import FusedBackwardOptimizer
    from tuner.optim import build_optimizer, optimizer_state_bytes

    base = one_block_unet()
    plain, fused = sd1_parts(copy.deepcopy(base)), sd1_parts(copy.deepcopy(base))
    optimizer = {"name": "adamw", "learning_rate": 1e-3, "max_grad_norm": None}
    plain_losses = train_steps(plain, run_config(optimizer=optimizer), 10)
    fused_losses = train_steps(fused, run_config(optimizer={**optimizer, "fused_backward": True}), 10)
    assert plain_losses == pytest.approx(fused_losses, rel=1e-5)
    changed = 0
    for (name, a), b, c in zip(plain.denoiser.named_parameters(), fused.denoiser.parameters(), base.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        assert b.grad is None  # freed inside backward
        changed += not torch.equal(b, c)
    assert changed == len(list(base.parameters()))
    # One optimizer per parameter, looking like one: state, schedule-visible groups, a state dict that loads back.
    cfg = run_config(optimizer={**optimizer, "fused_backward": True}).optimizer
    params = list(fused.denoiser.parameters())
    opt = build_optimizer(cfg, [{"name": "unet", "params": params}])
    assert isinstance(opt, FusedBackwardOptimizer) and len(opt.param_groups) == len(params)
    assert all(g["name"] == "unet" for g in opt.param_groups)
    train_steps_with(opt, fused)
    assert optimizer_state_bytes(opt) >= 2 * 4 * sum(p.numel() for p in params)  # exp_avg, exp_avg_sq (+ steps)
    again = build_optimizer(cfg, [{"name": "unet", "params": params}])
    again.load_state_dict(opt.state_dict())
    assert again.inner[0].state[params[0]]["exp_avg"].equal(opt.inner[0].state[params[0]]["exp_avg"])
    opt.remove_hooks()
    again.remove_hooks()


def train_steps_with(optimizer, parts) -> None:
    from tuner.losses import LossOptions, diffusion_loss

    batch = {"latents": torch.randn(2, 4, 8, 8), "prompt_embeds": torch.randn(2, 7, 32)}
    diffusion_loss(parts, batch, LossOptions.from_config(run_config())).backward()
    optimizer.step()


@pytest.mark.slow  # 30-110 s: inductor compiles on the CPU
def test_regional_compilation_keeps_the_loss_curve():
    """20 steps of a compiled (CPU inductor, repeated blocks only) and an uncompiled UNet from the same weights
    and batches give the same losses and weights within float tolerance; compile time is printed."""
    from tuner import speed

    base = one_block_unet()
    eager, compiled = sd1_parts(copy.deepcopy(base)), sd1_parts(copy.deepcopy(base))
    config = run_config(train={"compile": "blocks"}, optimizer={"name": "adamw", "learning_rate": 1e-3})
    speed.apply(compiled, config)
    blocks = [m for m in compiled.denoiser.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 3 and all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)
    assert "compile blocks (BasicTransformerBlock)" in speed.describe(config, compiled)
    started = time.perf_counter()
    compiled_losses = train_steps(compiled, config, 20)
    compiled_s = time.perf_counter() - started
    started = time.perf_counter()
    eager_losses = train_steps(eager, config, 20)
    print(f"20 steps: compiled {compiled_s:.1f} s (compile included), eager {time.perf_counter() - started:.1f} s")
    assert compiled_losses == pytest.approx(eager_losses, rel=2e-3, abs=1e-5)
    for a, b in zip(eager.denoiser.parameters(), compiled.denoiser.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4)
    assert sum(not torch.equal(a, c) for a, c in zip(eager.denoiser.parameters(), base.parameters())) > 0


def test_blocks_mode_needs_blocks_to_compile():
    from tuner import speed

    with pytest.raises(ConfigError, match="declares no repeated blocks"):
        speed.repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert speed.repeated_blocks(one_block_unet()) == ["BasicTransformerBlock"]
