"""Parts that caching made idle leave memory, and come back by themselves when something calls them.

Once every latent and caption embedding is cached, the VAE and the text encoders sit unused between
validation renders; on a GPU they are gigabytes of VRAM (T5 alone is 9 GB in bf16), on the CPU they are
resident memory. `free` moves a module's tensors to the CPU (from an accelerator) or spills them to a
safetensors file and empties them (on the CPU), keeping every `Parameter` object and its ties, so nothing
that holds a reference notices. `restore` puts them back. A freed module restores itself on its next
forward pass (a cache entry that has to be re-encoded, say), so a miss costs time, never a crash.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

_STATE = "_tuner_offload"


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by a module's distinct parameters and buffers."""
    seen: set[int] = set()
    total = 0
    for t in _tensors(module):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def is_freed(module: nn.Module) -> bool:
    return hasattr(module, _STATE)


def free(module: nn.Module, device: torch.device, spill_dir: str | os.PathLike | None = None, name: str = "") -> int:
    """Take `module` off `device` (to the CPU) or, on the CPU, out of memory (to a file in `spill_dir`).

    Returns the bytes freed on `device`. A module holding a trained (requires_grad) tensor is refused, since
    its optimizer and autograd hold references the move would split from."""
    if is_freed(module):
        return 0
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"{name or type(module).__name__}: holds trained parameters; only frozen parts are freed")
    size = tensor_bytes(module)
    state: dict = {"device": device, "name": name or type(module).__name__, "spill_dir": spill_dir}
    if device.type != "cpu":
        module.to("cpu")
    else:
        folder = Path(tempfile.mkdtemp(prefix="tuner-freed-", dir=spill_dir))
        weakref.finalize(module, shutil.rmtree, folder, True)
        named = _unique_named(module)
        path = folder / "tensors.safetensors"
        from safetensors.torch import save_file

        save_file({key: t.detach().contiguous() for key, t in named.items()}, path)
        for t in named.values():
            t.data = torch.empty(0, dtype=t.dtype)
        state.update(path=path, folder=folder)
    state["hooks"] = [
        m.register_forward_pre_hook(_restore_on_call)
        for m in module.modules()
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
    ]
    state["root"] = weakref.ref(module)
    setattr(module, _STATE, state)
    for m in module.modules():
        if m is not module:
            m._tuner_offload_root = state["root"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return size


def restore(module: nn.Module) -> tuple[torch.device, str | os.PathLike | None, str] | None:
    """Put a freed module's tensors back on the device it was freed from -> the `free` arguments that free it
    again, or None when it was not freed."""
    state = getattr(module, _STATE, None)
    if state is None:
        return None
    for handle in state["hooks"]:
        handle.remove()
    if "path" in state:
        from safetensors.torch import load_file

        device = torch.device(state["device"])  # safetensors takes "cpu", not DDP-on-CPU's "cpu:0"
        loaded = load_file(state["path"], device="cpu" if device.type == "cpu" else str(device))
        for key, t in _unique_named(module).items():
            t.data = loaded[key]
        shutil.rmtree(state["folder"], ignore_errors=True)
    else:
        module.to(state["device"])
    delattr(module, _STATE)
    for m in module.modules():
        if hasattr(m, "_tuner_offload_root"):
            delattr(m, "_tuner_offload_root")
    return state["device"], state["spill_dir"], state["name"]


def _restore_on_call(submodule: nn.Module, args) -> None:
    root_ref = getattr(submodule, "_tuner_offload_root", None)
    root = root_ref() if root_ref is not None else submodule
    if root is None or not is_freed(root):
        return
    logger.info("%s was freed after caching but is called again; loading it back", getattr(root, _STATE)["name"])
    restore(root)


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def _unique_named(module: nn.Module) -> dict[str, torch.Tensor]:
    """First name -> tensor for each distinct parameter and buffer (tied ones once)."""
    named: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if id(t) not in seen:
            seen.add(id(t))
            named[key] = t
    return named
