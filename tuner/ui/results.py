"""Compare and Publish for a finished run, through the suite's own `tuner.sampling` and `tuner.hub`.

Compare renders the base model and the tuned one side by side with the code of `tuner sample`: one call with
LoRA scales [0, s] when the run made a LoRA (a labeled grid), else one call for the base and one for the tuned
model (embeddings, a full pipeline, a decoder). Publish stages the exact upload (`hub.publish`); the hub token
is an argument of one call, never written, logged or sent back.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from tuner.errors import TunerError
from tuner.ui.store import Run

_sampling = threading.Lock()  # one render at a time: a second one would only halve the speed of both


def _tuned_parts(run: Run) -> dict[str, Any]:
    """What the run made, as `sample` arguments: lora, embeddings, a tuned model folder or a VAE."""
    from tuner.sampling import LORA_FILE, Embedding
    from tuner.trainer import Artifact

    artifact = Artifact.read(run.output)
    parts: dict[str, Any] = {"base": artifact.base_model, "trigger": artifact.trigger,
                             "prompt": artifact.instance_prompt}  # fmt: skip
    if (run.output / LORA_FILE).is_file():
        parts["lora"] = [run.output]
    embeds = sorted(run.output.glob("learned_embeds*.safetensors"))
    if embeds:
        parts["embeddings"] = [Embedding(embeds[0])]
    for f in artifact.files:
        if f.format == "diffusers-pipeline":
            parts["model"] = str(run.output / f.path)
        if f.format == "diffusers-autoencoderkl":
            parts["vae"] = str(run.output / f.path)
    return parts


def default_prompt(run: Run) -> str:
    try:
        parts = _tuned_parts(run)
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return (parts.get("prompt") or "").replace("{token}", parts.get("trigger") or "")


def compare(run: Run, prompt: str, seeds: list[int], scale: float, steps: int = 20, guidance: float = 4.0,
            size: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Base vs tuned for `prompt` x `seeds`; returns the grid paths relative to the run folder."""
    from tuner.sampling import sample

    if not run.finished():
        raise TunerError(f"run {run.name} has not finished: there is nothing tuned to compare yet")
    if not prompt.strip():
        raise TunerError("compare: give a prompt")
    if not seeds or len(seeds) > 8:
        raise TunerError("compare: give 1 to 8 seeds")
    parts = _tuned_parts(run)
    out = run.root / "compare" / time.strftime("%Y%m%d-%H%M%S")
    common = {"steps": steps, "guidance_scale": guidance, "width": size, "height": size, "write_images": False}
    with _sampling:
        if "lora" in parts:
            result = sample(parts["base"], [prompt], seeds, out, lora=parts["lora"], lora_scales=[0.0, scale],
                            embeddings=parts.get("embeddings", []), **common)  # fmt: skip
            grids = {"base vs tuned": result.grid}
        else:
            base = sample(parts["base"], [prompt], seeds, out / "base", **common)
            tuned = sample(parts.get("model", parts["base"]), [prompt], seeds, out / "tuned",
                           embeddings=parts.get("embeddings", []), vae=parts.get("vae"), **common)  # fmt: skip
            grids = {"base": base.grid, "tuned": tuned.grid}
    return {label: str(Path(path).relative_to(run.root)) for label, path in grids.items()}


def _record_license(run: Run, license_: str) -> None:
    """The card's license is the run's `hub.license` (`tuner publish` reads its [hub] defaults there too)."""
    path = run.output / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if (config.get("hub") or {}).get("license") == license_:
        return
    config.setdefault("hub", {})["license"] = license_
    tmp = path.with_name(".config.json.tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def publish(run: Run, repo_id: str, *, private: bool, base_model: str | None, license_: str | None,
            token: str | None, dry_run: bool) -> dict[str, Any]:  # fmt: skip
    """`tuner publish` for this run; a dry run returns the card and the file list of the staged upload."""
    from tuner import hub

    if not run.finished():
        raise TunerError(f"run {run.name} has not finished: nothing to publish yet")
    if license_ and license_.strip():
        _record_license(run, license_.strip())
    lines: list[str] = []
    result = hub.publish(run.output, repo_id.strip(), private=private, token=token or None, dry_run=dry_run,
                         base_model=(base_model or "").strip() or None, endpoint=os.environ.get("HF_ENDPOINT"),
                         out=lines.append)  # fmt: skip
    card = (result.staged_dir / "README.md").read_text(encoding="utf-8") if dry_run else None
    return {"files": result.files, "card": card, "lines": lines, "url": result.url, "dry_run": dry_run}
