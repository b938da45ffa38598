"""Optimizers and learning-rate schedules from `[optimizer]`: AdamW8bit, AdamW, Prodigy, Adafactor.

Optional packages are imported only when chosen, with a message naming what to install. Trainers hand
parameter groups (`{"name", "params", optional "lr"}`); a group without its own `lr` gets the rate its
name asks for: `text_encoder*` groups `text_encoder_lr`, `*embedding*` groups `embedding_lr`, every other
group `learning_rate`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tuner.config import OptimizerConfig
from tuner.errors import ConfigError, TunerError

logger = logging.getLogger(__name__)

BNB_CPU_MIN_VERSION = (0, 50)


def group_lr(config: OptimizerConfig, name: str) -> float:
    """The default learning rate of a parameter group, by its name."""
    if name.startswith("text_encoder") and config.text_encoder_lr is not None:
        return config.text_encoder_lr
    if "embedding" in name and config.embedding_lr is not None:
        return config.embedding_lr
    return config.learning_rate


def resolve_groups(config: OptimizerConfig, param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the trainer's groups with an `lr` each, empty groups dropped."""
    groups = []
    for index, group in enumerate(param_groups):
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        name = str(group.get("name", f"group{index}"))
        groups.append({**group, "name": name, "params": params, "lr": group.get("lr", group_lr(config, name))})
    if not groups:
        raise TunerError("the trainer's prepare() returned no trainable parameters (nothing requires grad)")
    return groups


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _import(module: str, pip_name: str, optimizer: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ConfigError(
            f"optimizer.name = {optimizer!r} needs the `{pip_name}` package ({exc}); "
            f"install it with `pip install {pip_name}`, or pick optimizer.name = 'adamw'"
        ) from None


def _bitsandbytes(device: torch.device):
    bnb = _import("bitsandbytes", "bitsandbytes>=0.50", "adamw8bit")
    if device.type == "cpu" and _version(bnb.__version__) < BNB_CPU_MIN_VERSION:
        raise ConfigError(
            f"optimizer.name = 'adamw8bit': bitsandbytes {bnb.__version__} has no CPU 8-bit optimizer kernels "
            "(added in 0.50); run `pip install -U 'bitsandbytes>=0.50'`, train on a CUDA GPU, "
            "or pick optimizer.name = 'adamw'"
        )
    return bnb


def build_optimizer(
    config: OptimizerConfig,
    param_groups: list[dict[str, Any]],
    device: torch.device | str = "cpu",
    fsdp: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer `config.name` names, over the trainer's parameter groups (stepped in the backward pass,
    one parameter at a time, with `fused_backward`)."""
    if config.fused_backward:
        from tuner.fused_backward import FusedBackwardOptimizer

        groups = resolve_groups(config, param_groups)
        plain = config.model_copy(update={"fused_backward": False})
        return FusedBackwardOptimizer(groups, lambda group: build_optimizer(plain, [group], device, fsdp))
    groups = resolve_groups(config, param_groups)
    betas = (config.adam_beta1, config.adam_beta2)
    common = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if config.name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=config.adam_epsilon, **common)
    if config.name == "adamw8bit":
        bnb = _bitsandbytes(torch.device(device))
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=config.adam_epsilon, **common)
    if config.name == "prodigy":
        prodigyopt = _import("prodigyopt", "prodigyopt", "prodigy")
        if config.learning_rate < 0.1:
            logger.warning(
                "optimizer.learning_rate = %g with Prodigy: Prodigy finds the step size itself and the learning "
                "rate only scales it; 1.0 is the usual value",
                config.learning_rate,
            )
        return prodigyopt.Prodigy(groups, betas=betas, eps=config.adam_epsilon, fsdp_in_use=fsdp, **common)
    if config.name == "adafactor":
        optimization = _import("transformers.optimization", "transformers", "adafactor")
        # A fixed learning rate, so schedules and per-group rates mean the same as for the other optimizers.
        return optimization.Adafactor(
            groups, scale_parameter=False, relative_step=False, warmup_init=False, beta1=None, **common
        )
    raise ConfigError(f"optimizer.name = {config.name!r}: allowed: adamw8bit, adamw, prodigy, adafactor")


def check_fused_backward(config) -> None:
    """Refuse `optimizer.fused_backward` where a step needs all gradients at once, or cannot be split."""
    import os

    oc, tc = config.optimizer, config.train
    if not oc.fused_backward:
        return
    field = "optimizer.fused_backward = true"
    if tc.gradient_accumulation_steps > 1:
        raise ConfigError(
            f"{field} with train.gradient_accumulation_steps = {tc.gradient_accumulation_steps}: each gradient is "
            "applied and freed as soon as backward completes it, so there is nothing left to accumulate into; "
            "set gradient_accumulation_steps = 1 (raise train_batch_size instead) or fused_backward = false"
        )
    if oc.max_grad_norm is not None:
        raise ConfigError(
            f"{field} with optimizer.max_grad_norm = {oc.max_grad_norm:g}: clipping scales every gradient by the "
            "global norm of all of them, which is known only after the last one, when the others are already "
            "applied; set max_grad_norm = none (kohya's fused backward pass does not clip either) or "
            "fused_backward = false"
        )
    if oc.name == "prodigy":
        raise ConfigError(
            f"{field} with optimizer.name = 'prodigy': Prodigy estimates one step size from all parameters "
            "together, which a per-parameter step cannot; pick adamw, adamw8bit or adafactor"
        )
    if tc.mixed_precision == "fp16":
        raise ConfigError(
            f"{field} with train.mixed_precision = 'fp16': the grad scaler unscales and checks all gradients "
            "before a step; use 'bf16' (or 'no') with fused_backward"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"{field} with several processes: DDP averages gradients across processes after backward hands them "
            "over, so a step inside backward would apply this process's gradient alone; train on one process"
        )


def build_lr_scheduler(config: OptimizerConfig, optimizer: torch.optim.Optimizer, max_train_steps: int):
    """A diffusers schedule stepped once per optimizer step; `constant` with warmup means constant after warmup."""
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_train_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (bitsandbytes nests its quantized state one level down)."""

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0

    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                if id(value) in seen:
                    continue
                seen.add(id(value))
            total += size(value)
    return total
