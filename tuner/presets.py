"""Find, list and read the TOML presets shipped with the package (`presets/<method>/<name>.toml`).

In a source checkout the presets live in the repository's `presets/`; in a wheel they are mapped to
`tuner/_presets/` by the build backend. A preset's leading comment block is its description.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from tuner.errors import ConfigError


def presets_dir() -> Path:
    packaged = Path(__file__).parent / "_presets"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "presets"


@dataclass(frozen=True)
class PresetInfo:
    name: str
    method: str
    path: Path
    description: str

    @property
    def summary(self) -> str:
        return self.description.splitlines()[0] if self.description else ""


def _description(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines).strip()


def list_presets(root: Path | None = None) -> list[PresetInfo]:
    root = root or presets_dir()
    infos = []
    for path in sorted(root.glob("*/*.toml")):
        infos.append(PresetInfo(path.stem, path.parent.name, path, _description(path.read_text(encoding="utf-8"))))
    return infos


def find_preset(name: str) -> PresetInfo:
    candidate = Path(name)
    if candidate.suffix == ".toml" and candidate.is_file():
        return PresetInfo(candidate.stem, candidate.parent.name, candidate, "")
    matches = [info for info in list_presets() if info.name == name]
    if not matches:
        names = ", ".join(info.name for info in list_presets()) or "(none installed)"
        raise ConfigError(f"--preset {name!r}: no such preset; available: {names}")
    return matches[0]


def load_preset(name: str) -> dict[str, Any]:
    """The preset's table; `method` defaults to the preset's folder name."""
    info = find_preset(name)
    try:
        data = tomllib.loads(info.path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset {info.path}: not valid TOML ({exc})") from exc
    data.setdefault("method", info.method)
    return data
