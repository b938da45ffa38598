"""Speed levers that change no result beyond rounding: TF32, the SDPA kernel, channels-last, torch.compile.

Each is a `[train]` field (`allow_tf32`, `sdpa_backend`, `channels_last`, `compile`), refused up front where it
cannot work (`check`), applied once the data is ready (`apply`), and named in the run header (`describe`).
Regional compilation (`compile = "blocks"`) compiles each repeated block class of the denoiser once, the way
diffusers' `compile_repeated_blocks` does, which costs seconds where compiling the whole denoiser costs
minutes, for nearly the same step time.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn

from tuner.config import RunConfig
from tuner.errors import ConfigError

logger = logging.getLogger(__name__)

SDPA_BACKENDS = {"flash": "flash", "efficient": "mem_efficient", "cudnn": "cudnn", "math": "math"}


def _uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def check(config: RunConfig) -> None:
    """Refuse, before anything loads, a lever this machine or this combination cannot use."""
    tc = config.train
    cuda = torch.cuda.is_available()
    if tc.sdpa_backend != "auto" and not cuda:
        raise ConfigError(
            f"train.sdpa_backend = {tc.sdpa_backend!r} picks a CUDA attention kernel and this machine has no CUDA "
            "GPU; use 'auto' (torch picks the CPU kernel)"
        )
    if tc.compile == "none":
        return
    if _uses_deepspeed():
        raise ConfigError(
            f"train.compile = {tc.compile!r} with DeepSpeed: DeepSpeed wraps the model in its own engine, whose "
            "ZeRO hooks break torch.compile's graphs; use compile = 'none' with DeepSpeed (or DDP / FSDP)"
        )
    if tc.attention == "xformers":
        raise ConfigError(
            f"train.compile = {tc.compile!r} with train.attention = 'xformers': torch.compile cannot trace "
            "xformers' kernels and fuses SDPA itself; use attention = 'sdpa' with compile"
        )
    if not cuda and shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        raise ConfigError(
            f"train.compile = {tc.compile!r} on the CPU needs a C++ compiler (g++) for torch's inductor; install "
            "one (`apt-get install g++`) or use compile = 'none'"
        )


def set_globals(config: RunConfig) -> None:
    """Process-wide switches: TF32 matmuls and convolutions, and which SDPA kernels CUDA may pick."""
    tc = config.train
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = tc.allow_tf32
    torch.backends.cudnn.allow_tf32 = tc.allow_tf32
    if tc.sdpa_backend != "auto":
        chosen = SDPA_BACKENDS[tc.sdpa_backend]
        for name in SDPA_BACKENDS.values():
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(name == chosen)


def wants_channels_last(config: RunConfig, denoiser: nn.Module, device: torch.device) -> bool:
    """`on`, or `auto` for a convolutional denoiser (a UNet) on CUDA, where cuDNN's NHWC kernels are faster."""
    mode = config.train.channels_last
    if mode == "auto":
        return device.type == "cuda" and _is_convolutional(denoiser)
    return mode == "on"


def apply(parts, config: RunConfig) -> None:
    """Channels-last and torch.compile on the denoiser, in place (parameters and state-dict keys unchanged)."""
    denoiser = parts.unwrapped(parts.denoiser)
    if wants_channels_last(config, denoiser, parts.device):
        denoiser.to(memory_format=torch.channels_last)
    mode = config.train.compile
    if mode == "denoiser":
        denoiser.compile()
    elif mode == "blocks":
        blocks = repeated_blocks(denoiser)
        for module in denoiser.modules():
            if type(module).__name__ in blocks:
                module.compile()


def repeated_blocks(denoiser: nn.Module) -> list[str]:
    """Class names of the blocks regional compilation compiles: the model's own `_repeated_blocks` (diffusers'
    declaration), else the class of its `transformer_blocks`; refused when it has neither."""
    declared = list(getattr(denoiser, "_repeated_blocks", None) or [])
    if not declared:
        blocks = getattr(denoiser, "transformer_blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            declared = [type(blocks[0]).__name__]
    present = {type(m).__name__ for m in denoiser.modules()}
    found = [name for name in declared if name in present]
    if not found:
        raise ConfigError(
            f"train.compile = 'blocks': {type(denoiser).__name__} declares no repeated blocks to compile; "
            "use compile = 'denoiser'"
        )
    return found


def describe(config: RunConfig, parts) -> str:
    """The levers in force, for the run header."""
    tc = config.train
    cuda = parts.device.type == "cuda"
    if cuda:
        ampere = torch.cuda.get_device_capability(parts.device)[0] >= 8
        tf32 = ("on" if ampere else "on (no effect before Ampere)") if tc.allow_tf32 else "off"
        sdpa = tc.sdpa_backend if tc.sdpa_backend != "auto" else "auto (flash / memory-efficient)"
    else:
        tf32, sdpa = "n/a (CPU)", "auto (CPU)"
    attention = "xformers" if tc.attention == "xformers" else f"sdpa {sdpa}"
    layout = "channels-last" if wants_channels_last(config, parts.unwrapped(parts.denoiser), parts.device) else "NCHW"
    compiled = tc.compile
    if compiled == "blocks":
        compiled = f"blocks ({', '.join(repeated_blocks(parts.unwrapped(parts.denoiser)))})"
    fused = " · fused backward" if config.optimizer.fused_backward else ""
    return f"tf32 {tf32} · attention {attention} · {layout} · compile {compiled}{fused}"


def _is_convolutional(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())
