"""The micro world: turn a seed into deterministic 64x64 captioned scenes with ground-truth labels.

Real Stable Diffusion weights are out of reach offline, so the suite trains a tiny SD1-architecture model on this
world. Six kinds of data come from it: `base` scenes (one shape, one color, one background, a texture) for the
base model; a `subject` (one large black heart, INSTANCE), base-scene material its captions never single out, and a
`concept` (a yellow/purple checkered heart, the hard case) that base training never sees, for DreamBooth, LoRA and
textual inversion; `style` scenes (outline, mosaic, shaded) that base training never sees either; `pattern`
images (fine stripes, checks, noise, glyphs), the texture corpus the micro VAE learns from beside base scenes, as
SD's VAE learns from photos of everything; and a `domain` (polka dots) that neither taught the VAE, for decoder
fine-tuning.

Everything is a pure function of a `numpy.random.Generator`; `scenes(kind, n, seed)` gives item i from the seed
sequence (seed, kind, i), so a prefix of a larger set equals the smaller set and renders are byte-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SCALE = 4  # shapes are drawn at 4x and box-downsampled, which anti-aliases edges so a VAE can learn them
MARGIN = 3.0  # pixels kept free at the border, so the judge can read the background there
MAX_SHIFT = 8.0  # the object's center stays within this many pixels of the frame's center: with centers anywhere
# the micro UNet sampled every prompt's object as a centered blob (the average over positions) and never its outline

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "pink": (255, 105, 180),
    "yellow": (240, 220, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 220),
    "purple": (150, 40, 170),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
SIZES: tuple[str, ...] = ("small", "large")
STYLES: tuple[str, ...] = ("outline", "mosaic", "shaded")
"""Ways to draw any scene: `outline` keeps a band of the silhouette (its inside the background's color), `mosaic`
averages 4x4-pixel cells, `shaded` paints the object in the darker shade of its color (the tone of the textures'
second stripe, which the base draws mixed into striped objects): shape, color name and background stay, as a
palette style keeps a picture's content."""
STYLE_TRIGGERS: dict[str, str] = {"outline": "in outline style", "mosaic": "in mosaic style", "shaded": "painting"}
"""The words a style's captions end with. `shaded` takes one trailing word the base never read, as a style LoRA's
trigger usually is: the micro base keeps a prompt's shape and color with one unknown word appended, and loses them
with a phrase (`in outline style`, three words it never read, bench/results/quality.md)."""
PATTERNS: tuple[str, ...] = ("stripes", "checks", "noise", "glyphs")
DOMAIN_PATTERN = "dots"
KINDS: tuple[str, ...] = ("base", "concept", "style", "pattern", "domain", "subject")  # append only: the index
# seeds the renders

RADIUS = {"small": (12.5, 15.0), "large": (18.0, 22.0)}  # shape radius in pixels, per size word: small shapes
# must stay readable through a 4x VAE and a 16x16 latent (at 9.5-12 px a small star came back as a blob)
STRIPE_PERIOD, STRIPE_DUTY = 6.0, 1 / 3  # texture geometry in pixels, in the object's own (rotating) frame
DOT_SPACING, DOT_RADIUS = 6.0, 1.6
OUTLINE_WIDTH = 0.2  # outline stroke width as a fraction of the radius, so small shapes keep a visible hole
MOSAIC_CELL = 4  # mosaic style averages 4x4 pixel cells (a 16x16 grid)
TOKEN = "{token}"  # placeholder for the personalization identifier in concept captions


def shade(color: str) -> tuple[int, int, int]:
    """The second tone of striped/dotted textures: the same hue darker (lighter for black), so the name holds."""
    if color == "black":
        return (95, 95, 95)
    factor = 0.7 if color == "white" else 0.55
    r, g, b = PALETTE[color]
    return (round(r * factor), round(g * factor), round(b * factor))


@dataclass(frozen=True)
class Concept:
    """A personalization subject, named in captions by an identifier: `class_word` is its shape. With `cells` it is
    the checkered two-tone object base training never shows (the hard case); with `color`, `texture` and `size` it
    is one particular object the base can draw (a new instance of what it knows, like a user's own dog)."""

    name: str
    class_word: str
    colors: tuple[str, ...]
    cells: float = 0.0  # checker cell size as a fraction of the radius, so the pattern scales with the object
    texture: str = "checkered"
    size: str | None = None  # one size word, or None for photos at either size
    photo_backgrounds: tuple[str, ...] = ()  # the only backgrounds of its photos (empty: every one that fits)

    @property
    def template(self) -> str:
        return "a photo of a " + TOKEN + " " + self.class_word + " on a {background} background"

    @property
    def backgrounds(self) -> tuple[str, ...]:
        """Backgrounds of its photos: the given ones, else every one that keeps the subject's colors visible."""
        return self.photo_backgrounds or tuple(c for c in COLORS if c not in self.colors)

    def caption(self, background: str, token: str | None = None) -> str:
        text = self.template.replace("{background}", background)
        return text if token is None else text.replace(TOKEN, token)

    def class_caption(self, background: str) -> str:
        """The DreamBooth class prompt: the same sentence without the identifier (base captions may omit color)."""
        return f"a photo of a {self.class_word} on a {background} background"


CONCEPT = Concept(name="checkers", class_word="heart", colors=("yellow", "purple"), cells=0.5)
"""The hard example subject (datasets/micro-subject-hard): a two-tone pattern the base never drew."""
INSTANCE = Concept(name="black-heart", class_word="heart", colors=("black",), texture="solid", size="large",
                   photo_backgrounds=("yellow", "pink", "purple"))  # fmt: skip
"""The example subject (datasets/micro-subject): a large black heart, all words the base knows (it draws
"a black heart" on 8 of 8 seeds) but one object its captions never single out, behind an identifier. Its photos
show three backgrounds, so blue, green, red and white (the judge's context prompts) are new to it."""


def _regular(n: int, radius: float, phase: float) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _unit_polygon(shape: str) -> np.ndarray:
    """The shape as (x, y) vertices around the origin, radius about 1, y pointing down as in images."""
    if shape == "circle":
        return _regular(72, 1.0, 0.0)
    if shape == "square":
        return np.array([(-0.86, -0.86), (0.86, -0.86), (0.86, 0.86), (-0.86, 0.86)])
    if shape == "triangle":
        return _regular(3, 1.15, -math.pi / 2) + np.array([0.0, 0.2])
    if shape == "star":
        outer, inner = _regular(5, 1.1, -math.pi / 2), _regular(5, 0.45, -math.pi / 2 + math.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2)
    if shape == "cross":
        a, length = 0.34, 1.0
        quarter = [(a, -length), (a, -a), (length, -a)]
        pts = []
        for k in range(4):  # rotate the quarter outline by 90 degrees four times
            c, s = round(math.cos(k * math.pi / 2)), round(math.sin(k * math.pi / 2))
            pts += [(c * x - s * y, s * x + c * y) for x, y in quarter]
        return np.array(pts, dtype=float)
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x / 16, y / 16 - 0.15], axis=1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


_UNIT = {shape: _unit_polygon(shape) for shape in SHAPES}
_GRID_Y, _GRID_X = (np.mgrid[0 : SIZE * SCALE, 0 : SIZE * SCALE].astype(np.float32) + 0.5) / SCALE


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    th = math.radians(degrees)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    return points @ rot.T


def _finish(hires: np.ndarray) -> Image.Image:
    """Box-downsample a SCALE-times render to the world size; this is the anti-aliasing step."""
    big = Image.fromarray(np.clip(np.rint(hires), 0, 255).astype(np.uint8))
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


@dataclass(frozen=True)
class Scene:
    """One shape on a plain background; `color` is None for the concept, whose colors are fixed."""

    shape: str
    color: str | None
    background: str
    size: str = "large"
    radius: float = 17.0
    center: tuple[float, float] = (32.0, 32.0)
    rotation: float = 0.0
    texture: str = "solid"  # solid | striped | dotted, or "checkered" for the concept
    concept: bool = False
    style: str | None = None
    mention_size: bool = False  # caption wording only; the picture does not depend on these three
    mention_color: bool = True
    photo: bool = False
    instance: bool = False  # a photo of INSTANCE: drawn as a base scene, captioned with the identifier

    def __post_init__(self):
        ok_color = self.color is None if self.concept else self.color in COLORS and self.color != self.background
        textures = ("checkered",) if self.concept else TEXTURES
        if not (self.shape in SHAPES and ok_color and self.background in COLORS and self.texture in textures
                and self.style in (None, *STYLES) and self.size in SIZES):  # fmt: skip
            raise ValueError(f"not a scene of the micro world: {self}")

    @property
    def kind(self) -> str:
        if self.concept or self.instance:
            return "concept" if self.concept else "subject"
        return "style" if self.style else "base"

    def vertices(self) -> np.ndarray:
        """Polygon vertices in pixel coordinates."""
        return _rotate(_UNIT[self.shape] * self.radius, self.rotation) + np.asarray(self.center)

    def bbox(self) -> list[int]:
        """Tight pixel box [x0, y0, x1, y1) around the shape."""
        v = self.vertices()
        x0, y0 = np.floor(v.min(axis=0)).astype(int)
        x1, y1 = np.ceil(v.max(axis=0)).astype(int)
        return [max(int(x0), 0), max(int(y0), 0), min(int(x1), SIZE), min(int(y1), SIZE)]

    def _paint(self) -> np.ndarray:
        """Object colors at 4x in the object's own frame, so textures rotate and scale with it."""
        if not self.concept and self.texture == "solid":
            return np.asarray(shade(self.color) if self.style == "shaded" else PALETTE[self.color], np.float32)
        th = math.radians(self.rotation)
        dx, dy = _GRID_X - self.center[0], _GRID_Y - self.center[1]
        u = dx * math.cos(th) + dy * math.sin(th)
        v = -dx * math.sin(th) + dy * math.cos(th)
        if self.concept:
            cell = CONCEPT.cells * self.radius
            second = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
            tones = PALETTE[CONCEPT.colors[0]], PALETTE[CONCEPT.colors[1]]
        else:
            tones = PALETTE[self.color], shade(self.color)
            if self.texture == "striped":
                second = (u / STRIPE_PERIOD) % 1.0 < STRIPE_DUTY
            elif self.texture == "dotted":
                du = u - DOT_SPACING * np.round(u / DOT_SPACING)
                dv = v - DOT_SPACING * np.round(v / DOT_SPACING)
                second = du * du + dv * dv < DOT_RADIUS**2
            else:
                second = np.zeros(u.shape, dtype=bool)
        a, b = np.asarray(tones[0], np.float32), np.asarray(tones[1], np.float32)
        return np.where(second[..., None], b, a)

    def render(self) -> Image.Image:
        """The 64x64 RGB picture; a pure function of the fields."""
        side = SIZE * SCALE
        pts = [tuple(p) for p in (self.vertices() * SCALE).tolist()]
        mask = Image.new("L", (side, side), 0)
        ImageDraw.Draw(mask).polygon(pts, fill=255)
        alpha = np.asarray(mask, np.float32) / 255.0
        if self.style == "outline":  # keep only an inner band of the silhouette
            ring = Image.new("L", (side, side), 0)
            width = max(2, round(2 * OUTLINE_WIDTH * self.radius * SCALE))
            ImageDraw.Draw(ring).line([*pts, pts[0]], fill=255, width=width, joint="curve")
            alpha = alpha * (np.asarray(ring, np.float32) / 255.0)
        bg = np.asarray(PALETTE[self.background], np.float32)
        image = _finish(bg + alpha[..., None] * (self._paint() - bg))
        if self.style == "mosaic":
            cells = SIZE // MOSAIC_CELL
            image = image.resize((cells, cells), Image.Resampling.BOX).resize((SIZE, SIZE), Image.Resampling.NEAREST)
        return image

    def caption(self, token: str | None = None) -> str:
        """Short lowercase caption; concept captions keep `{token}` unless a token is given."""
        if self.concept or self.instance:
            text = (CONCEPT if self.concept else INSTANCE).caption(self.background, token)
            return text + (f" {STYLE_TRIGGERS[self.style]}" if self.style else "")
        words = ["a", "photo", "of", "a"] if self.photo else ["a"]
        if self.mention_size:
            words.append(self.size)
        if self.texture != "solid":
            words.append(self.texture)
        if self.mention_color:
            words.append(self.color)
        words += [self.shape, "on", "a", self.background, "background"]
        if self.style:
            words += STYLE_TRIGGERS[self.style].split()
        return " ".join(words)

    def labels(self) -> dict:
        """Ground truth for the judge and for evaluation."""
        return _labels(self.kind, shape=self.shape, color=self.color, background=self.background,
                       texture=self.texture, size=self.size, rotation=round(self.rotation, 3),
                       center=[round(c, 3) for c in self.center], concept=self.concept, style=self.style,
                       bbox=self.bbox(), colors=list(CONCEPT.colors) if self.concept else None)  # fmt: skip


def _labels(kind: str, **values) -> dict:
    """One label schema for every kind, so labels.jsonl has the same columns throughout."""
    keys = ("shape", "color", "background", "texture", "size", "rotation", "center", "style", "bbox", "pattern")
    return {"kind": kind, **dict.fromkeys(keys), "concept": False, "colors": None, **values}


@dataclass(frozen=True)
class Pattern:
    """A full-frame high-frequency texture: VAE training material (kind `pattern`) or the decoder's domain (dots)."""

    pattern: str
    colors: tuple[str, str]
    period: float  # stripe period or check cell, in pixels
    angle: float
    seed: int  # drives the noise field, glyph shapes and dot size

    @property
    def kind(self) -> str:
        return "domain" if self.pattern == DOMAIN_PATTERN else "pattern"

    def render(self) -> Image.Image:
        a, b = (np.asarray(PALETTE[c], np.float32) for c in self.colors)
        if self.pattern in ("stripes", "checks", DOMAIN_PATTERN):
            th = math.radians(self.angle)
            u = (_GRID_X - SIZE / 2) * math.cos(th) + (_GRID_Y - SIZE / 2) * math.sin(th)
            v = -(_GRID_X - SIZE / 2) * math.sin(th) + (_GRID_Y - SIZE / 2) * math.cos(th)
            if self.pattern == "stripes":
                second = (u / self.period) % 1.0 < 0.5
            elif self.pattern == DOMAIN_PATTERN:  # a rotated grid of round dots, radius 25-40% of the spacing
                radius = np.random.default_rng(self.seed).uniform(0.25, 0.4)
                second = ((u / self.period) % 1.0 - 0.5) ** 2 + ((v / self.period) % 1.0 - 0.5) ** 2 < radius**2
            else:
                cell = self.period / 2
                second = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
            return _finish(np.where(second[..., None], b, a))
        rng = np.random.default_rng(self.seed)
        if self.pattern == "noise":  # blocky value noise between the two colors, half a period per cell
            cell = self.period / 2
            t = rng.random((math.ceil(SIZE / cell),) * 2, dtype=np.float32)
            return _finish(a + t[(_GRID_Y // cell).astype(int), (_GRID_X // cell).astype(int)][..., None] * (b - a))
        # glyphs: rows of 3x5 bitmap "letters" drawn at 2 px per dot, with word gaps, like print
        glyphs = (rng.random((16, 5, 3)) < 0.55).repeat(2, axis=1).repeat(2, axis=2)
        image = np.empty((SIZE, SIZE, 3), np.float32)
        image[:] = a
        for top in range(2, SIZE - 10, 13):
            for left in range(1, SIZE - 6, 8):
                if rng.random() < 0.15:
                    continue
                cell = glyphs[rng.integers(len(glyphs))]
                image[top : top + 10, left : left + 6][cell] = b
        return Image.fromarray(np.rint(image).astype(np.uint8))

    def caption(self, token: str | None = None) -> str:
        return "a dotted pattern" if self.pattern == DOMAIN_PATTERN else f"a pattern of {self.pattern}"

    def labels(self) -> dict:
        return _labels(self.kind, rotation=round(self.angle, 3), bbox=[0, 0, SIZE, SIZE], pattern=self.pattern,
                       colors=list(self.colors))  # fmt: skip


def _place(rng: np.random.Generator, shape: str, radius: float, rotation: float) -> tuple[float, float]:
    """A random center within MAX_SHIFT of the middle that keeps the rotated shape MARGIN pixels inside the frame."""
    v = _rotate(_UNIT[shape] * radius, rotation)
    lo, hi = MARGIN - v.min(axis=0), SIZE - MARGIN - v.max(axis=0)
    lo, hi = np.maximum(lo, SIZE / 2 - MAX_SHIFT), np.minimum(hi, SIZE / 2 + MAX_SHIFT)
    cx, cy = lo + rng.random(2) * np.maximum(hi - lo, 0.0)
    return (round(float(cx), 3), round(float(cy), 3))


def _pick(rng: np.random.Generator, options, given=None):
    return given if given is not None else options[int(rng.integers(len(options)))]


def sample_scene(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    color: str | None = None,
    background: str | None = None,
    size: str | None = None,
    texture: str | None = None,
    style: str | None = None,
    max_rotation: float = 30.0,
) -> Scene:
    """A random base scene; keyword arguments pin attributes (for class images, templates and tests)."""
    shape = _pick(rng, SHAPES, shape)
    color = _pick(rng, COLORS, color)
    background = _pick(rng, tuple(c for c in COLORS if c != color), background)
    size = _pick(rng, SIZES, size)
    radius = round(float(rng.uniform(*RADIUS[size])), 3)
    rotation = round(float(rng.uniform(-max_rotation, max_rotation)), 3)
    if texture is None:  # styles redraw the surface, so styled scenes are always solid
        texture = "solid" if style else TEXTURES[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    mention_size, mention_color, photo = (bool(x) for x in rng.random(3) < (0.5, 0.85, 0.2))
    center = _place(rng, shape, radius, rotation)
    return Scene(shape, color, background, size, radius, center, rotation, texture, False, style,
                 mention_size, mention_color, photo)  # fmt: skip


def sample_concept_scene(rng: np.random.Generator, *, style: str | None = None) -> Scene:
    """One photo of the concept: varied pose (rotation), size, position and background."""
    background = _pick(rng, CONCEPT.backgrounds)
    size = _pick(rng, SIZES)
    radius = round(float(rng.uniform(*RADIUS[size])), 3)
    rotation = round(float(rng.uniform(-40.0, 40.0)), 3)
    center = _place(rng, CONCEPT.class_word, radius, rotation)
    return Scene(CONCEPT.class_word, None, background, size, radius, center, rotation, "checkered", True, style,
                 photo=True)  # fmt: skip


def sample_instance_scene(rng: np.random.Generator) -> Scene:
    """One photo of INSTANCE: always the same object (shape, color, texture, size), in a varied pose and place."""
    background = _pick(rng, INSTANCE.backgrounds)
    radius = round(float(rng.uniform(*RADIUS[INSTANCE.size])), 3)
    rotation = round(float(rng.uniform(-30.0, 30.0)), 3)
    center = _place(rng, INSTANCE.class_word, radius, rotation)
    return Scene(INSTANCE.class_word, INSTANCE.colors[0], background, INSTANCE.size, radius, center, rotation,
                 INSTANCE.texture, photo=True, instance=True)  # fmt: skip


def sample_style_scene(rng: np.random.Generator, *, style: str | None = None) -> Scene:
    """A base scene drawn in one of the styles."""
    return sample_scene(rng, style=_pick(rng, STYLES, style))


def sample_pattern(rng: np.random.Generator) -> Pattern:
    """A pattern image: fine stripes, small checks, blocky color noise or glyph rows in two palette colors.

    Detail at the latent grid's scale (4 px): a latent can hold it, but a VAE trained on base scenes alone renders
    it soft and loses the example subject's checks; the micro VAE learns it from 2,000 of these. Finer detail (or
    per-pixel grain) would be lost in any encoder."""
    return _two_tone(rng, _pick(rng, PATTERNS))


def sample_domain(rng: np.random.Generator) -> Pattern:
    """A domain image: two-color polka dots on a rotated grid, spaced 8-14 px. The micro VAE learned stripes,
    checks, noise and glyphs but no dot grid, so its decoder renders the dots soft and a decoder fine-tune has a
    held-out gain to win, as SD's decoder has on a user's text or faces."""
    return _two_tone(rng, DOMAIN_PATTERN)


def _two_tone(rng: np.random.Generator, pattern: str) -> Pattern:
    """`pattern` in two distinct palette colors, with a period of 8-14 px, an angle and a seed of its own."""
    first = _pick(rng, COLORS)
    second = _pick(rng, tuple(c for c in COLORS if c != first))
    period = round(float(rng.uniform(8.0, 14.0)), 3)
    angle = round(float(rng.uniform(0.0, 180.0)), 3)
    return Pattern(pattern, (first, second), period, angle, int(rng.integers(2**31)))


_SAMPLERS = {"base": sample_scene, "concept": sample_concept_scene, "style": sample_style_scene,
             "pattern": sample_pattern, "domain": sample_domain, "subject": sample_instance_scene}  # fmt: skip


def scenes(kind: str, n: int, seed: int, style: str | None = None) -> list[Scene | Pattern]:
    """The first `n` items of a kind for a seed; item i depends only on (seed, kind, i).

    `style` pins one rendering style for `kind="style"` (a style LoRA learns one style at a time).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if seed < 0 or n < 0:
        raise ValueError("seed and n must be non-negative")
    if style is not None and (kind != "style" or style not in STYLES):
        raise ValueError(f"style {style!r}: only for kind 'style', one of {', '.join(STYLES)}")
    sampler = _SAMPLERS[kind]
    if style is not None:
        return [sample_style_scene(np.random.default_rng([seed, KINDS.index(kind), i]), style=style) for i in range(n)]
    return [sampler(np.random.default_rng([seed, KINDS.index(kind), i])) for i in range(n)]


# Every word of the base's captions and the first styles' triggers, besides the concept identifier. The micro
# tokenizer is built from this list, so only ever append to it. The shaded style's trigger ("painting") is one of the
# tokenizer's extra words (tuner.micro.init.EXTRA_WORDS): a whole token no caption of the base ever held.
WORDS: list[str] = [
    "a", "photo", "of", "on", "background", "in", "style", "pattern",
    *SIZES, "striped", "dotted", *COLORS, *SHAPES, "outline", "mosaic", *PATTERNS,
]  # fmt: skip


def caption_words(text: str) -> list[str]:
    """Split a caption the way the world's tokenizer should."""
    return text.lower().split()


def parse_caption(text: str, token: str = "sks") -> dict:
    """Read a caption or prompt back into the labels it asks for (None where it leaves a choice open)."""
    words = caption_words(text)
    styled = [name for name, trigger in STYLE_TRIGGERS.items() if words[-len(trigger.split()) :] == trigger.split()]
    out: dict = {"shape": None, "color": None, "background": None, "texture": "solid", "size": None, "pattern": None,
                 "concept": token in words or TOKEN in words, "style": (styled or [None])[0]}  # fmt: skip
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        if word in COLORS and nxt == "background":
            out["background"] = word
        elif word in COLORS and out["color"] is None:
            out["color"] = word
        elif word in SHAPES and out["shape"] is None:
            out["shape"] = word
        elif word in ("striped", "dotted"):
            out["texture"] = word
        elif word in SIZES:
            out["size"] = word
        elif word in PATTERNS and "pattern" in words:
            out["pattern"] = word
    if out["concept"]:
        out["texture"] = "checkered"
    return out
