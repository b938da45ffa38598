"""What the Task step offers and what it turns into: presets per method, advanced fields read from the config
schema, and the user layer (`task.toml`) that `tuner train --preset P --config task.toml` merges over the preset.

The page keeps no list of fields of its own: every advanced field, its type, choices, default and help text
come from the pydantic models in `tuner.config` and the trainers' `Config` classes, with the preset's values.
"""

from __future__ import annotations

import functools
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tuner.errors import ConfigError

# label, the preset's method, and whether its method table turns LoRA / pivotal tuning on
METHODS: dict[str, tuple[str, str, dict[str, bool]]] = {
    "dreambooth-lora": ("DreamBooth-LoRA", "dreambooth", {"dreambooth.lora": True}),
    "lora": ("LoRA", "lora", {}),
    "textual-inversion": ("Textual inversion", "textual_inversion", {"textual_inversion.pivotal": False}),
    "pivotal": ("Pivotal tuning (TI + LoRA)", "textual_inversion", {"textual_inversion.pivotal": True}),
    "dreambooth": ("Full DreamBooth", "dreambooth", {"dreambooth.lora": False}),
    "decoder": ("VAE decoder", "decoder", {}),
}
DEFAULT_TASK = {"kind": "subject", "trigger": "sks", "class_word": "heart", "method": "dreambooth-lora",
                "model": "builtin:micro", "preset": "micro-subject-lora", "vram": None, "advanced": {}}  # fmt: skip
# Fields the task form itself sets (where the run lives, what it reads): not offered as advanced fields.
OWNED = {"data.path", "data.cache_dir", "data.subsets", "data.class_data_dir", "train.output_dir", "hub.push",
         "hub.repo_id"}  # fmt: skip
SHARED = ("data", "optimizer", "train", "validation", "hub")


def _flag(table: dict[str, Any], dotted: str) -> Any:
    first, _, rest = dotted.partition(".")
    return (table.get(first) or {}).get(rest)


def presets_by_method() -> dict[str, list[dict[str, Any]]]:
    """Method key -> the presets that train it, with their memory tiers and one-line summaries."""
    from tuner.presets import list_presets, read_preset

    out: dict[str, list[dict[str, Any]]] = {key: [] for key in METHODS}
    for info in list_presets():
        table = read_preset(info.name).table
        for key, (_, method, flags) in METHODS.items():
            if info.method == method and all(bool(_flag(table, k)) == v for k, v in flags.items()):
                out[key].append({"name": info.name, "summary": info.summary, "tiers": list(info.tiers),
                                 "default_tier": info.default_tier, "families": list(info.family)})  # fmt: skip
    return out


def memory_note(preset: str, vram: float | None) -> str:
    """Which memory tier `--vram` picks and what it is sized for (raises ConfigError for a vram below every tier)."""
    from tuner.presets import read_preset

    chosen = read_preset(preset)
    tier = chosen.pick_tier(vram)
    if tier is None:
        return "no memory tiers: sized for CPU and small GPUs"
    tiers = ", ".join(str(t) for t in sorted(chosen.tiers))
    note = f"{tier} GB tier: the preset's settings sized to fit {tier} GB of GPU memory (tiers: {tiers} GB)"
    estimate = _estimate(preset, vram if vram is not None else float(tier))
    return f"{note}. {estimate}" if estimate else note


@functools.lru_cache(maxsize=64)
def _estimate(preset: str, vram: float) -> str:
    """`tuner presets show --vram`'s estimate in one line (from model configs, no weights; cached: seconds each)."""
    from tuner.memory import preset_estimate

    lines = [line.strip() for line in preset_estimate(preset, vram) if line.strip()]
    total = next((line for line in lines if line.startswith("total")), None)
    if total is None:
        return ""
    verdict = next((line for line in lines if "fit" in line), "")
    return f"Estimated peak: {total.removeprefix('total').strip()}; {verdict}"


def _kind(annotation: Any) -> tuple[str, list[Any] | None, bool]:
    """(kind, choices, nullable) of a field: bool / int / float / str / choice / list, or `table`/`other`."""
    args = typing.get_args(annotation)
    nullable = type(None) in args
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else annotation
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", list(typing.get_args(annotation)), nullable
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table", None, nullable
    if typing.get_origin(annotation) is list:
        inner = typing.get_args(annotation)
        scalar = all(a in (str, int, float) for a in inner)
        return ("list" if scalar else "other"), None, nullable
    for kind in (bool, int, float, str):
        if annotation is kind:
            return kind.__name__, None, nullable
    return "other", None, nullable


def _walk(model: BaseModel, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for name, field in type(model).model_fields.items():
        key, value = f"{prefix}{name}", getattr(model, name)
        kind, choices, nullable = _kind(field.annotation)
        if key in OWNED or kind == "other":
            continue
        if kind == "table":
            if isinstance(value, BaseModel):
                rows += _walk(value, key + ".")
            continue
        rows.append({"key": key, "kind": kind, "choices": choices, "nullable": nullable, "value": value,
                     "doc": (field.description or "").strip()})  # fmt: skip
    return rows


def advanced_fields(preset: str, vram: float | None = None) -> dict[str, list[dict[str, Any]]]:
    """Table -> its fields with the preset's values (at its memory tier), from the method's config schema."""
    from tuner.config import build_config
    from tuner.presets import read_preset

    label, layer, _ = read_preset(preset).layer(vram)
    config = build_config([(label, layer)])
    method_table = config.method if config.method in type(config).model_fields else None
    tables = [*SHARED, *([method_table] if method_table else [])]
    return {table: _walk(getattr(config, table), f"{table}.") for table in tables}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        if value is None:
            continue  # TOML has no null: an emptied optional field keeps the preset's value
        *parents, leaf = dotted.split(".")
        cursor = out
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = value
    return out


def user_layer(task: dict[str, Any], photos: Path, run_root: Path) -> dict[str, Any]:
    """The run-config layer the task form stands for: data, output and the subject's words, then advanced fields."""
    from tuner.config import RunConfig, deep_merge
    from tuner.presets import read_preset

    preset = read_preset(task["preset"])
    method = preset.info.method
    fields = RunConfig.for_method(method).model_fields
    trigger, word = (task.get("trigger") or "").strip(), (task.get("class_word") or "").strip()
    layer: dict[str, Any] = {
        "model": {"pretrained_model_name_or_path": (task.get("model") or "builtin:micro").strip()},
        "data": {
            "path": str(photos),
            "cache_dir": str(run_root / "cache"),
            "class_data_dir": str(run_root / "cache" / "class_images"),
        },  # fmt: skip
        "train": {"output_dir": str(run_root / "output"), "logging_steps": 1},
    }
    data = layer["data"]
    if task.get("kind", "subject") == "subject" and method != "decoder" and (trigger or word):
        if "textual_inversion" in fields:
            ti = layer.setdefault("textual_inversion", {})
            if trigger:
                ti["placeholder_token"] = trigger
            if word:
                ti["initializer_token"] = word
            data["instance_prompt"] = "a photo of a {token}" + (f" {word}" if word else "")
        else:
            if trigger:
                data["token"] = trigger
            data["instance_prompt"] = "a photo of a " + " ".join(w for w in (trigger, word) if w)
            if word:
                data["class_prompt"] = f"a photo of a {word}"
    elif trigger and method != "decoder":
        data["caption_prefix"] = f"{trigger}, "
    for key in task.get("advanced") or {}:
        if key in OWNED:
            raise ConfigError(f"{key}: set by the task form, not an advanced field")
    return deep_merge(layer, _nest(task.get("advanced") or {}))


def write_task(task: dict[str, Any], photos: Path, run_root: Path) -> Path:
    import tomli_w

    path = run_root / "task.toml"
    path.write_text(tomli_w.dumps(user_layer(task, photos, run_root)), encoding="utf-8")
    return path


def resolve(task: dict[str, Any], photos: Path, run_root: Path):
    """The RunConfig `tuner train` will build from this task: validated here so the page shows a bad field at once."""
    from tuner.cli import check_model_source
    from tuner.config import load_config

    path = write_task(task, photos, run_root)
    config = load_config(path, task["preset"], vram=task.get("vram"))
    check_model_source(config.model.pretrained_model_name_or_path)
    return config


def check_report(task: dict[str, Any], photos: Path, run_root: Path) -> dict[str, Any]:
    """`tuner check-data` on the run's photos, judged as this task's preset trains; nothing is written."""
    from tuner.data.check import check_config, check_data

    path = write_task(task, photos, run_root)
    config = check_config(str(photos), str(path), preset=task["preset"], vram=task.get("vram"))
    report = check_data(config, remember=False)
    result = report.to_dict()
    result["text"] = report.to_text()
    return result
