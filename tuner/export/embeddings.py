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

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors", "learned_embeds_3.safetensors")
SDXL_KEYS = ("clip_l", "clip_g")
KEY_ALIASES = {"t5xxl": ("t5",)}
"""Extra keys written with the same tensor: ComfyUI reads T5 vectors as `t5xxl`, diffusers' advanced FLUX.1
script writes and reads `t5`."""
TOOLS = {"diffusers": ["diffusers"], "portable": ["A1111", "ComfyUI", "kohya", "diffusers"]}
TRANSFORMER_TOOLS = ["ComfyUI", "diffusers"]
"""Who reads the portable file of a transformer family (A1111 has no SD3 / FLUX.1 embeddings)."""


@dataclass(frozen=True)
class EmbeddingFile:
    """One written file: what it holds and which text encoders its tensors go to."""

    path: Path
    format: str  # "diffusers" ({token: T}) or "portable" ({"emb_params": T} / {"clip_l", "clip_g", "t5xxl"})
    encoders: tuple[int, ...]  # indices into the trained vectors, in the order of `keys`
    keys: tuple[str, ...]
    targets: tuple[tuple[str, str], ...] = ()
    """(text encoder, tokenizer) pipeline attributes per key; default: `text_encoder`, `text_encoder_2` by index."""
    unet_tools: bool = True
    """The UNet families' tools (A1111, kohya) read it too."""
    loader: str = "diffusers"
    """`diffusers`: the pipeline's `load_textual_inversion`; `transformers`: the pipeline has no such loader
    (SD3), so the token is added to its tokenizer and the rows written into its encoder with transformers calls."""

    def target(self, position: int) -> tuple[str, str]:
        if self.targets:
            return self.targets[position]
        suffix = "" if self.encoders[position] == 0 else f"_{self.encoders[position] + 1}"
        return f"text_encoder{suffix}", f"tokenizer{suffix}"


def file_stem(token: str) -> str:
    """A file name for the token (`<sks-cat>` -> `sks-cat`); A1111 and ComfyUI use it as the prompt word."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", token).strip("-.") or "embedding"
    return f"{stem}_emb" if f"{stem}.safetensors" in DIFFUSERS_FILES else stem


def pipeline_loads_embeddings(family: Family) -> bool:
    """Whether the family's stock pipeline has diffusers' `load_textual_inversion` (and its multi-vector prompt
    expansion); SD3's has neither."""
    import diffusers

    return hasattr(getattr(diffusers, family.pipeline_class), "load_textual_inversion")


def plan_files(
    out_dir: Path, token: str, num_encoders: int, family: Family | None = None, encoders: list[int] | None = None
) -> list[EmbeddingFile]:
    """A diffusers `learned_embeds[_N].safetensors` per trained encoder (named after its pipeline component), plus
    the portable `<stem>.safetensors`: `emb_params` for a one-encoder family, else one key per encoder."""
    if family is None:  # by count: the first encoders of a UNet pipeline
        suffixes = ["" if i == 0 else f"_{i + 1}" for i in range(num_encoders)]
        targets = [(f"text_encoder{s}", f"tokenizer{s}") for s in suffixes]
        keys = SDXL_KEYS[:num_encoders] if num_encoders > 1 else ("emb_params",)
        loader, unet = "diffusers", True
    else:
        specs = [family.encoders[i] for i in (encoders if encoders is not None else range(num_encoders))]
        targets = [(spec.component, spec.tokenizer) for spec in specs]
        keys = tuple(spec.embedding_key for spec in specs) if family.text_encoders > 1 else ("emb_params",)
        loader = "diffusers" if pipeline_loads_embeddings(family) else "transformers"
        unet = family.denoiser_component == "unet"
    files = []
    for i, (component, _) in enumerate(targets):
        suffix = component.removeprefix("text_encoder")
        name = f"learned_embeds{suffix}.safetensors"
        files.append(EmbeddingFile(out_dir / name, "diffusers", (i,), (token,), (targets[i],), unet, loader))
    portable = [(i, key) for i, key in enumerate(keys) for key in (key, *KEY_ALIASES.get(key, ()))]
    files.append(
        EmbeddingFile(
            out_dir / f"{file_stem(token)}.safetensors",
            "portable",
            tuple(i for i, _ in portable),
            tuple(k for _, k in portable),
            tuple(targets[i] for i, _ in portable),
            unet,
            loader,
        )
    )
    return files


def load_line(file: EmbeddingFile, token: str, num_encoders: int) -> str:
    """The Python a user runs to load `file` into a diffusers pipeline `pipe`."""
    name = str(file.path)
    explicit = num_encoders > 1 or bool(file.targets and file.targets[0][0] != "text_encoder")

    def args(position: int) -> str:
        te, tok = file.target(position)
        return f", text_encoder=pipe.{te}, tokenizer=pipe.{tok}" if explicit else ""

    def by_hand(position: int, tensor: str) -> str:
        te, tok = file.target(position)
        return (
            f'pipe.{tok}.add_tokens(["{token}"]); '
            f"pipe.{te}.resize_token_embeddings(max(len(pipe.{tok}), "
            f"pipe.{te}.get_input_embeddings().num_embeddings)); "
            f'pipe.{te}.get_input_embeddings().weight.data[pipe.{tok}.convert_tokens_to_ids("{token}")] = '
            f"{tensor}[0].to(pipe.{te}.dtype)"
        )

    calls = [f'sd = safetensors.torch.load_file("{name}")']
    for position, key in first_keys(file):
        if file.loader == "transformers":
            calls.append(by_hand(position, f'sd["{key}"]'))
        elif file.format == "diffusers":
            return f'pipe.load_textual_inversion("{name}"{args(position)})'
        else:
            calls.append(f'pipe.load_textual_inversion(sd["{key}"], token="{token}"{args(position)})')
    return "; ".join(calls)


def first_keys(file: EmbeddingFile) -> list[tuple[int, str]]:
    """(position, key) of the first key per encoder: aliases hold the same tensor and load once."""
    seen, out = set(), []
    for position, (index, key) in enumerate(zip(file.encoders, file.keys)):
        if index not in seen:
            seen.add(index)
            out.append((position, key))
    return out


def write_embeddings(
    out_dir: str | Path,
    token: str,
    vectors: list[torch.Tensor],
    metadata: dict[str, str] | None = None,
    family: Family | None = None,
    encoders: list[int] | None = None,
) -> list[EmbeddingFile]:
    """Write the trained vectors (one `[num_vectors, dim]` tensor per trained text encoder) in every form.

    `family` and `encoders` (the family's encoder indices the vectors belong to) name the files and keys; without
    them the vectors are the first encoders of a UNet pipeline. `metadata` goes into the portable file's header
    (diffusers files carry only `format: pt`, as diffusers' own scripts write them).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = plan_files(out_dir, token, len(vectors), family, encoders)
    for file in files:
        tensors = {
            key: vectors[i].detach().to("cpu", torch.float32).clone() for i, key in zip(file.encoders, file.keys)
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
            tools=TOOLS[file.format] if file.unet_tools or file.format == "diffusers" else TRANSFORMER_TOOLS,
        )
        for file in files
    ]


def load_into(pipe: Any, file: EmbeddingFile, token: str) -> None:
    """Load `file` into `pipe` exactly as `load_line` tells a user to."""
    from safetensors.torch import load_file

    state = load_file(str(file.path))
    for position, key in first_keys(file):
        te, tok = (getattr(pipe, name) for name in file.target(position))
        if file.loader == "transformers":
            tok.add_tokens([token])
            te.resize_token_embeddings(max(len(tok), te.get_input_embeddings().num_embeddings))
            te.get_input_embeddings().weight.data[tok.convert_tokens_to_ids(token)] = state[key][0].to(te.dtype)
        elif file.format == "diffusers":
            pipe.load_textual_inversion(str(file.path), text_encoder=te, tokenizer=tok)
        else:
            pipe.load_textual_inversion(state[key], token=token, text_encoder=te, tokenizer=tok)


def loaded_vectors(pipe: Any, token: str, file: EmbeddingFile, position: int) -> torch.Tensor:
    """The rows `token` expands to in `pipe` (multi-vector: `token`, `token_1`, ...), found via the pipeline's
    own prompt conversion where it has one, so the check also covers the expansion at sampling time."""
    te_name, tok_name = file.target(position)
    tokenizer, text_encoder = getattr(pipe, tok_name), getattr(pipe, te_name)
    words = pipe.maybe_convert_prompt(token, tokenizer).split() if hasattr(pipe, "maybe_convert_prompt") else [token]
    ids = tokenizer.convert_tokens_to_ids(words)
    unknown = [w for w, i in zip(words, ids) if i == tokenizer.unk_token_id or i is None]
    if unknown:
        raise TunerError(f"textual inversion round trip: token(s) {unknown} not in the loaded tokenizer")
    return text_encoder.get_input_embeddings().weight.detach()[ids].to("cpu", torch.float32)


def fresh_pipeline(source: str, family: Family, revision: str | None = None) -> Any:
    """A stock pipeline straight from the base model's folder (no denoiser or VAE: embeddings touch neither)."""
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {family.denoiser_component: None, "vae": None, "revision": revision}
    kwargs.update({k: v for k, v in family.pipeline_extras.items() if v is None})
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

    An alias key (`t5` next to `t5xxl`) must hold its encoder's tensor bitwise. Returns the largest difference
    seen (0.0 when all match)."""
    from safetensors.torch import load_file

    worst = 0.0
    for file in files:
        stored = load_file(str(file.path))
        first = {file.encoders[position]: key for position, key in first_keys(file)}
        for index, key in zip(file.encoders, file.keys):
            if not torch.equal(stored[key], stored[first[index]]):
                raise TunerError(
                    f"textual inversion round trip: {file.path.name}: {key!r} differs from {first[index]!r}"
                )
        pipe = fresh_pipeline(source, family, revision)
        try:
            load_into(pipe, file, token)
        except (ValueError, KeyError) as exc:
            raise TunerError(f"textual inversion round trip: {file.path.name} does not load: {exc}") from exc
        for position, _ in first_keys(file):
            index = file.encoders[position]
            expected = vectors[index].detach().to("cpu", torch.float32)
            got = loaded_vectors(pipe, token, file, position)
            where = file.target(position)[0]
            if got.shape != expected.shape:
                raise TunerError(
                    f"textual inversion round trip: {file.path.name} loads {token!r} into {where} "
                    f"as {tuple(got.shape)} vectors, trained {tuple(expected.shape)}"
                )
            diff = float((got - expected).abs().max()) if got.numel() else 0.0
            if diff != 0.0:
                raise TunerError(
                    f"textual inversion round trip: {file.path.name} reproduces {token!r} in {where} "
                    f"with max difference {diff:.3g} (must be exact)"
                )
            worst = max(worst, diff)
    return worst


def takes_keyed_files(pipe: Any) -> bool:
    """Whether `pipe` belongs to a family whose embedding files are keyed by encoder and that has a non-CLIP
    encoder (SD3, FLUX.1, or one with no CLIP at all): `load_keyed` loads those."""
    from tuner.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    return family is not None and not all(spec.takes_new_tokens for spec in family.encoders)


def load_keyed(pipe: Any, path: Path, state: dict[str, torch.Tensor], token: str | None = None) -> str:
    """Load an embedding file into the encoders its keys name (`clip_l`, `clip_g`, `t5xxl` / `t5`): every CLIP
    encoder of the pipeline needs its key, T5 is loaded when present. A one-tensor file (`{token: T}`,
    `emb_params`) fits a pipeline with one CLIP encoder. The token defaults to a diffusers file's key, else the
    file stem (as A1111 and ComfyUI name embeddings). Returns the token."""
    from tuner.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    specs = list(enumerate(family.encoders))
    clip = [(i, spec) for i, spec in specs if spec.takes_new_tokens]
    if not clip:
        raise TunerError(
            f"--embedding {str(path)!r}: {family.pipeline_class} has no CLIP text encoder to take a token"
        )
    found = []
    for i, spec in specs:
        key = next((k for k in (spec.embedding_key, *KEY_ALIASES.get(spec.embedding_key, ())) if k in state), None)
        if key is not None:
            found.append((i, spec, key))
    if not found and len(state) == 1 and len(clip) == 1:
        (key,) = state
        found = [(clip[0][0], clip[0][1], key)]
        token = token or (Path(path).stem if key == "emb_params" else key)
    token = token or Path(path).stem
    missing = [
        spec.embedding_key for _, spec in clip if spec.embedding_key not in {s.embedding_key for _, s, _ in found}
    ]
    if missing:
        raise TunerError(
            f"--embedding {str(path)!r}: {family.pipeline_class} needs the key(s) {missing} (one tensor per CLIP "
            f"encoder, as `tuner train` writes `<token>.safetensors`); this file has {sorted(state)}"
        )
    file = EmbeddingFile(
        Path(path),
        "portable",
        tuple(range(len(found))),
        tuple(key for _, _, key in found),
        tuple((spec.component, spec.tokenizer) for _, spec, _ in found),
        unet_tools=False,
        loader="diffusers" if pipeline_loads_embeddings(family) else "transformers",
    )
    load_into(pipe, file, token)
    return token
