"""Training checkpoints without pickle: write atomically with a hash manifest, verify, find, prune and read.

A checkpoint is a folder `checkpoint-<step>/` of named *trees*. A tree is any nesting of dicts, lists,
tuples, numbers, strings and tensors (an optimizer's `state_dict()`, an RNG state, the trained weights);
it is stored as `<name>.json` (the structure, with tensors replaced by references) plus
`<name>.safetensors` (the tensors). Nothing is ever unpickled, so a checkpoint from anywhere is safe to
open. The folder is written as `checkpoint-<step>.tmp/`, hashed into `manifest.json` (sha256 of every
file), then renamed into place: a folder named `checkpoint-<step>` is always complete, and resume refuses
one whose files no longer match their hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tuner.errors import TrainingStopped, TunerError
from tuner.public import normal_mode

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


# --- trees: nested python values <-> (JSON structure, flat tensor dict) -----------------------------------


def encode_tree(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `value` into a JSON-able structure and the tensors it references (shared tensors stored once)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    storages: set[int] = set()

    def enc(v: Any, path: str) -> Any:
        if isinstance(v, torch.Tensor):
            if id(v) in seen:
                return {"__tensor__": seen[id(v)]}
            t = v.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in storages:  # views of one storage must be separate tensors in safetensors
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[path] = t
            seen[id(v)] = path
            return {"__tensor__": path}
        if isinstance(v, bool) or v is None or isinstance(v, (int, float, str)):
            return v
        if isinstance(v, np.ndarray):
            return {"__ndarray__": v.tolist(), "dtype": str(v.dtype)}
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, torch.dtype):
            return {"__dtype__": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"__device__": str(v)}
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x, f"{path}/{i}") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, f"{path}/{i}") for i, x in enumerate(v)]
        if isinstance(v, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in v):
                return {k: enc(x, f"{path}/{k}") for k, x in v.items()}
            items = enumerate(v.items())
            return {"__dict__": [[enc(k, f"{path}/key{i}"), enc(x, f"{path}/{k}")] for i, (k, x) in items]}
        raise TunerError(
            f"checkpoint: cannot store a {type(v).__name__} at {path or '/'} without pickle; "
            "checkpoints hold only tensors, numbers, strings, lists and dicts"
        )

    return enc(value, ""), tensors


def decode_tree(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_tree`."""

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__tensor__" in v:
            return tensors[v["__tensor__"]]
        if "__tuple__" in v:
            return tuple(dec(x) for x in v["__tuple__"])
        if "__dict__" in v:
            return {dec(k): dec(x) for k, x in v["__dict__"]}
        if "__ndarray__" in v:
            return np.asarray(v["__ndarray__"], dtype=v["dtype"])
        if "__dtype__" in v:
            return getattr(torch, v["__dtype__"])
        if "__device__" in v:
            return torch.device(v["__device__"])
        return {k: dec(x) for k, x in v.items()}

    return dec(structure)


def write_tree(directory: Path, name: str, value: Any) -> None:
    """`<name>.json` (+ `<name>.safetensors` when the tree holds tensors)."""
    structure, tensors = encode_tree(value)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"), metadata={"format": "pt"})
    text = json.dumps({"format": FORMAT_VERSION, "tensors": bool(tensors), "tree": structure})
    (directory / f"{name}.json").write_text(text + "\n", encoding="utf-8")


def read_tree(directory: Path, name: str) -> Any:
    meta = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    tensors = load_file(str(directory / f"{name}.safetensors")) if meta["tensors"] else {}
    return decode_tree(meta["tree"], tensors)


def has_tree(directory: Path, name: str) -> bool:
    return (directory / f"{name}.json").is_file()


# --- RNG states -------------------------------------------------------------------------------------------


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU, each CUDA device, the loop's noise generator."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["noise"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "noise" in state:
        generator.set_state(state["noise"])


# --- folders, manifests -----------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (`.tmp` folders of an interrupted write are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "files": {p.relative_to(directory).as_posix(): _sha256(p) for p in files},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def verify(directory: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong (naming the file)."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"{manifest_path} is missing"
    except (ValueError, KeyError, TypeError):
        return f"{manifest_path} is not a valid manifest"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        actual = _sha256(path)
        if actual != expected:
            return f"{path} does not match its manifest hash (sha256 {actual[:12]}…, expected {expected[:12]}…)"
    return None


def save_atomically(
    run_dir: Path,
    step: int,
    write_shared: Callable[[Path], None],
    write_rank: Callable[[Path], None],
    is_main: bool,
    barrier: Callable[[], None],
    limit: int | None,
) -> Path:
    """Write `checkpoint-<step>/`: every process writes its own files, the main one the shared files,
    the manifest, the rename and the pruning. A crash at any point leaves only a `.tmp` folder behind."""
    final = run_dir / f"{PREFIX}{step}"
    tmp = run_dir / f"{PREFIX}{step}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        write_rank(tmp)
        if is_main:
            write_shared(tmp)
        barrier()
        if is_main:
            write_manifest(tmp, step)
            normal_mode(tmp)  # safetensors saves 0600; checkpoints are the user's files like any other output
            _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a kill signal: no half checkpoint stays behind
        raise
    if is_main:
        if final.exists():  # the same step written again (e.g. interrupted right after a checkpoint)
            old = run_dir / f"{PREFIX}{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        prune(run_dir, limit, keep=final)
    barrier()
    return final


def _fsync_tree(directory: Path) -> None:
    """Flush file contents before the rename, so a power loss cannot leave a renamed but empty checkpoint."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())


def prune(run_dir: Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints so at most `limit` remain (never `keep`)."""
    if limit is None:
        return []
    existing = [p for p in list_checkpoints(run_dir) if p != keep]
    excess = len(existing) + (1 if keep is not None else 0) - limit
    removed = existing[: max(excess, 0)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _damaged(path: Path, problem: str, older: list[Path]) -> TrainingStopped:
    hint = (
        f"resume from an earlier one with --resume {older[-1]}, or with --resume latest-good "
        "(or train.resume_fallback = true) to take the newest intact checkpoint"
        if older
        else "there is no earlier checkpoint; start again without --resume"
    )
    return TrainingStopped(f"checkpoint {path} is damaged and was not used: {problem}. Nothing was changed; {hint}")


def resolve_resume(run_dir: str | Path, resume: str, fallback: bool = False) -> Path | None:
    """The verified checkpoint folder to continue from.

    `latest` is the newest checkpoint of the run (None when there is none: a fresh start); `latest-good`
    is the newest one that verifies; anything else is a path. A damaged checkpoint is refused with a
    message naming the file, unless `fallback` is set, in which case the newest older intact one is used.
    """
    run_dir = Path(run_dir)
    if resume in ("latest", "latest-good"):
        candidates = list_checkpoints(run_dir)
        if not candidates:
            logger.warning("--resume %s: no checkpoint in %s; starting a new run", resume, run_dir)
            return None
        fallback = fallback or resume == "latest-good"
    else:
        path = Path(resume)
        if not path.is_dir() and (run_dir / resume).is_dir():
            path = run_dir / resume
        if not path.is_dir():
            raise TunerError(f"--resume {resume}: no such checkpoint folder (expected {run_dir}/{PREFIX}<step>)")
        if checkpoint_step(path) is None and not (path / MANIFEST).exists() and list_checkpoints(path):
            return resolve_resume(path, "latest", fallback)  # a run folder: its newest checkpoint
        step = checkpoint_step(path)
        older = [p for p in list_checkpoints(path.parent) if step is not None and checkpoint_step(p) < step]
        candidates = [*older, path]
    for index in range(len(candidates) - 1, -1, -1):
        path = candidates[index]
        problem = verify(path)
        if problem is None:
            return path
        if not fallback:
            raise _damaged(path, problem, candidates[:index])
        logger.warning("checkpoint %s is damaged (%s); trying the one before it", path, problem)
    raise TrainingStopped(f"--resume {resume}: no intact checkpoint in {run_dir}; start again without --resume")


# --- what a training checkpoint holds ---------------------------------------------------------------------


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the data stream's epoch and batch within it."""

    global_step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class TrainingState:
    """The live objects a checkpoint captures and restores, held by reference.

    Shared files come from the main process: `trainable` (every trainable parameter by module and
    parameter name), `optimizer`, `scheduler`, `scaler`, `ema`, `progress` (position + resolved config).
    Each process writes `rng-rank<r>` (python, numpy, torch, CUDA and noise-generator states). With a
    sharded backend (DeepSpeed, FSDP) the trainable weights and optimizer state are per process too.
    """

    trainable: dict[str, torch.Tensor]
    optimizer: Any
    scheduler: Any
    generator: torch.Generator
    position: Position
    scaler: Any = None
    ema: Any = None
    rank: int = 0
    world_size: int = 1
    sharded: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    def _names(self) -> tuple[str, str]:
        suffix = f"-rank{self.rank}" if self.sharded else ""
        return f"trainable{suffix}", f"optimizer{suffix}"

    def check_storable(self) -> None:
        """Fail before training, not at the first checkpoint, when some state cannot be stored."""
        try:
            encode_tree(self.optimizer.state_dict())
            encode_tree(self.scheduler.state_dict())
        except TunerError as exc:
            raise TunerError(
                f"{exc}. This optimizer's state (a DeepSpeed ZeRO optimizer holds Python objects) cannot go into "
                "tuner's pickle-free checkpoints: train with DDP or FSDP for resumable runs, or set "
                "train.checkpointing_steps above train.max_train_steps to train without checkpoints"
            ) from None

    def save(self, run_dir: Path, limit: int | None, is_main: bool, barrier: Callable[[], None]) -> Path:
        trainable, optimizer = self._names()

        def shared(directory: Path) -> None:
            if not self.sharded:
                write_tree(directory, trainable, self.trainable)
                write_tree(directory, optimizer, self.optimizer.state_dict())
            write_tree(directory, "scheduler", self.scheduler.state_dict())
            if self.scaler is not None:
                write_tree(directory, "scaler", self.scaler.state_dict())
            if self.ema is not None:
                write_tree(directory, "ema", self.ema.state_dict())
            progress = {**asdict(self.position), "world_size": self.world_size, "config": self.config}
            write_tree(directory, "progress", progress)

        def per_rank(directory: Path) -> None:
            if self.sharded:
                write_tree(directory, trainable, self.trainable)
                write_tree(directory, optimizer, self.optimizer.state_dict())
            write_tree(directory, f"rng-rank{self.rank}", capture_rng(self.generator))

        return save_atomically(run_dir, self.position.global_step, shared, per_rank, is_main, barrier, limit)

    def estimated_bytes(self) -> int:
        """Tensor bytes of a checkpoint of this state (weights, optimizer, EMA), known before writing one."""
        trees = [self.trainable, self.optimizer.state_dict()]
        if self.ema is not None:
            trees.append(self.ema.state_dict())
        return sum(_tensor_bytes(tree) for tree in trees)

    def load(self, directory: Path) -> list[str]:
        """Restore everything from a verified checkpoint; returns warnings about what could not match exactly."""
        trainable, optimizer = self._names()
        warnings = []
        saved = read_tree(directory, trainable)
        missing, unexpected = sorted(set(self.trainable) - set(saved)), sorted(set(saved) - set(self.trainable))
        if missing or unexpected:
            raise TrainingStopped(
                f"checkpoint {directory} holds other trainable parameters than this run "
                f"(missing: {missing[:3]}, unexpected: {unexpected[:3]}); the method or its settings changed"
            )
        with torch.no_grad():
            for name, param in self.trainable.items():
                if saved[name].shape != param.shape:
                    raise TrainingStopped(
                        f"checkpoint {directory}: {name} has shape {tuple(saved[name].shape)}, "
                        f"this run's has {tuple(param.shape)}; the method or its settings changed"
                    )
                param.copy_(saved[name])
        self.optimizer.load_state_dict(read_tree(directory, optimizer))
        self.scheduler.load_state_dict(read_tree(directory, "scheduler"))
        if self.scaler is not None and has_tree(directory, "scaler"):
            self.scaler.load_state_dict(read_tree(directory, "scaler"))
        if self.ema is not None:
            if has_tree(directory, "ema"):
                self.ema.load_state_dict(read_tree(directory, "ema"))
                self.ema.to(self.trainable[next(iter(self.trainable))].device)
            else:
                warnings.append("the checkpoint has no EMA weights; EMA starts again from the current weights")
        progress = read_tree(directory, "progress")
        self.position = Position(progress["global_step"], progress["epoch"], progress["batch"])
        if progress["world_size"] != self.world_size:
            warnings.append(
                f"the checkpoint was written by {progress['world_size']} process(es), this run has "
                f"{self.world_size}: data order and noise will not continue exactly"
            )
        changed = _changed_keys(progress.get("config", {}), self.config)
        if changed:
            warnings.append(f"the config differs from the checkpoint's: {', '.join(changed[:8])}")
        rng = f"rng-rank{self.rank}"
        if has_tree(directory, rng):
            restore_rng(read_tree(directory, rng), self.generator)
        else:
            warnings.append(f"no {rng} in the checkpoint; this process's random streams start afresh")
        return warnings


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
