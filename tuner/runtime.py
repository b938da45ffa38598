"""How a run meets the hardware: the Accelerator, precision, memory levers, and (un)wrapping trained modules.

Everything here is method-agnostic: it reads `[train]` and the trainer's `Trainables`, never a method name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from tuner import speed
from tuner.config import RunConfig
from tuner.errors import ConfigError, TunerError
from tuner.tracking import check_backend

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_environment(config: RunConfig) -> None:
    """Refuse, before anything loads, what this machine cannot do."""
    from tuner.optim import check_fused_backward

    tc = config.train
    check_backend(tc.report_to)
    speed.check(config)
    check_fused_backward(config)
    if tc.attention == "xformers":
        if not torch.cuda.is_available():
            raise ConfigError("train.attention = 'xformers' needs a CUDA GPU; use 'sdpa' (the default) here")
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ConfigError(
                "train.attention = 'xformers': xformers is not installed (`pip install xformers`); "
                "'sdpa' (the default) is as fast on recent torch"
            ) from None
    if tc.mixed_precision == "fp16" and not torch.cuda.is_available():
        logger.warning("train.mixed_precision = 'fp16' without CUDA runs with no grad scaler; prefer 'bf16'")


def make_accelerator(config: RunConfig):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    tc = config.train
    run_dir = os.fspath(tc.output_dir)
    speed.set_globals(config)  # TF32, SDPA kernels
    return Accelerator(
        # Launched as several processes on a machine without CUDA: DDP over gloo on the CPU, not N lone runs.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=os.path.join(run_dir, "logs")),
        step_scheduler_with_optimizer=False,  # stepped once per real optimizer step, whatever the process count
        # A lost process turns the others' next collective into an error after this long, not a hang (NCCL's
        # watchdog aborts; gloo raises, and `tuner.processes` names the lost one).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=tc.ddp_timeout))],
    )


def apply_precision(parts, params: list[nn.Parameter], mixed_precision: str) -> None:
    """Frozen parts stay in the weight dtype; trained parameters (and so their optimizer state) become fp32.

    Half-precision weights would round away updates smaller than their epsilon, and fp16 gradients cannot be
    unscaled; autocast still computes in half. A VAE whose config asks for it (`force_upcast`) stays fp32.
    """
    if WEIGHT_DTYPES[mixed_precision] == torch.float32:
        return
    if getattr(parts.vae.config, "force_upcast", False):
        parts.vae.to(torch.float32)
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()


def memory_levers(parts, config: RunConfig) -> None:
    """Gradient checkpointing in the denoiser's blocks and the text encoders; xformers attention when asked."""
    tc = config.train
    if tc.gradient_checkpointing:
        denoiser = parts.unwrapped(parts.denoiser)
        if hasattr(denoiser, "enable_gradient_checkpointing"):
            denoiser.enable_gradient_checkpointing()
        for encoder in parts.text_encoders:
            if hasattr(encoder, "gradient_checkpointing_enable"):
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.attention == "xformers":
        for module in (parts.denoiser, parts.vae):
            parts.unwrapped(module).enable_xformers_memory_efficient_attention()


def ready_for_steps(parts, trainables, data, config: RunConfig) -> None:
    """Once the caches are full: free what no step calls, then channels-last and compile (`tuner.speed`)."""
    free_cached_parts(parts, trainables, data, config)
    speed.apply(parts, config)


def free_cached_parts(parts, trainables, data, config: RunConfig) -> dict[str, int]:
    """After the caches are filled: free the frozen parts no training step calls -> {part: bytes freed}.

    The text encoders go when every caption's embeddings are cached and none trains; the VAE when every latent is
    cached and no step reads pixels. On a GPU they move to the CPU; on the CPU they are spilled to a file next
    to the data cache. Validation and class images bring them back (`encoders_on`); `restore_freed` before
    the final save. Recorded on `parts.freed` for the run header."""
    from tuner import offload

    assembler = data.assembler
    trained = {id(m) for m in trainables.modules.values()}
    idle_text = assembler.text_cached or not assembler.want_text
    candidates: list[tuple[str, nn.Module]] = []
    if idle_text and "input_ids" not in trainables.needs:
        names = [spec.component for spec in parts.family.encoders]
        candidates += list(zip(names, parts.text_encoders))
    if "pixels" not in trainables.needs and (assembler.latents_cached or not assembler.want_latents):
        candidates.append(("vae", parts.vae))
    spill = assembler.cache_dir if parts.device.type == "cpu" else None
    if spill is not None:
        os.makedirs(spill, exist_ok=True)
    for name, module in candidates:
        if id(module) in trained or any(p.requires_grad for p in module.parameters()):
            continue
        parts.freed[name] = offload.free(module, parts.device, spill, name)
    if parts.freed:
        logger.info("freed after caching: %s", describe_freed(parts.freed))
    return parts.freed


def describe_freed(freed: dict[str, int]) -> str:
    return ", ".join(f"{name} {size / 2**20:,.1f} MiB" for name, size in freed.items())


def _freed_modules(parts) -> list[nn.Module]:
    from tuner import offload

    return [m for m in (*parts.text_encoders, parts.vae) if offload.is_freed(m)]


def restore_freed(parts) -> None:
    """Every freed part back on the training device, for good (the end of a run: save and round trip)."""
    from tuner import offload

    for module in (*parts.text_encoders, parts.vae):
        offload.restore(module)


@contextmanager
def encoders_on(parts) -> Iterator[None]:
    """The parts freed after caching (text encoders, VAE) back on the device for the duration (sampling needs
    them), then freed again."""
    from tuner import offload

    again = [(module, offload.restore(module)) for module in _freed_modules(parts)]
    try:
        yield
    finally:
        for module, (device, spill, name) in again:
            offload.free(module, device, spill, name)


def prepare(accelerator, parts, modules: dict[str, nn.Module], optimizer, scheduler, micro_batch: int):
    """accelerate-prepare the trained modules with optimizer and schedule -> (wrapped by key, optimizer, schedule),
    and put each wrapped module on `parts` where its key says it lives, so the trainer calls the wrapper.

    DeepSpeed takes one model per Accelerator: several trained modules go in as one `ModuleDict`, and the
    parts keep calling their own modules (ZeRO-1/2 reduce gradients through parameter hooks, not forward).
    """
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            ds_config["train_micro_batch_size_per_gpu"] = micro_batch  # no dataloader to infer it from
        if len(modules) > 1:
            modules = {"trained": nn.ModuleDict({k.replace(".", "_"): m for k, m in modules.items()})}
    names = list(modules)
    prepared = accelerator.prepare(*modules.values(), optimizer, scheduler)
    wrapped = dict(zip(names, prepared[: len(names)]))
    for key, module in wrapped.items():
        if not place(parts, key, module) and module is not modules[key] and not deepspeed:
            raise TunerError(
                f"trainables.modules[{key!r}]: not a Parts attribute (denoiser, vae, text_encoder, ...), so "
                f"the trainer would call it without its {type(module).__name__} wrapper and its gradients would "
                "not be synchronized across processes; key each trained module by the Parts attribute it lives in"
            )
    return wrapped, *prepared[len(names) :]


def place(parts, key: str, module: nn.Module) -> bool:
    """Put a (wrapped or unwrapped) module where its `Trainables.modules` key says it lives on `parts`.

    Keys: a `Parts` attribute (`denoiser`, `vae`), the denoiser's pipeline name (`unet`, `transformer`),
    `text_encoder`, `text_encoder_<n>` (1-based) or `text_encoders.<i>`.
    Returns False when the key names no place on `parts`."""
    if key == parts.family.denoiser_component:
        key = "denoiser"
    index = None
    if key == "text_encoder":
        index = 0
    elif key.startswith("text_encoder_") and key[13:].isdigit():
        index = int(key[13:]) - 1
    elif key.startswith("text_encoders.") and key[14:].isdigit():
        index = int(key[14:])
    if index is not None and index < len(parts.text_encoders):
        parts.text_encoders[index] = module
        return True
    if index is None and isinstance(getattr(parts, key, None), nn.Module):
        setattr(parts, key, module)
        return True
    return False


def stray_parameters(accelerator, wrapped: dict[str, nn.Module], params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Trained parameters outside every DDP-wrapped module (a trainer may train tensors of a module it did not
    list): DDP does not average their gradients, so `average_gradients` must, or the processes drift apart."""
    from accelerate.utils import DistributedType

    own_sync = (DistributedType.NO, DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.XLA)
    if accelerator.num_processes == 1 or accelerator.distributed_type in own_sync:
        return []
    covered = {id(p) for module in wrapped.values() for p in module.parameters()}
    return [p for p in params if id(p) not in covered]


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce the gradients of `params` in one flat bucket (every process has the same list)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


@contextmanager
def full_parameters(accelerator, wrapped: dict[str, nn.Module]) -> Iterator[None]:
    """Under FSDP, gather each wrapped module's full parameters (collective: every process enters)."""
    from accelerate.utils import DistributedType

    with ExitStack() as stack:
        if accelerator.distributed_type == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            for module in wrapped.values():
                if isinstance(module, FSDP):
                    stack.enter_context(FSDP.summon_full_params(module, writeback=False))
        yield


def trainable_tensors(modules: dict[str, nn.Module], params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """name -> parameter for every trainable parameter: `<module key>.<parameter name>`, then any strays."""
    named: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, module in modules.items():
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                named[f"{key}.{name}"] = p
                seen.add(id(p))
    for index, p in enumerate(params):
        if id(p) not in seen:
            named[f"params.{index}"] = p
    return named


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return [v.to(device, non_blocking=True) for v in value]
        return value

    return {key: move(value) for key, value in batch.items()}
