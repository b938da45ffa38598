"""Textual-inversion embedding files (diffusers and A1111/kohya forms) and their round-trip check.

The check loads each written file into a fresh stock pipeline with `load_textual_inversion`, the way a user
would, and requires the token's rows there to equal the trained vectors exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuner.errors import TunerError
from tuner.models import Family
from tuner.trainer import ArtifactFile

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
SDXL_KEYS = ("clip_l", "clip_g")
TOOLS = {"diffusers": ["diffusers"], "portable": ["A1111", "ComfyUI", "kohya", "diffusers"]}


@dataclass(frozen=True)
class EmbeddingFile:
    """One written file: what it holds and which text encoders its tensors go to."""

    path: Path
    format: str  # "diffusers" ({token: T}) or "portable" ({"emb_params": T} / {"clip_l", "clip_g"})
    encoders: tuple[int, ...]  # text-encoder indices, in the order of `keys`
    keys: tuple[str, ...]


def file_stem(token: str) -> str:
    """A file name for the token (`<sks-cat>` -> `sks-cat`); A1111 and ComfyUI use it as the prompt word."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", token).strip("-.") or "embedding"
    return f"{stem}_emb" if f"{stem}.safetensors" in DIFFUSERS_FILES else stem


def plan_files(out_dir: Path, token: str, num_encoders: int) -> list[EmbeddingFile]:
    """diffusers `learned_embeds.safetensors` (SDXL: one file per encoder) plus the portable `<stem>.safetensors`."""
    files = [EmbeddingFile(out_dir / DIFFUSERS_FILES[i], "diffusers", (i,), (token,)) for i in range(num_encoders)]
    portable_keys = SDXL_KEYS if num_encoders == 2 else ("emb_params",)
    files.append(
        EmbeddingFile(
            out_dir / f"{file_stem(token)}.safetensors", "portable", tuple(range(num_encoders)), portable_keys
        )
    )
    return files


def load_line(file: EmbeddingFile, token: str, num_encoders: int) -> str:
    """The Python a user runs to load `file` into a diffusers pipeline `pipe`."""
    name = str(file.path)

    def target(index: int) -> str:
        suffix = "" if index == 0 else "_2"
        return (
            f", text_encoder=pipe.text_encoder{suffix}, tokenizer=pipe.tokenizer{suffix}" if num_encoders > 1 else ""
        )

    if file.format == "diffusers":
        return f'pipe.load_textual_inversion("{name}"{target(file.encoders[0])})'
    calls = [f'sd = safetensors.torch.load_file("{name}")']
    calls += [
        f'pipe.load_textual_inversion(sd["{k}"], token="{token}"{target(i)})' for i, k in zip(file.encoders, file.keys)
    ]
    return "; ".join(calls)


def write_embeddings(
    out_dir: str | Path,
    token: str,
    vectors: list[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> list[EmbeddingFile]:
    """Write the trained vectors (one `[num_vectors, dim]` tensor per text encoder) in every form.

    `metadata` goes into the portable file's header (diffusers files carry only `format: pt`, as diffusers'
    own scripts write them).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = plan_files(out_dir, token, len(vectors))
    for file in files:
        tensors = {
            key: vectors[i].detach().to("cpu", torch.float32).contiguous() for i, key in zip(file.encoders, file.keys)
        }
        header = {"format": "pt"}
        if file.format == "portable":
            header.update({k: str(v) for k, v in (metadata or {}).items()})
        save_file(tensors, str(file.path), metadata=header)
    return files


def artifact_files(files: list[EmbeddingFile], token: str, out_dir: Path) -> list[ArtifactFile]:
    """`ArtifactFile` records (paths relative to the run folder) for `artifact.json`."""
    num_encoders = max(i for file in files for i in file.encoders) + 1
    return [
        ArtifactFile(
            path=str(file.path.relative_to(out_dir)),
            format=f"textual_inversion/{file.format}",
            load=load_line(file, token, num_encoders),
            tools=TOOLS[file.format],
        )
        for file in files
    ]


def load_into(pipe: Any, file: EmbeddingFile, token: str) -> None:
    """Load `file` into `pipe` exactly as `load_line` tells a user to."""
    from safetensors.torch import load_file

    targets = [(pipe.text_encoder, pipe.tokenizer)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        targets.append((pipe.text_encoder_2, pipe.tokenizer_2))
    if file.format == "diffusers":
        te, tok = targets[file.encoders[0]]
        pipe.load_textual_inversion(str(file.path), text_encoder=te, tokenizer=tok)
        return
    state = load_file(str(file.path))
    for index, key in zip(file.encoders, file.keys):
        te, tok = targets[index]
        pipe.load_textual_inversion(state[key], token=token, text_encoder=te, tokenizer=tok)


def loaded_vectors(pipe: Any, token: str, encoder: int) -> torch.Tensor:
    """The rows `token` expands to in `pipe` (multi-vector: `token`, `token_1`, ...), found via the pipeline's
    own prompt conversion, so the check also covers the expansion at sampling time."""
    tokenizer = pipe.tokenizer if encoder == 0 else pipe.tokenizer_2
    text_encoder = pipe.text_encoder if encoder == 0 else pipe.text_encoder_2
    words = pipe.maybe_convert_prompt(token, tokenizer).split()
    ids = tokenizer.convert_tokens_to_ids(words)
    unknown = [w for w, i in zip(words, ids) if i == tokenizer.unk_token_id]
    if unknown:
        raise TunerError(f"textual inversion round trip: token(s) {unknown} not in the loaded tokenizer")
    return text_encoder.get_input_embeddings().weight.detach()[ids].to("cpu", torch.float32)


def fresh_pipeline(source: str, family: Family, revision: str | None = None) -> Any:
    """A stock pipeline straight from the base model's folder (no UNet or VAE: embeddings touch neither)."""
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"unet": None, "vae": None, "revision": revision}
    if family.text_encoders == 1:
        kwargs.update(safety_checker=None, feature_extractor=None)
    pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_embeddings(
    files: list[EmbeddingFile],
    token: str,
    vectors: list[torch.Tensor],
    source: str,
    family: Family,
    revision: str | None = None,
) -> float:
    """Load each file into its own fresh pipeline; raise TunerError unless every row equals the trained one.

    Returns the largest difference seen (0.0 when all match).
    """
    worst = 0.0
    for file in files:
        pipe = fresh_pipeline(source, family, revision)
        try:
            load_into(pipe, file, token)
        except (ValueError, KeyError) as exc:
            raise TunerError(f"textual inversion round trip: {file.path.name} does not load: {exc}") from exc
        for index in file.encoders:
            expected = vectors[index].detach().to("cpu", torch.float32)
            got = loaded_vectors(pipe, token, index)
            if got.shape != expected.shape:
                raise TunerError(
                    f"textual inversion round trip: {file.path.name} loads {token!r} into text encoder {index + 1} "
                    f"as {tuple(got.shape)} vectors, trained {tuple(expected.shape)}"
                )
            diff = float((got - expected).abs().max()) if got.numel() else 0.0
            if diff != 0.0:
                raise TunerError(
                    f"textual inversion round trip: {file.path.name} reproduces {token!r} in text encoder "
                    f"{index + 1} with max difference {diff:.3g} (must be exact)"
                )
            worst = max(worst, diff)
    return worst
