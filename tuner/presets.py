"""Presets: the shipped run-config templates (`presets/<method>/<name>.toml`), their memory tiers and data scaling.

In a source checkout the presets live in the repository's `presets/`; in a wheel they are mapped to
`tuner/_presets/` by the build backend. A preset's leading comment block is its description.

Besides ordinary run-config tables a preset may hold three preset-only tables, removed before validation so
`extra="forbid"` still guards everything else:

- `[preset]`: the model families it is tuned for, the default memory tier, fields the user must set.
- `[tiers.<GB>.<table>]`: overlays picked by `--vram GB` (the largest tier not above it).
- `[scaling]`: rules that derive steps, repeats, warmup (and pivotal phase 1, batch-scaled learning rates)
  from the number of usable images; they never touch a field the user set in a file, an override or `--set`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
from pydantic import Field, ValidationError, field_validator, model_validator

from tuner.config import RunConfig, Section, build_config, deep_merge, format_validation_error
from tuner.errors import ConfigError

logger = logging.getLogger(__name__)

PRESET_ONLY_TABLES = ("preset", "tiers", "scaling")
BUILD_STAGES = frozenset({"micro-vae", "micro-base"})
"""Presets that are steps of a recipe, not user tasks (the built-in micro base's build, `tuner.micro.build`):
loadable by name, left out of `tuner presets list`."""


def presets_dir() -> Path:
    packaged = Path(__file__).parent / "_presets"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "presets"


# --- the preset-only tables ------------------------------------------------------------------------------


class PresetMeta(Section):
    """The `[preset]` table."""

    family: list[str] = []
    """Model families the preset is tuned for (`sd1`, `sd2`, `sdxl`); a local model of another family is warned
    about before training."""
    default_tier: int | None = Field(None, ge=1)
    """Memory tier (GB of GPU memory) used when `--vram` is not given."""
    requires: dict[str, str] = {}
    """Fields a training run must set (dotted key -> example value): checked up front, all at once, so a
    forgotten prompt fails in a second instead of after the base model has loaded."""

    @field_validator("family", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class ScalingRules(Section):
    """The `[scaling]` table: how the preset follows the data. Steps are counted at batch 1, then divided by
    the batch, so a bigger memory tier sees each image as often in fewer steps."""

    steps_per_image: float | None = Field(None, gt=0)
    """`train.max_train_steps` = ceil(clamp(images × steps_per_image, min_steps, max_steps) / (train_batch_size ×
    gradient_accumulation_steps))."""
    min_steps: int = Field(1, ge=1)
    """Lower bound of images × steps_per_image (at batch 1): tiny sets still train long enough."""
    max_steps: int | None = Field(None, ge=1)
    """Upper bound of images × steps_per_image (at batch 1): large sets do not overtrain or run for days."""
    epoch_images: int | None = Field(None, ge=1)
    """`data.num_repeats` = ceil(epoch_images / images), at least 1 (kohya-style repeats): a small set is repeated
    so an epoch holds about this many examples and batches pad less. Not with `data.subsets` (they have their own)."""
    warmup_fraction: float | None = Field(None, ge=0, lt=1)
    """`optimizer.lr_warmup_steps` = round(warmup_fraction × max_train_steps)."""
    pivotal_ti_fraction: float | None = Field(None, gt=0, lt=1)
    """`textual_inversion.pivotal_ti_steps` = round(pivotal_ti_fraction × max_train_steps), within 1 … steps − 1."""
    scale_lr: list[str] = []
    """Learning-rate fields multiplied by train_batch_size × gradient_accumulation_steps (the diffusers
    textual-inversion `--scale_lr`): the preset's value is the rate for one image per step."""

    @model_validator(mode="after")
    def _bounds(self) -> ScalingRules:
        if self.max_steps is not None and self.max_steps < self.min_steps:
            raise ValueError(f"max_steps = {self.max_steps} is below min_steps = {self.min_steps}")
        return self


# --- finding and reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PresetInfo:
    name: str
    method: str
    path: Path
    description: str
    family: tuple[str, ...] = ()
    tiers: tuple[int, ...] = ()
    default_tier: int | None = None

    @property
    def summary(self) -> str:
        return self.description.splitlines()[0] if self.description else ""


@dataclass(frozen=True)
class Preset:
    """A preset split into its run-config layer and its preset-only tables."""

    info: PresetInfo
    table: dict[str, Any]
    meta: PresetMeta
    tiers: dict[int, dict[str, Any]] = field(default_factory=dict)
    scaling: ScalingRules | None = None

    def pick_tier(self, vram: float | None) -> int | None:
        """The largest tier not above `vram` GB; the default tier without `vram`."""
        name = self.info.name
        if not self.tiers:
            if vram is not None:
                raise ConfigError(
                    f"--vram {vram:g}: preset {name!r} has no memory tiers; drop --vram and set fields with --set"
                )
            return None
        shown = ", ".join(str(t) for t in sorted(self.tiers))
        if vram is None:
            return self.meta.default_tier
        if not vram > 0:
            raise ConfigError(f"--vram {vram:g}: expected the GPU's memory in GB, e.g. --vram 12 (tiers: {shown})")
        fitting = [t for t in self.tiers if t <= vram]
        if not fitting:
            hint = "; LoRA presets start at 8 GB (`tuner presets list` shows every preset's tiers)"
            raise ConfigError(
                f"--vram {vram:g}: preset {name!r} needs at least {min(self.tiers)} GB (its tiers: {shown} GB)"
                + (hint if min(self.tiers) > 8 else "")
            )
        return max(fitting)

    def layer(self, vram: float | None = None) -> tuple[str, dict[str, Any], int | None]:
        """(label, run-config layer with the chosen tier applied, tier)."""
        tier = self.pick_tier(vram)
        if tier is None:
            return f"preset {self.info.name}", self.table, None
        return f"preset {self.info.name} ({tier} GB tier)", deep_merge(self.table, self.tiers[tier]), tier


def _description(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines).strip()


def list_presets(root: Path | None = None, *, include_stages: bool = False) -> list[PresetInfo]:
    """Every user preset under `root` (the build stages too with `include_stages`); a file that does not parse is
    listed with the problem as its summary."""
    root = root or presets_dir()
    infos = []
    for path in sorted(root.glob("*/*.toml")):
        if path.stem in BUILD_STAGES and not include_stages:
            continue
        try:
            infos.append(read_preset_file(path).info)
        except ConfigError as exc:
            infos.append(PresetInfo(path.stem, path.parent.name, path, f"(invalid preset: {exc})"))
    return infos


def find_preset(name: str) -> PresetInfo:
    """A shipped preset by name, or a preset file by path (a copied and edited preset keeps tiers and scaling)."""
    candidate = Path(name)
    if candidate.suffix == ".toml" and candidate.is_file():
        return PresetInfo(candidate.stem, candidate.parent.name, candidate, "")
    infos = list_presets(include_stages=True)
    matches = [info for info in infos if info.name == name]
    if not matches:
        names = [info.name for info in infos if info.name not in BUILD_STAGES]
        close = [n for n in names if n.startswith(name)] or difflib.get_close_matches(name, names, n=3)
        listed = ", ".join(names) or "(none installed)"
        shown = f"did you mean {', '.join(close)}?" if close else f"available: {listed}"
        raise ConfigError(f"--preset {name!r}: no such preset; {shown}")
    return matches[0]


def load_preset(name: str) -> dict[str, Any]:
    """The preset's raw table (preset-only tables included); `method` defaults to the preset's folder name."""
    info = find_preset(name)
    data = _read_toml(info.path)
    data.setdefault("method", info.method)
    return data


def read_preset(name: str) -> Preset:
    return read_preset_file(find_preset(name).path)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset {path}: not valid TOML ({exc})") from exc


def read_preset_file(path: Path) -> Preset:
    """Split a preset file into its run-config layer and its validated preset-only tables."""
    text = path.read_text(encoding="utf-8")
    data = _read_toml(path)
    data.setdefault("method", path.parent.name)
    source = f"preset {path}"
    meta = _validated(PresetMeta, data.pop("preset", {}), f"{source} [preset]")
    scaling_table = data.pop("scaling", None)
    scaling = _validated(ScalingRules, scaling_table, f"{source} [scaling]") if scaling_table is not None else None
    tiers = _tiers(data.pop("tiers", {}), source)
    if tiers and meta.default_tier not in tiers:
        raise ConfigError(
            f"{source}: preset.default_tier = {meta.default_tier}: must name one of the tiers "
            f"({', '.join(str(t) for t in sorted(tiers))})"
        )
    info = PresetInfo(
        path.stem, path.parent.name, path, _description(text), tuple(meta.family), tuple(sorted(tiers)),
        meta.default_tier,
    )  # fmt: skip
    return Preset(info, data, meta, tiers, scaling)


def _validated(model: type[Section], table: Any, source: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: expected a table")
    try:
        return model.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def _tiers(table: Any, source: str) -> dict[int, dict[str, Any]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: tiers must be tables such as [tiers.12.train]")
    tiers: dict[int, dict[str, Any]] = {}
    for key, overlay in table.items():
        if not (key.isdigit() and int(key) > 0) or not isinstance(overlay, dict):
            raise ConfigError(f"{source}: tiers.{key}: tier names are GB of GPU memory, e.g. [tiers.12.train]")
        bad = [k for k, v in overlay.items() if k == "method" or k in PRESET_ONLY_TABLES or not isinstance(v, dict)]
        if bad:
            raise ConfigError(f"{source}: tiers.{key}.{bad[0]}: a tier overlays run-config tables only")
        tiers[int(key)] = overlay
    return tiers


# --- resolving a run: tier, scaling, required fields ------------------------------------------------------


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists (of tables too) are leaves."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        cursor = out
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = value
    return out


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _is_explicit(key: str, explicit: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1))


def count_training_images(config: RunConfig) -> int:
    """Usable instance images (class images and the evaluation holdout excluded), as the data check finds them."""
    from tuner.data import check_data

    report = check_data(config)
    used = sum(1 for f in report.files if f.status == "used" and not f.is_class)
    fraction = config.data.holdout_fraction
    if fraction > 0 and used >= 2:  # the same count `split_holdout` takes away
        used -= min(used - 1, max(1, round(fraction * used)))
    return used


@dataclass
class Scaled:
    """What the scaling rules decided: the layer of derived values and one line per decision."""

    layer: dict[str, Any]
    notes: list[str]


def scale(rules: ScalingRules, config: RunConfig, images: int | None, explicit: set[str]) -> Scaled:
    """Derive steps, repeats, warmup, pivotal phase 1 and scaled learning rates; `images` None: not counted."""
    derived: dict[str, Any] = {}
    notes: list[str] = []
    tc = config.train
    batch = tc.train_batch_size * tc.gradient_accumulation_steps

    def decide(key: str, value: Any, why: str) -> None:
        if _is_explicit(key, explicit):
            notes.append(f"{key} = {_get(config, key)!r} (yours; the rule would give {value!r}: {why})")
        else:
            derived[key] = value
            notes.append(f"{key} = {value!r} ({why})")

    steps = tc.max_train_steps
    if images and rules.steps_per_image:
        raw = images * rules.steps_per_image
        clamped = min(max(raw, rules.min_steps), rules.max_steps or math.inf)
        value = max(1, math.ceil(clamped / batch))
        bounds = f"{rules.min_steps}…{rules.max_steps or '∞'}"
        why = f"{images} images × {rules.steps_per_image:g} within {bounds}, ÷ batch {batch}"
        decide("train.max_train_steps", value, why)
        steps = derived.get("train.max_train_steps", steps)
    if images and rules.epoch_images and not config.data.subsets:  # kohya subsets carry their own repeats
        decide("data.num_repeats", max(1, math.ceil(rules.epoch_images / images)),
               f"about {rules.epoch_images} examples per epoch from {images} images")  # fmt: skip
    if rules.warmup_fraction is not None:
        decide("optimizer.lr_warmup_steps", round(rules.warmup_fraction * steps),
               f"{rules.warmup_fraction:g} of {steps} steps")  # fmt: skip
    if rules.pivotal_ti_fraction is not None:
        value = min(max(1, round(rules.pivotal_ti_fraction * steps)), max(1, steps - 1))
        decide("textual_inversion.pivotal_ti_steps", value, f"{rules.pivotal_ti_fraction:g} of {steps} steps")
    for key in rules.scale_lr:
        try:
            base = _get(config, key)
        except AttributeError:
            raise ConfigError(f"scaling.scale_lr: {key!r} is not a field of the run config") from None
        if not isinstance(base, (int, float)) or isinstance(base, bool):
            raise ConfigError(f"scaling.scale_lr: {key} = {base!r} is not set to a learning rate in the preset")
        decide(key, base * batch, f"{base:g} per image × batch {batch}")
    return Scaled(_nest(derived), notes)


def check_required(preset: Preset, config: RunConfig) -> None:
    """All fields the preset needs and the run lacks, in one error with copy-paste examples."""
    missing = [(key, example) for key, example in preset.meta.requires.items() if _get(config, key) in (None, "")]
    if missing:
        hints = " ".join(f"--set {key}={json.dumps(example)}" for key, example in missing)
        names = ", ".join(key for key, _ in missing)
        raise ConfigError(f"preset {preset.info.name!r} needs {names}; for example: {hints}")


def check_family(preset: Preset, config: RunConfig) -> None:
    """Warn (not fail) when a local base model is not of a family the preset was tuned for."""
    from tuner.models import BUILTIN_PREFIX, detect_family, resolve_model_path

    name = config.model.pretrained_model_name_or_path
    if not preset.meta.family or not (name.startswith(BUILTIN_PREFIX) or Path(name).is_dir()):
        return  # hub ids are not fetched here; the loop checks the model when it loads it
    try:
        family, _ = detect_family(resolve_model_path(name))
    except Exception:  # noqa: BLE001 - a model problem is reported by the loop with its own message
        return
    if family.name not in preset.meta.family:
        logger.warning(
            "warning: preset %s is tuned for %s, but %s is an %s model; resolution, precision and learning rates "
            "may not suit it",
            preset.info.name, "/".join(preset.meta.family), name, family.name,
        )  # fmt: skip


def resolve(
    preset: Preset,
    layers: list[tuple[str, dict[str, Any]]],
    user_layers: list[tuple[str, dict[str, Any]]],
    tier: int | None,
    vram: float | None,
) -> RunConfig:
    """Validate preset (+ tier) < user layers, then apply the scaling rules to what the user left open.

    `layers[0]` is the preset's layer; the derived values go right after it, so any user layer still wins.
    """
    config = build_config(layers)
    if tier is not None:
        picked = f"--vram {vram:g}" if vram is not None else "default; pick another with --vram GB"
        shown = ", ".join(f"{k}={v!r}" for k, v in flatten(preset.tiers[tier]).items())
        logger.info("preset %s: %d GB tier (%s): %s", preset.info.name, tier, picked, shown)
    has_data = bool(config.data.path or config.data.subsets)
    counts = preset.scaling is not None and bool(preset.scaling.steps_per_image or preset.scaling.epoch_images)
    if has_data and counts:
        from tuner.data.check import check_paths

        check_paths(config)  # a mistyped folder is not counted (nor looked up on the hub as a dataset id)
    if has_data:
        check_required(preset, config)
        check_family(preset, config)
    if preset.scaling is None:
        return config
    explicit = {key for _, layer in user_layers for key in flatten(layer)}
    images = count_training_images(config) if has_data and counts else None
    scaled = scale(preset.scaling, config, images or None, explicit)
    if images is None:
        counted = "no data to count: steps as in the preset"
    else:
        counted = f"{images} usable images" + ("" if images else "; the data check will say why")
    logger.info("preset %s scaling (%s):\n  %s", preset.info.name, counted, "\n  ".join(scaled.notes))
    if not scaled.layer:
        return config
    return build_config([layers[0], (f"scaling of {preset.info.name}", scaled.layer), *layers[1:]])


def non_default_values(config: RunConfig) -> dict[str, Any]:
    """Dotted key -> value for every field that differs from the code default: the resolved config, short."""
    default = flatten(type(config)(method=config.method).to_dict())
    return {k: v for k, v in flatten(config.to_dict()).items() if default.get(k, object()) != v}


# --- describing ---------------------------------------------------------------------------------------------


def preset_table(infos: list[PresetInfo]) -> str:
    """The `tuner presets list` table: name, method, family, tiers (GB, * = default), summary."""
    rows = [("NAME", "METHOD", "FAMILY", "TIERS (GB, *default)", "SUMMARY")]
    for info in infos:
        tiers = " ".join(f"{t}*" if t == info.default_tier else str(t) for t in info.tiers) or "-"
        rows.append((info.name, info.method, "/".join(info.family) or "-", tiers, info.summary))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)


def describe_extras(preset: Preset) -> list[str]:
    """The preset-only tables as text: tiers (each as its overrides), scaling rules with their meaning, requires."""
    lines: list[str] = []
    if preset.tiers:
        default = preset.meta.default_tier
        lines.append(f"\n# memory tiers (--vram GB picks the largest tier not above it; default {default})")
        for tier in sorted(preset.tiers):
            lines.append(f"[tiers.{tier}]" + ("  # default" if tier == preset.meta.default_tier else ""))
            lines += [f"  {key} = {value!r}" for key, value in flatten(preset.tiers[tier]).items()]
    if preset.scaling is not None:
        lines.append("\n# scaling (applied to the counted images; fields you set yourself are kept)")
        for name, model_field in ScalingRules.model_fields.items():
            value = getattr(preset.scaling, name)
            if value is None or value == []:
                continue
            lines.append(f"scaling.{name} = {value!r}")
            doc = " ".join((model_field.description or "").split())
            lines.append(textwrap.fill(doc, 115, initial_indent="    ", subsequent_indent="    "))
    if preset.meta.requires:
        lines.append("\n# required for a training run")
        lines += [f"{key}  (e.g. {example!r})" for key, example in preset.meta.requires.items()]
    return lines
