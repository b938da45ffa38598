"""Judge what a personalization run learned, on fixed seeds: subject fidelity, context adherence, prior drift.

Used by `tuner demo` (its metrics.json) and by `bench/quality.py`. Every figure compares the tuned model with
the same pipeline at adapter scale 0 (or the base model) on the same prompts and seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from tuner.micro.judge import Judge
from tuner.micro.world import CONCEPT, INSTANCE, PALETTE, STYLE_TRIGGERS, Concept, parse_caption, scenes

CONTEXT_BACKGROUNDS = ("blue", "green", "red", "white")


@dataclass(frozen=True)
class Subject:
    """An example subject: its photos (`datasets/<folder>` = `scenes(kind, 8, seed)`) and what the judge must read."""

    folder: str
    kind: str
    concept: Concept
    labels: dict[str, Any]
    seed: int = 1
    count: int = 8

    def photos(self) -> list[Any]:
        return [scene.render() for scene in scenes(self.kind, self.count, self.seed)]


SUBJECTS = {
    "reachable": Subject("micro-subject", "subject", INSTANCE, {"shape": INSTANCE.class_word, "color": "black"}),
    "hard": Subject("micro-subject-hard", "concept", CONCEPT, {"concept": True, "shape": CONCEPT.class_word}),
}
"""The example subject within the base's reach (a black heart: the judge reads its shape and color; its stripes are
for the eye) and the hard one beyond it (the checkered heart: its two-tone pattern on an object of its shape; the
pattern's colors alone, scattered over the frame in blobs, are not the subject)."""
SUBJECT_LABELS = SUBJECTS["reachable"].labels


def is_subject(judged: dict[str, Any], subject: str = "reachable") -> bool:
    return all(judged[key] == value for key, value in SUBJECTS[subject].labels.items())


@dataclass
class SubjectMetrics:
    """Fractions in [0, 1] over prompts x seeds (base = the same prompts without the adaptation)."""

    fidelity: float
    """Instance-prompt samples in which the judge finds the subject."""
    context_adherence: float
    """Samples for prompts naming a background that show the subject on that background."""
    class_subject_rate: float
    """Class-prompt samples in which the judge finds the subject (it should stay near the base rate)."""
    prior_drift: float
    """How much more often class-prompt samples show the subject than the base model's did."""
    base_fidelity: float
    """The base model's fidelity on the same prompts (the subject is new to it: near 0)."""
    subject_likeness: float
    """How close the instance-prompt samples' palette is to the subject photos' (1 = the same color histogram):
    continuous, so it shows learning long before the judge's verdict flips."""
    base_subject_likeness: float
    """The same for the base model."""
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def palette_histogram(images: Sequence[Any]) -> Any:
    """Share of pixels nearest to each world palette color, over all images."""
    import numpy as np

    palette = np.array(list(PALETTE.values()), np.float32)
    pixels = np.concatenate([np.asarray(img.convert("RGB"), np.float32).reshape(-1, 3) for img in images])
    nearest = ((pixels[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    return np.bincount(nearest, minlength=len(palette)) / len(nearest)


@lru_cache(maxsize=2)
def _subject_histogram(subject: str) -> Any:
    """The example subject photos' palette."""
    return palette_histogram(SUBJECTS[subject].photos())


def subject_likeness(images: Sequence[Any], subject: str = "reachable") -> float:
    """1 - total variation distance between the images' palette histogram and the subject photos'."""
    return float(1.0 - 0.5 * abs(palette_histogram(images) - _subject_histogram(subject)).sum())


def subject_prompts(token: str, subject: str = "reachable") -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(instance prompts, (context prompt, background) pairs, class prompts) for an example subject."""
    concept = SUBJECTS[subject].concept
    instance = [f"a photo of a {token} {concept.class_word}"]
    if concept.photo_backgrounds:  # the photos' own captions: this base draws nothing sure without a background
        instance = [concept.caption(bg, token) for bg in concept.photo_backgrounds[:2]]
    contexts = [(concept.caption(bg, token), bg) for bg in CONTEXT_BACKGROUNDS]
    classes = [concept.class_caption(bg) for bg in CONTEXT_BACKGROUNDS[:2]]
    return instance, contexts, classes


def encode_means(vae: Any, images: Sequence[Any]) -> torch.Tensor:
    """RGB images (PIL or uint8 arrays) encoded by `vae` to their latent means, unscaled (no `scaling_factor`)."""
    pixels = np.stack([np.asarray(image, np.float32)[..., :3] / 127.5 - 1 for image in images])
    with torch.no_grad():
        return vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2).to(vae.device, vae.dtype)).latent_dist.mean


def through_vae(vae: Any, images: Sequence[Any]) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Images encoded by `vae` to their latent means (unscaled) and decoded back to uint8 RGB: the most any UNet
    working in this VAE's latents can draw of them."""
    means = encode_means(vae, images)
    with torch.no_grad():
        decoded = vae.decode(means).sample.float().clamp(-1, 1)
    out = ((decoded.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    return means, list(out)


def _render(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float, size: int):
    images = []
    for prompt in prompts:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = pipe(
            [prompt] * len(seeds),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generators,
        )
        images.extend(out.images)
    return images


def judge_subject(
    pipe_at: Callable[[float], Any],
    token: str = "sks",
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = 20,
    guidance: float = 4.0,
    size: int = 64,
    judge: Judge | None = None,
    subject: str = "reachable",
) -> SubjectMetrics:
    """Score the tuned model (`pipe_at(1.0)`) against the base (`pipe_at(0.0)`) with the micro-world judge.

    `pipe_at(scale)` returns a pipeline ready to sample at that adapter scale: the same pipeline with its LoRA
    scaled, or two pipelines (full fine-tuning, or an embedding loaded only into the tuned one).
    """
    judge = judge or Judge()
    instance, contexts, classes = subject_prompts(token, subject)

    scores: dict[float, float] = {}

    def fraction(prompts, scale, test) -> float:
        images = _render(pipe_at(scale), prompts, seeds, steps, guidance, size)
        labels = [p for p in prompts for _ in seeds]
        judged = [judge.judge(img) for img in images]
        if prompts == instance:
            scores[scale] = subject_likeness(images, subject)
        hits = [test(out, label) for out, label in zip(judged, labels)]
        return sum(hits) / max(len(hits), 1)

    has_subject = lambda out, _: is_subject(out, subject)  # noqa: E731
    backgrounds = dict(contexts)
    in_context = lambda out, prompt: is_subject(out, subject) and out["background"] == backgrounds[prompt]  # noqa: E731
    fidelity = fraction(instance, 1.0, has_subject)
    context = fraction(list(backgrounds), 1.0, in_context)
    class_rate = fraction(classes, 1.0, has_subject)
    base_class = fraction(classes, 0.0, has_subject)
    base_fidelity = fraction(instance, 0.0, has_subject)
    pipe_at(1.0)
    total = len(seeds) * (2 * len(instance) + len(contexts) + 2 * len(classes))
    return SubjectMetrics(
        fidelity=fidelity,
        context_adherence=context,
        class_subject_rate=class_rate,
        prior_drift=max(0.0, class_rate - base_class),
        base_fidelity=base_fidelity,
        subject_likeness=scores[1.0],
        base_subject_likeness=scores[0.0],
        samples=total,
    )


STYLE_PROMPTS = (
    "a red circle on a white background",
    "a pink circle on a green background",
    "a blue heart on a white background",
    "a blue cross on a white background",
)
"""Prompts the micro base draws right (shape and color on 6-8 of 8 seeds), so `content_kept` measures what a
style does to content, not the base's own misses (it draws "a blue star" as a heart or a blob)."""


def judge_style(
    pipe_at: Callable[[float], Any],
    style: str = "shaded",
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = 20,
    guidance: float = 4.0,
    size: int = 64,
    judge: Judge | None = None,
) -> dict[str, float]:
    """Style adherence with the content kept: the fraction of samples prompted with the style's trigger that the
    judge calls `style`, tuned vs base, the mean judge `<style>_score` (continuous: it shows a style being learned
    before the verdicts flip), and `content_kept`: the share of tuned samples whose shape and color are the
    prompt's, beside `base_content` (the base on the same prompts without the trigger: the content to keep)."""
    judge = judge or Judge()
    styled = [f"{p} {STYLE_TRIGGERS[style]}" for p in STYLE_PROMPTS]
    wanted = [parse_caption(p) for p in STYLE_PROMPTS for _ in seeds]

    def content(judged: list[dict]) -> float:
        return sum(j["shape"] == w["shape"] and j["color"] == w["color"] for j, w in zip(judged, wanted)) / len(judged)

    out = {}
    for prefix, scale in (("", 1.0), ("base_", 0.0)):
        judged = [judge.judge(img) for img in _render(pipe_at(scale), styled, seeds, steps, guidance, size)]
        out[f"{prefix}style_adherence"] = sum(j["style"] == style for j in judged) / len(judged)
        out[f"{prefix}style_score"] = sum(j[f"{style}_score"] for j in judged) / len(judged)
        if scale:
            out["content_kept"] = content(judged)
    plain = [judge.judge(img) for img in _render(pipe_at(0.0), STYLE_PROMPTS, seeds, steps, guidance, size)]
    out["base_content"] = content(plain)
    pipe_at(1.0)
    return out
