"""The micro-world judge: read a (generated) 64x64 image back into world labels, so training runs can be scored.

Everything is analytic except the shape, which is the nearest neighbour of rotation-, scale- and position-invariant
silhouette features among silhouettes the world itself renders (built at start-up in a few seconds, no weights).
The background is the majority palette color of the frame's border; the object is every pixel nearer to an object
tone than to that background; its color is a vote of object pixels, each unmixed from the background first so
blurred strokes still vote right; the concept is its two pattern colors (or, after chroma blur, its bright/dark
two-tone split) filling the object; outline style is a background-colored hole inside the silhouette, mosaic
style is edge energy sitting on the 4-pixel cell grid, and shaded style is the object's color voted mostly by its
darker shade rather than its tone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from tuner.micro import world

ImageLike = Any  # a PIL image, an HxWx3 uint8 array, or a CxHxW float tensor in [0, 1]

_NAMES = list(world.COLORS)
_PAL = np.array([world.PALETTE[c] for c in _NAMES], np.float32)
_PROTOS = np.concatenate([_PAL, np.array([world.shade(c) for c in _NAMES], np.float32)])  # tones and shades
_OWNER = np.array(list(range(len(_NAMES))) * 2)  # palette index each prototype votes for
_IS_SHADE = np.arange(len(_PROTOS)) >= len(_NAMES)
_CONCEPT_IDX = [_NAMES.index(c) for c in world.CONCEPT.colors]
_TEMPLATE_SEED = 917  # template scenes come from their own seed stream, never from a data set's

MOSAIC_THRESHOLD = 0.18  # grid-phase contrast of edge energy (see `_mosaic`); about 0 for unstyled images
OUTLINE_THRESHOLD = 0.05  # share of the silhouette that is a background-colored hole
SHADED_THRESHOLD = 0.6  # share of the object color's votes cast by its shade: 1/3 on striped objects, near 1 shaded
SOFT_TEMPLATE_BLUR = (1.0, 1.8)  # gaussian radii (px) of the softened template copies (see `_template_banks`)
CONCEPT_MIN_SHARE, CONCEPT_MIN_TOTAL = 0.15, 0.6  # each pattern color, and both together, in object votes
SHAPE_MAX_DISTANCE = 8.0
"""Mean standardized feature distance to the k nearest template silhouettes beyond which the object is no shape at
all (shape None): fresh renders, degraded or not, stay under 2.2 and the micro base's drawings mostly under 7, while
a scatter of blobs (an over-trained adapter's) lies at 10-20 and would otherwise read as the nearest shape."""


def _as_array(image: ImageLike) -> np.ndarray:
    """Float RGB array at world size from a PIL image, a HxWx3 uint8 array or a 3xHxW float tensor in [0, 1]."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr.astype(np.float32) * 255), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
    image = image.convert("RGB")
    if image.size != (world.SIZE, world.SIZE):
        image = image.resize((world.SIZE, world.SIZE), Image.Resampling.BOX)
    return np.asarray(image, np.float32)


def _segment(a: np.ndarray) -> dict:
    """Background = majority palette color of a 2-pixel border; object = pixels nearer an object tone than it."""
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[2:-2, :2].reshape(-1, 3),
                             a[2:-2, -2:].reshape(-1, 3)])  # fmt: skip
    near = np.argmin(((border[:, None] - _PAL[None]) ** 2).sum(-1), axis=1)
    votes = np.bincount(near, minlength=len(_NAMES))
    bg = int(np.argmax(votes))
    bg_rgb = np.median(border[near == bg], axis=0)  # measured, so global color shifts do not matter
    keep = np.not_equal(_OWNER, bg) | _IS_SHADE
    d_bg = np.sqrt(((a - bg_rgb) ** 2).sum(-1))
    protos = _PROTOS[keep]
    sq = (a * a).sum(-1)[..., None] - 2.0 * a @ protos.T + (protos * protos).sum(-1)
    mask = (np.sqrt(np.maximum(sq.min(-1), 0.0)) < d_bg) & (d_bg > 20)  # d_bg > 20 ignores grain
    return {"bg": bg, "bg_conf": float(votes[bg] / len(border)), "bg_rgb": bg_rgb, "d_bg": d_bg,
            "protos": protos, "owners": _OWNER[keep], "keep": keep, "mask": mask}  # fmt: skip


def _dilate(mask: np.ndarray, four: bool = False) -> np.ndarray:
    """3x3 (or 4-neighbour) binary dilation with shifted in-place ORs; it runs in the inner loop of `_grow`."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    src = mask if four else out.copy()
    out[:, 1:] |= src[:, :-1]
    out[:, :-1] |= src[:, 1:]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion; outside the frame counts as background."""
    inner = ~_dilate(~mask)
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    return inner


def _grow(seed: np.ndarray, within: np.ndarray, four: bool = False) -> np.ndarray:
    """Geodesic reconstruction: the parts of `within` connected to `seed`."""
    region = seed & within
    while True:
        nxt = _dilate(region, four) & within
        if np.array_equal(nxt, region):
            return region
        region = nxt


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    border = np.zeros_like(mask)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    return ~_grow(border, ~mask, four=True)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The connected part around the densest spot: generated images may carry specks besides the object."""
    c = np.cumsum(np.cumsum(np.pad(mask.astype(np.int32), ((3, 2), (3, 2))), 0), 1)
    density = c[5:, 5:] - c[:-5, 5:] - c[5:, :-5] + c[:-5, :-5]  # 5x5 box sums
    seed = np.zeros_like(mask)
    seed[np.unravel_index(int(np.argmax(np.where(mask, density, -1))), mask.shape)] = True
    return _grow(seed, mask)


def _object(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object's pixels and its filled silhouette; a 3x3 closing first mends lines broken by blur or JPEG."""
    blob = _largest_blob(_erode(_dilate(mask)) | mask)
    return blob, _fill_holes(blob)


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixel squares (monotone chain over row end corners)."""
    pts = []
    for y in np.flatnonzero(mask.any(axis=1)):
        xs = np.flatnonzero(mask[y])
        pts += [(xs[0], y), (xs[0], y + 1), (xs[-1] + 1, y), (xs[-1] + 1, y + 1)]
    pts = sorted(set(pts))
    if len(pts) < 3:
        return float(mask.sum())

    def half(points):
        out = []
        for p in points:
            while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = half(pts) + half(pts[::-1])
    xs, ys = np.array(hull, float).T
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def silhouette_features(sil: np.ndarray) -> np.ndarray:
    """Rotation-, scale- and position-invariant shape descriptors of a filled silhouette."""
    area = float(sil.sum())
    ys, xs = np.nonzero(sil)
    cy, cx = ys.mean(), xs.mean()
    by, bx = np.nonzero(sil & ~_erode(sil))
    ang = np.arctan2(by - cy, bx - cx)
    rad = np.hypot(by - cy, bx - cx) + 0.5
    bins = 32
    idx = ((ang + math.pi) / (2 * math.pi) * bins).astype(int) % bins
    prof = np.zeros(bins)
    np.maximum.at(prof, idx, rad)
    if (prof == 0).any():  # tiny shapes leave empty angle bins: interpolate around the circle
        k = np.flatnonzero(prof > 0)
        prof = np.interp(np.arange(bins), k, prof[k], period=bins)
    prof = prof / prof.mean()
    harmonics = np.abs(np.fft.rfft(prof))[1:9] / bins
    compact = area / (math.pi * float(rad.max()) ** 2)
    solidity = area / max(_hull_area(sil), 1.0)
    dy, dx = ys - cy, xs - cx
    mu20, mu02, mu11 = (dx * dx).sum(), (dy * dy).sum(), (dx * dy).sum()
    n = area**2
    hu1 = (mu20 + mu02) / n
    hu2 = ((mu20 - mu02) ** 2 + 4 * mu11**2) / n**2
    return np.array([compact, solidity, *(harmonics * 4), hu1 * 6, math.sqrt(hu2) * 6])


def _unmix_votes(pixels, bg_rgb, protos) -> tuple[np.ndarray, np.ndarray]:
    """Vote each object pixel for the prototype (tone or shade) it is a mix of with the background (pixel = bg +
    t * (proto - bg)), so thin strokes that blur or JPEG blended into the background still vote for their own
    color; purer pixels (larger t, smaller residual) weigh more. Returns prototype indices and weights."""
    v = pixels - bg_rgb
    w = protos - bg_rgb
    t = np.clip((v @ w.T) / np.maximum((w * w).sum(-1), 1.0), 0.35, 1.0)
    resid = np.sqrt(((v[:, None, :] - t[..., None] * w[None]) ** 2).sum(-1))
    best = np.argmin(resid, axis=1)
    rows = np.arange(len(pixels))
    return best, t[rows, best] / (1.0 + (resid[rows, best] / 25.0) ** 2)


_YCC = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], np.float32)


def _two_tone_score(pixels: np.ndarray) -> float:
    """Concept evidence that survives chroma blur (JPEG, soft generations): luma splits into a bright and a dark
    half, the mean chroma is the yellow/purple mix, and the bright half is the yellower one. 0 when absent."""
    y, cb, cr = (pixels @ _YCC.T).T
    bright, dark = y > 150, y < 135
    if bright.sum() < 2 or dark.sum() < 2:
        return 0.0
    chroma_ok = -48 <= cb.mean() <= -3 and 12 <= cr.mean() <= 57
    if not chroma_ok or cb[dark].mean() - cb[bright].mean() < 20:
        return 0.0
    return float(min(1.0, 2 * min(bright.mean(), dark.mean())))


def _mosaic(a: np.ndarray) -> dict:
    """How strongly edge energy sits on the mosaic cell grid.

    The column (and row) gradient profile is folded modulo the cell size; the score is the share on the cell
    boundary minus the share half a cell away, for the weaker axis. About 0 for free images, 1 for a clean mosaic,
    and still clear after blur because blurred grid edges stay centred on the grid. The image's median gradient
    (its noise level) is subtracted first so that grain does not dilute the score.
    """
    cell = world.MOSAIC_CELL
    grads = [np.abs(np.diff(a, axis=axis)).sum(-1) for axis in (0, 1)]
    floor = float(np.median(np.concatenate([g.ravel() for g in grads]))) + 8.0
    scores = []
    for axis, g in enumerate(grads):
        energy = np.maximum(g - floor, 0.0).sum(axis=1 - axis)
        folded = np.bincount(np.arange(len(energy)) % cell, weights=energy, minlength=cell)
        scores.append((folded[cell - 1] - folded[1]) / folded.sum() if folded.sum() > 0 else 0.0)
    return {"mosaic_score": float(min(scores))}  # both axes: a mosaic is on the grid in x and in y


@lru_cache(maxsize=4)
def _template_banks(per_shape: int) -> dict:
    """Silhouette features of fresh world renders of every shape, plain, softened and mosaicked, standardized.

    The softened copies stand for what a small VAE decoder makes of a shape: points and corners rounded by a pixel
    or two. Without them a star or cross decoded by the micro VAE (to a person still plainly one) read as a square.
    """
    rng = np.random.default_rng([_TEMPLATE_SEED, per_shape])
    rows: dict = {None: ([], []), "mosaic": ([], [])}
    cells = world.SIZE // world.MOSAIC_CELL
    for i, shape in enumerate(world.SHAPES):
        for _ in range(per_shape):
            plain = world.sample_scene(rng, shape=shape, max_rotation=45.0).render()
            mosaic = plain.resize((cells, cells), Image.Resampling.BOX).resize(plain.size, Image.Resampling.NEAREST)
            soft = [(None, plain.filter(ImageFilter.GaussianBlur(r))) for r in SOFT_TEMPLATE_BLUR]
            for style, image in ((None, plain), *soft, ("mosaic", mosaic)):
                mask = _segment(_as_array(image))["mask"]
                if mask.sum() >= 6:
                    rows[style][0].append(silhouette_features(_object(mask)[1]))
                    rows[style][1].append(i)
    banks = {}
    for style, (feats, names) in rows.items():
        x = np.array(feats)
        mean, std = x.mean(0), x.std(0) + 1e-6
        banks[style] = ((x - mean) / std, mean, std), np.array(names)
    return banks


class Judge:
    """Predicts shape, color, background, concept and style of one micro-world image, with confidences."""

    def __init__(self, templates_per_shape: int = 30, k: int = 5):
        self.k = k
        self._banks = _template_banks(templates_per_shape)

    def judge(self, image: ImageLike) -> dict:
        """Labels of one image: `shape`, `color`, `background` (world words or None when no object is found;
        shape also None when the object is like no shape, see SHAPE_MAX_DISTANCE), `concept` (bool), `style` (a style
        name or None), each with a `*_conf` or `*_score` in [0, 1], the object's `bbox` [x0, y0, x1, y1) and its
        `shape_distance` to the nearest template silhouettes."""
        a = _as_array(image)
        seg = _segment(a)
        bg, d_bg, owners, mask = seg["bg"], seg["d_bg"], seg["owners"], seg["mask"]
        out = {"background": _NAMES[bg], "background_conf": seg["bg_conf"], **_mosaic(a)}
        if mask.sum() < 6:
            return {**out, "shape": None, "shape_conf": 0.0, "color": None, "color_conf": 0.0, "concept": False,
                    "concept_score": 0.0, "style": "mosaic" if out["mosaic_score"] > MOSAIC_THRESHOLD else None,
                    "style_conf": 0.0, "outline_score": 0.0, "shaded_score": 0.0, "bbox": None,
                    "shape_distance": None}  # fmt: skip
        blob, sil = _object(mask)
        ys, xs = np.nonzero(sil)
        out["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]

        inner = _erode(blob) & mask
        voters = inner if inner.sum() >= 4 else blob & mask
        proto, weight = _unmix_votes(a[voters], seg["bg_rgb"], seg["protos"])
        pick, by_shade = owners[proto], _IS_SHADE[seg["keep"]][proto]
        weight[pick == bg] = 0.0  # the background's own shade is an object tone for the mask, not a color vote
        counts = np.bincount(pick, weights=weight, minlength=len(_NAMES))
        total = max(counts.sum(), 1e-6)
        top = int(np.argmax(counts))
        out.update(color=_NAMES[top], color_conf=float(counts[top] / total))
        out["shaded_score"] = float(weight[(pick == top) & by_shade].sum() / max(counts[top], 1e-6))
        shares = counts[_CONCEPT_IDX] / total
        palette_hit = shares.min() >= CONCEPT_MIN_SHARE and shares.sum() >= CONCEPT_MIN_TOTAL
        tone_score = _two_tone_score(a[voters])
        out["concept_score"] = float(max(min(1.0, 2 * shares.min()), tone_score))
        out["concept"] = bool(palette_hit or tone_score >= 2 * CONCEPT_MIN_SHARE)

        holes = sil & ~blob
        obj_dist = float(np.median(d_bg[blob]))
        bg_like = holes & (d_bg < 0.5 * obj_dist)
        out["outline_score"] = float(bg_like.sum() / sil.sum())
        if out["mosaic_score"] > MOSAIC_THRESHOLD:
            out["style"] = "mosaic"
        elif out["outline_score"] > OUTLINE_THRESHOLD:
            out["style"] = "outline"
        elif out["shaded_score"] > SHADED_THRESHOLD:
            out["style"] = "shaded"
        else:
            out["style"] = None
        out["style_conf"] = _style_conf(out)

        feats, names = self._banks["mosaic" if out["style"] == "mosaic" else None]
        x = (silhouette_features(sil) - feats[1]) / feats[2]
        dist = np.sqrt(((feats[0] - x) ** 2).sum(-1))
        nearest = np.argsort(dist, kind="stable")[: self.k]
        weights = 1.0 / (dist[nearest] + 1e-3)
        score = np.bincount(names[nearest], weights=weights, minlength=len(world.SHAPES))
        best = int(np.argmax(score))
        out.update(shape=world.SHAPES[best], shape_conf=float(score[best] / score.sum()))
        out["shape_distance"] = float(dist[nearest].mean())
        if out["shape_distance"] > SHAPE_MAX_DISTANCE:
            out.update(shape=None, shape_conf=0.0)
        return out

    def __call__(self, image: ImageLike) -> dict:
        return self.judge(image)

    def score(self, image: ImageLike, expected: dict) -> dict[str, bool]:
        """Per-attribute agreement with wanted labels, e.g. `world.parse_caption(prompt)`. A None shape, color or
        background asks for nothing; a None style asks for no style, and concept False for no concept."""
        got = self.judge(image)
        keys = ("shape", "color", "background", "concept", "style")
        return {k: got[k] == expected[k] for k in keys if k in expected and (expected[k] is not None or k == "style")}


def _style_conf(out: dict) -> float:
    if out["style"] == "mosaic":
        return float(min(1.0, out["mosaic_score"]))
    if out["style"] == "outline":
        return float(min(1.0, out["outline_score"] / (2 * OUTLINE_THRESHOLD)))
    if out["style"] == "shaded":
        return float(out["shaded_score"])
    evidence = (out["mosaic_score"] / MOSAIC_THRESHOLD, out["outline_score"] / OUTLINE_THRESHOLD,
                out["shaded_score"] / SHADED_THRESHOLD)  # fmt: skip
    return float(1.0 - min(1.0, max(evidence)) / 2)


Degrade = Callable[[Image.Image, np.random.Generator], Image.Image]


def _blur(im, rng):
    return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.6, 1.2))))


def _jpeg(im, rng):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(rng.integers(50, 86)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noise(im, rng):
    a = np.asarray(im, np.float32) + rng.normal(0.0, float(rng.uniform(4, 10)), (world.SIZE, world.SIZE, 3))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _jitter(im, rng):
    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.9, 1.1)))
    im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.9, 1.1)))
    a = np.asarray(im, np.float32) + rng.uniform(-10, 10, 3)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _mixed(im, rng):
    """A plausible 'generated' look: soft, slightly off-color, grainy and compressed."""
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 0.9))))
    return _jpeg(_noise(_jitter(im, rng), rng), rng) if rng.random() < 0.5 else _noise(_jitter(im, rng), rng)


DEGRADATIONS: dict[str, Degrade] = {"blur": _blur, "jpeg": _jpeg, "noise": _noise, "jitter": _jitter,
                                    "mixed": _mixed}  # fmt: skip


def degrade(image: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    """Apply one named degradation (blur, jpeg, noise, jitter, mixed) with random strength."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; expected one of {', '.join(DEGRADATIONS)}")
    return DEGRADATIONS[name](image.convert("RGB"), rng)


def accuracy(n: int = 300, seed: int = 20_240, kind: str = "base", degradation: str | None = None,
             judge: Judge | None = None) -> dict[str, float]:  # fmt: skip
    """Per-attribute accuracy on fresh renders of one kind (optionally degraded); `concept` on base scenes is
    1 - false positive rate. Seeds differ from the template stream, so nothing here was seen by the judge."""
    if kind not in ("base", "concept", "style"):
        raise ValueError(f"accuracy is defined for base, concept and style scenes, not {kind!r}")
    judge = judge or Judge()
    rng = np.random.default_rng([seed, 7])
    hits: dict[str, list[bool]] = {}
    for scene in world.scenes(kind, n, seed):
        image = scene.render()
        if degradation:
            image = degrade(image, degradation, rng)
        got, want = judge.judge(image), scene.labels()
        for key in ("shape", "color", "background", "concept", "style"):
            if key == "color" and want[key] is None:
                continue
            hits.setdefault(key, []).append(got[key] == want[key])
    return {"n": n, **{k: float(np.mean(v)) for k, v in hits.items()}}
