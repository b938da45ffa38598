"""Textual inversion: learn the embedding rows of a new placeholder token, and pivotal tuning (then a LoRA).

Only the new rows of each text encoder's embedding matrix train; every other row is put back bitwise after
each optimizer step, so weight decay and Adam's moments cannot drift the rest of the vocabulary. The token goes
into every CLIP encoder of the pipeline (CLIP-L, CLIP-G) and, with `train_t5`, into T5 as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from trainers.lora import LoraConfig
from tuner.conditioning import encode_tokens, tokenize
from tuner.config import MethodConfig
from tuner.errors import ConfigError, TunerError
from tuner.losses import LossOptions, diffusion_loss
from tuner.models import Parts
from tuner.trainer import Artifact, Trainables, Trainer

# fmt: off
OBJECT_TEMPLATES = (
    "a photo of a {}", "a close-up photo of a {}", "a bright photo of the {}", "a dark photo of the {}",
    "a cropped photo of a {}", "a photo of my {}", "a photo of the small {}", "a photo of the large {}",
    "a good photo of a {}", "a rendering of a {}", "a photo of one {}", "a clean photo of the {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
    "a cropped painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a dark painting in the style of {}",
    "a small painting in the style of {}", "a large painting in the style of {}",
    "a good painting in the style of {}",
)
# fmt: on
VALIDATION_TEMPLATES = {
    "object": ("a photo of a {}", "a {} on the beach", "a painting of a {} in the snow"),
    "style": ("a painting in the style of {}", "a dog in the style of {}", "a city at night in the style of {}"),
}


class TextualInversionConfig(MethodConfig):
    placeholder_token: str | None = None
    """The new word to learn, e.g. `<sks-cat>`; it must be new to every tokenizer. Default: `data.token`."""
    num_vectors: int = Field(1, ge=1, le=64)
    """Embedding vectors per concept. With N > 1 the token is `<tok>` plus `<tok>_1` ... `<tok>_{N-1}` (the
    diffusers convention); prompts still write only `<tok>`, which expands to all N at load time."""
    init: Literal["word", "random", "mean"] = "word"
    """Start from the embedding of `initializer_token`, from random vectors (the vocabulary's mean and std),
    or from the mean of the vocabulary."""
    initializer_token: str | None = None
    """With `init = "word"`: one word that is a single token (e.g. `cat`), the concept's nearest known word.
    It is also the "base" column (scale 0) of validation grids."""
    templates: Literal["object", "style", "captions"] = "object"
    """Training captions: built-in object templates ("a photo of a {}"), style templates ("a painting in the
    style of {}"), or the dataset's captions with `{token}` expanded (put `{token}` in `data.caption_template`
    or in the captions). With object/style templates the dataset's captions are ignored, and a
    `data.caption_template` that needs captions becomes `{token}` so caption-less images are fine."""
    train_t5: bool = False
    """Also learn the token in the T5 encoder (as diffusers' advanced FLUX.1 script's `--enable_t5_ti`), so the
    pipeline's T5 reads the new word too instead of spelling it out; costs T5's embedding matrix in the optimizer."""
    pivotal: bool = False
    """Pivotal tuning: textual inversion for `pivotal_ti_steps`, then a LoRA (the `lora` table) on top."""
    pivotal_ti_steps: int = Field(100, ge=1)
    """Length of phase 1 (embeddings only) in optimizer steps; phase 2 trains the LoRA."""
    pivotal_embedding_mode: Literal["frozen", "train"] = "frozen"
    """Phase 2: keep the embeddings as phase 1 left them, or keep training them at a lower rate."""
    pivotal_embedding_lr_scale: float = Field(0.1, gt=0, le=1)
    """Phase 2 with `pivotal_embedding_mode = "train"`: the embeddings' steps are scaled by this (their rate is
    `optimizer.embedding_lr` times it), applied after each step so any lr schedule keeps working."""
    lora: LoraConfig = LoraConfig()
    """Pivotal phase 2: the LoRA (`[textual_inversion.lora]`, the `[lora]` table's keys); it trains at
    `optimizer.learning_rate` (text encoders: `text_encoder_lr`). Its kohya file defaults to `<token>_lora`."""


@dataclass
class NewRows:
    """The new rows of one text encoder's embedding matrix, and an exact copy of every other row."""

    ids: list[int]
    init: torch.Tensor
    original: torch.Tensor
    tail: bool  # the new ids are the last rows (the usual case): restore by one slice copy

    def restore_frozen(self, weight: torch.Tensor) -> None:
        if self.tail:
            start = self.ids[0]
            weight[:start].copy_(self.original[:start])
            return
        frozen = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        frozen[self.ids] = False
        weight[frozen] = self.original[frozen]


def expand_ids(ids: torch.Tensor, first: int, extra: list[int], eos: int) -> torch.Tensor:
    """Make every `first` id read as the N token ids of a multi-vector concept, as the stock pipeline's
    prompt conversion does at sampling time (same truncation: the EOS stays last)."""
    if not extra:
        return ids
    length, rows = ids.shape[1], []
    for row in ids.tolist():
        out = [i for token in row for i in ([token, *extra] if token == first else [token])]
        if len(out) > length:
            out = out[:length]
            if eos not in out[1:]:
                out[-1] = eos
        rows.append(out)
    return torch.tensor(rows, dtype=ids.dtype)


class TextualInversionTrainer(Trainer):
    """Adds the placeholder token(s) to every tokenizer and trains only their embedding rows (then, pivotal:
    a LoRA, with phases kept inside the trainer so the loop's parameter groups never change)."""

    name = "textual_inversion"
    Config = TextualInversionConfig

    def __init__(self, config):
        super().__init__(config)
        cfg, data = self.method_config, config.data
        self.token = check_placeholder(cfg.placeholder_token or data.token, data.token, cfg.placeholder_token)
        if data.token != self.token:
            data.token = self.token  # `{token}` in captions and validation prompts means the placeholder
        if cfg.templates != "captions" and "{caption}" in data.caption_template and not data.instance_prompt:
            data.caption_template = "{token}"  # templates replace captions: caption-less images are fine
        self.names = [self.token] + [f"{self.token}_{i}" for i in range(1, cfg.num_vectors)]
        if cfg.init == "word":
            check_initializer_text(cfg.initializer_token)
        if cfg.pivotal and cfg.pivotal_ti_steps >= config.train.max_train_steps:
            raise ConfigError(
                f"textual_inversion.pivotal_ti_steps = {cfg.pivotal_ti_steps}: must be below train.max_train_steps "
                f"= {config.train.max_train_steps}, or phase 2 (the LoRA) never runs"
            )
        self.loss_options = LossOptions.from_config(config)
        self.rows: list[NewRows] = []
        self.encoders: list[int] = []  # indices of the family's text encoders that take the token
        self.lora_params: list[torch.nn.Parameter] = []
        self._trained: list[torch.Tensor] | None = None  # set while a grid shows a scale other than 1
        self._before: list[torch.Tensor] = []  # new rows as they were before the current optimizer step
        self._lora_before: list[torch.Tensor] = []  # phase 1: the LoRA as it must stay
        self._generator = torch.Generator().manual_seed(config.train.seed)

    @property
    def in_phase_one(self) -> bool:
        """Pivotal phase 1 (embeddings only) during optimizer step `global_step`."""
        return self.method_config.pivotal and self.global_step < self.method_config.pivotal_ti_steps

    # --- contract -------------------------------------------------------------------------------------
    def capability(self) -> str:
        return "pivotal" if self.method_config.pivotal else self.name

    def prepare(self, parts: Parts) -> Trainables:
        cfg = self.method_config
        for module in (parts.denoiser, parts.vae, *parts.text_encoders):
            module.requires_grad_(False)
        groups: list[dict[str, Any]] = []
        if cfg.pivotal:  # inject first: injection freezes whole models, embeddings included
            from trainers.lora import inject_lora

            groups = inject_lora(parts, cfg.lora, self.config)
            self.lora_params = [p for group in groups for p in group["params"]]
        self.encoders = self._token_encoders(parts)
        for i in self.encoders:  # the trained rows stay fp32 under mixed precision (T5, 9.5 GB in bf16: only them)
            encoder = parts.unwrapped(parts.text_encoders[i])
            whole = parts.family.encoders[i].takes_new_tokens
            (encoder if whole else encoder.get_input_embeddings()).to(torch.float32)
        self.rows = [self._add_tokens(parts, i) for i in self.encoders]
        params = [parts.unwrapped(parts.text_encoders[i]).get_input_embeddings().weight for i in self.encoders]
        for weight in params:
            weight.requires_grad_(True)
        specs = parts.family.encoders
        modules = {specs[i].component: parts.text_encoders[i] for i in self.encoders}
        if cfg.pivotal:
            modules["denoiser"] = parts.denoiser
        groups.insert(0, {"name": "embeddings", "params": params})
        return Trainables(modules=modules, param_groups=groups, needs=frozenset({"latents", "input_ids"}))

    def compute_loss(self, parts: Parts, batch: dict[str, Any]) -> torch.Tensor:
        cfg = self.method_config
        if self._trained is not None:
            self.set_adapter_scale(parts, 1.0)
        with torch.no_grad():
            self._before = [w[r.ids].clone() for w, r in zip(self._weights(parts), self.rows)]
            if self.in_phase_one:
                self._lora_before = [p.detach().clone() for p in self.lora_params]
        batch = {**batch, "input_ids": self._input_ids(parts, batch)}
        frozen_text = cfg.pivotal and not self.in_phase_one and cfg.pivotal_embedding_mode == "frozen"
        if frozen_text and not cfg.lora.train_text_encoder:
            # Phase 2 with frozen embeddings and no text-encoder LoRA: no text-encoder graph at all.
            with torch.no_grad():
                embeds, pooled = encode_tokens(parts, batch["input_ids"])
            batch.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        return diffusion_loss(parts, batch, self.loss_options, generator=batch.get("generator"))

    def after_optimizer_step(self, parts: Parts) -> None:
        """Put back every frozen row; pivotal: undo the step on the LoRA in phase 1, and on the embeddings in
        phase 2 freeze them or scale their step (state-free: works under any optimizer, schedule or resume)."""
        cfg = self.method_config
        with torch.no_grad():
            for index, (weight, rows) in enumerate(zip(self._weights(parts), self.rows)):
                rows.restore_frozen(weight)
                if cfg.pivotal and not self.in_phase_one and self._before:
                    before = self._before[index]
                    scale = 0.0 if cfg.pivotal_embedding_mode == "frozen" else cfg.pivotal_embedding_lr_scale
                    now = weight[rows.ids]
                    weight[rows.ids] = before if scale == 0.0 else before + scale * (now - before)
            if self.in_phase_one:
                for param, kept in zip(self.lora_params, self._lora_before):
                    param.data.copy_(kept)

    def save(self, parts: Parts, out_dir: Path) -> Artifact:
        from tuner.export.embeddings import artifact_files, check_embeddings, file_stem, write_embeddings

        cfg = self.method_config
        if self._trained is not None:
            self.set_adapter_scale(parts, 1.0)
        out_dir = Path(out_dir)
        vectors = self.trained_vectors(parts)
        files = write_embeddings(out_dir, self.token, vectors, self._metadata(parts), parts.family, self.encoders)
        check_embeddings(files, self.token, vectors, parts.source, parts.family, parts.revision)
        artifact_list = artifact_files(files, self.token, out_dir)
        extra: dict[str, Any] = {
            "tokens": self.names,
            "num_vectors": cfg.num_vectors,
            "init": cfg.init,
            "initializer_token": cfg.initializer_token,
            "templates": cfg.templates,
        }
        if cfg.pivotal:
            from trainers.lora import save_lora

            name = cfg.lora.output_name or f"{file_stem(self.token)}_lora"
            if f"{name}.safetensors" in {f.path.name for f in files}:
                raise ConfigError(f"textual_inversion.lora.output_name = {name!r}: collides with the embedding file")
            lora_report: dict[str, Any] = {}
            artifact_list += save_lora(
                parts, cfg.lora.model_copy(update={"output_name": name}), self.config, out_dir, lora_report
            )
            extra.update(pivotal_ti_steps=cfg.pivotal_ti_steps, lora=lora_report)
        return self.artifact(parts, artifact_list, self.token, extra)

    def set_adapter_scale(self, parts: Parts, scale: float) -> bool:
        """Interpolate the new rows from their start (scale 0: the initializer word, i.e. the base model's
        reading of the prompt) to the trained vectors (scale 1, restored bitwise); pivotal: the LoRA too."""
        if self.method_config.pivotal:
            from trainers.lora import set_lora_scale

            set_lora_scale(parts, scale)
        with torch.no_grad():
            weights = self._weights(parts)
            if self._trained is None:
                if scale == 1.0:
                    return True
                self._trained = [w[r.ids].clone() for w, r in zip(weights, self.rows)]
            for weight, rows, trained in zip(weights, self.rows, self._trained):
                init = rows.init.to(weight)
                weight[rows.ids] = trained if scale == 1.0 else init + scale * (trained - init)
            if scale == 1.0:
                self._trained = None
        return True

    def validation_prompts(self) -> list[str]:
        kind = "style" if self.method_config.templates == "style" else "object"
        prompts = [t.format(self.token) for t in VALIDATION_TEMPLATES[kind]]
        instance = self.config.data.instance_prompt
        if instance and self.token in instance:
            prompts.insert(0, instance)
        return prompts

    # --- tokens ---------------------------------------------------------------------------------------
    def trained_vectors(self, parts: Parts) -> list[torch.Tensor]:
        """One `[num_vectors, dim]` tensor per text encoder, in token order."""
        return [w[r.ids].detach().to("cpu", torch.float32).clone() for w, r in zip(self._weights(parts), self.rows)]

    def _weights(self, parts: Parts) -> list[torch.Tensor]:
        return [parts.unwrapped(parts.text_encoders[i]).get_input_embeddings().weight.data for i in self.encoders]

    def _token_encoders(self, parts: Parts) -> list[int]:
        """The family's text encoders that take the new token: its CLIP encoders, plus T5 with `train_t5`; checks
        that every pipeline the token goes to can read it back (multi-vector tokens need the diffusers loader)."""
        from tuner.export.embeddings import pipeline_loads_embeddings

        cfg, specs = self.method_config, parts.family.encoders
        if cfg.train_t5 and all(spec.takes_new_tokens for spec in specs):
            raise ConfigError(
                f"textual_inversion.train_t5 = true: this model's text encoders ({', '.join(s.label for s in specs)}) "
                "include no T5; set it to false"
            )
        quantize = getattr(self.config.model, "quantize", "none")
        if cfg.train_t5 and quantize != "none":
            raise ConfigError(
                f"textual_inversion.train_t5 = true with model.quantize = {quantize!r}: T5 is stored quantized and "
                "its rows cannot train; set train_t5 = false (the CLIP encoders still learn the token) or quantize "
                "'none'"
            )
        if cfg.num_vectors > 1 and not pipeline_loads_embeddings(parts.family):
            raise ConfigError(
                f"textual_inversion.num_vectors = {cfg.num_vectors}: {parts.family.pipeline_class} has no "
                "load_textual_inversion to expand a multi-vector token in prompts; use num_vectors = 1 here"
            )
        return [i for i, spec in enumerate(specs) if spec.takes_new_tokens or cfg.train_t5]

    def _add_tokens(self, parts: Parts, index: int) -> NewRows:
        """Add the placeholder name(s) to tokenizer `index`, grow its encoder, and write the start vectors."""
        cfg = self.method_config
        tokenizer, encoder = parts.tokenizers[index], parts.unwrapped(parts.text_encoders[index])
        check_new_tokens(tokenizer, self.names, index)
        init_id = check_initializer(tokenizer, cfg.initializer_token, index) if cfg.init == "word" else None
        old = encoder.get_input_embeddings().weight.detach()
        known = old[: len(tokenizer)]
        if tokenizer.add_tokens(self.names) != len(self.names):
            raise ConfigError(
                f"textual_inversion.placeholder_token = {self.token!r}: could not be added to the tokenizer"
            )
        ids = tokenizer.convert_tokens_to_ids(self.names)
        if max(ids) >= old.shape[0]:
            encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            if init_id is not None:
                start = known[init_id].expand(len(ids), -1)
            elif cfg.init == "mean":
                start = known.float().mean(0).expand(len(ids), -1)
            else:
                gen = torch.Generator().manual_seed(self.config.train.seed + index)
                noise = torch.randn((len(ids), known.shape[1]), generator=gen)
                start = known.float().mean(0) + noise * known.float().std(0)
            weight[ids] = start.to(weight)
        tail = ids == list(range(weight.shape[0] - len(ids), weight.shape[0]))
        return NewRows(ids=ids, init=weight[ids].detach().clone(), original=weight.detach().clone(), tail=tail)

    def _input_ids(self, parts: Parts, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Token ids of this step: template captions (object/style) or the batch's own, multi-vector expanded."""
        templates = self.method_config.templates
        if templates == "captions":
            ids = batch["input_ids"]
            ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
            self._check_captions(parts, ids[self.encoders[0]], batch.get("is_prior"))
        else:
            pool = OBJECT_TEMPLATES if templates == "object" else STYLE_TEMPLATES
            count = _batch_size(batch)
            picks = torch.randint(len(pool), (count,), generator=batch.get("generator") or self._generator)
            ids = tokenize(parts, [pool[int(i)].format(self.token) for i in picks])
        out = list(ids)
        for index, rows in zip(self.encoders, self.rows):
            eos = parts.tokenizers[index].eos_token_id
            out[index] = expand_ids(ids[index].cpu(), rows.ids[0], rows.ids[1:], eos)
        return out

    def _check_captions(self, parts: Parts, ids: torch.Tensor, is_prior: torch.Tensor | None) -> None:
        """A caption without the placeholder teaches it nothing; say so instead of training in vain."""
        tokenizer = parts.tokenizers[self.encoders[0]]
        first, eos = self.rows[0].ids[0], tokenizer.eos_token_id
        for row, tokens in enumerate(ids.tolist()):
            empty = len(tokens) < 2 or tokens[1] == eos
            prior = is_prior is not None and bool(is_prior[row])
            if not empty and not prior and first not in tokens:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                raise TunerError(
                    f"textual_inversion.templates = 'captions': the caption {text!r} does not contain the "
                    f"placeholder {self.token!r}; put {{token}} in data.caption_template (e.g. "
                    "\"a photo of {token}, {caption}\") or in the captions, or use templates = 'object' / 'style'"
                )

    def _metadata(self, parts: Parts) -> dict[str, str]:
        from tuner.export.embeddings import file_stem
        from tuner.export.metadata import modelspec

        stem = file_stem(self.token)
        meta = modelspec(parts.family, parts.prediction_type, stem, self.config.data.resolution, trigger=stem,
                         adapter="textual-inversion")  # fmt: skip
        meta.update({"tuner.token": self.token, "tuner.num_vectors": str(len(self.names)),
                     "tuner.config": json.dumps(self.config.public_dict(), ensure_ascii=False)})  # fmt: skip
        return meta


def _batch_size(batch: dict[str, Any]) -> int:
    for key in ("latents", "latent_mean", "pixel_values"):
        if key in batch:
            return int(batch[key].shape[0])
    raise TunerError("textual inversion batch: no latents, latent_mean or pixel_values to size the captions by")


# --- token checks (each names the field, the value and what is allowed) ---------------------------------
def check_placeholder(token: str | None, data_token: str | None, own: str | None) -> str:
    field = "textual_inversion.placeholder_token"
    if own and data_token and own != data_token:
        raise ConfigError(
            f"{field} = {own!r} but data.token = {data_token!r}: they name the same word; set one, or both alike"
        )
    if not token or not token.strip():
        raise ConfigError(f"{field}: not set; give a new word such as '<sks-cat>' (or set data.token)")
    if token != token.strip() or any(c.isspace() for c in token):
        raise ConfigError(f"{field} = {token!r}: must be one word without spaces, e.g. '<sks-cat>'")
    if token != token.lower():
        raise ConfigError(f"{field} = {token!r}: CLIP tokenizers lowercase prompts, so use {token.lower()!r}")
    if "{" in token or "}" in token:
        raise ConfigError(f"{field} = {token!r}: braces are template syntax; use a word such as '<sks-cat>'")
    return token


def check_new_tokens(tokenizer: Any, names: list[str], index: int) -> None:
    """Every name must be unknown to the tokenizer: not in its vocabulary, nor a word it already reads as one token."""
    vocab = tokenizer.get_vocab()
    for name in names:
        pieces = tokenizer.tokenize(name)
        known = name in vocab or (
            len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) != tokenizer.unk_token_id
        )
        if known:
            raise ConfigError(
                f"textual_inversion.placeholder_token: {name!r} is already in the vocabulary of tokenizer {index + 1} "
                f"(as {pieces}); pick a new word such as '<{names[0].strip('<>')}-ti>'"
            )


def check_initializer_text(word: str | None) -> None:
    if word is None or not word.strip():
        raise ConfigError(
            f"textual_inversion.initializer_token = {word!r}: empty; with init = 'word' give one word that is a "
            "single token (e.g. 'cat'), or set init = 'mean' or 'random'"
        )


def check_initializer(tokenizer: Any, word: str | None, index: int) -> int:
    """The single token id of the initializer word."""
    check_initializer_text(word)
    pieces = tokenizer.tokenize(word)
    ids = tokenizer.convert_tokens_to_ids(pieces)
    if len(ids) != 1:
        raise ConfigError(
            f"textual_inversion.initializer_token = {word!r}: tokenizer {index + 1} reads it as {len(ids)} tokens "
            f"{pieces}; give one word that is a single token, or set init = 'mean' or 'random'"
        )
    if ids[0] == tokenizer.unk_token_id:
        raise ConfigError(f"textual_inversion.initializer_token = {word!r}: unknown to tokenizer {index + 1}")
    return ids[0]
