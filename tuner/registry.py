"""Method name -> trainer class, imported lazily so `tuner` never imports `trainers` by module path.

Third-party trainers register through the `tuner.trainers` entry-point group (`name = "pkg.mod:Class"`).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from tuner.errors import ConfigError

if TYPE_CHECKING:
    from tuner.trainer import Trainer

_BUILTIN = {
    "lora": "trainers.lora:LoraTrainer",
    "dreambooth": "trainers.dreambooth:DreamBoothTrainer",
    "textual_inversion": "trainers.textual_inversion:TextualInversionTrainer",
    "decoder": "trainers.decoder:DecoderTrainer",
}
_extra: dict[str, str | type] = {}


def register(name: str, target: str | type[Trainer]) -> None:
    """Make `method = name` resolve to `target` ("module:Class", or the class itself)."""
    _extra[name] = target


def _targets() -> dict[str, str | type]:
    found = dict(_BUILTIN)
    for ep in entry_points(group="tuner.trainers"):
        found[ep.name] = ep.value
    found.update(_extra)
    return found


def available() -> list[str]:
    """Method names whose trainer module can be imported."""
    names = []
    for name, target in _targets().items():
        try:
            _load(target)
        except ImportError:
            continue
        names.append(name)
    return sorted(names)


def _load(target: str | type[Trainer]) -> type[Trainer]:
    if isinstance(target, type):
        return target
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def get_trainer(name: str) -> type[Trainer]:
    targets = _targets()
    if name not in targets:
        raise ConfigError(f"method: unknown method {name!r}; allowed: {', '.join(sorted(targets))}")
    try:
        return _load(targets[name])
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"method: {name!r} is registered as {targets[name]!r} but cannot be loaded: {exc}") from exc
