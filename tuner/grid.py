"""Lay out images as one labeled grid PNG: row labels on the left, column labels on top, an optional title.

The layout depends only on the cell size and the row/column counts, never on the label text (long labels
wrap and then truncate), so `grid_size` gives the exact pixel size of any grid before it is drawn.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128
"""Cells smaller than this are upscaled (NEAREST, an integer factor) so that labels fit and pixels stay crisp."""

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
TITLE = (0, 0, 0)
GAP = 2
"""Pixels between neighbouring cells."""
GROUP_GAP = 10
"""Pixels between column groups (e.g. the base and the tuned columns)."""
COL_LABEL_LINES = 2


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid; every number follows from the cell size, so sizes are known in advance."""

    rows: int
    cols: int
    cell_w: int
    cell_h: int
    title: bool
    groups: int = 1

    @property
    def font_size(self) -> int:
        return min(28, max(13, self.cell_w // 10))

    @property
    def line_h(self) -> int:
        return round(self.font_size * 1.3)

    @property
    def pad(self) -> int:
        return max(4, self.font_size // 3)

    @property
    def left(self) -> int:
        """Width of the row-label column (long prompts wrap inside it)."""
        return self.font_size * 14

    @property
    def title_h(self) -> int:
        return round((self.font_size + 4) * 1.3) + 2 * self.pad if self.title else 0

    @property
    def header_h(self) -> int:
        return COL_LABEL_LINES * self.line_h + 2 * self.pad

    @property
    def top(self) -> int:
        return self.title_h + self.header_h

    @property
    def group_cols(self) -> int:
        return self.cols // self.groups

    @property
    def size(self) -> tuple[int, int]:
        gaps = (self.cols - 1) * GAP + (self.groups - 1) * (GROUP_GAP - GAP)
        width = self.left + self.cols * self.cell_w + gaps + self.pad
        height = self.top + self.rows * self.cell_h + (self.rows - 1) * GAP + self.pad
        return width, height

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        group_shift = (col // self.group_cols) * (GROUP_GAP - GAP)
        return self.left + col * (self.cell_w + GAP) + group_shift, self.top + row * (self.cell_h + GAP)


def cell_size(image_size: tuple[int, int], min_cell: int = MIN_CELL) -> tuple[int, int]:
    """The drawn size of an image: scaled up by the smallest integer factor that reaches `min_cell`."""
    w, h = image_size
    factor = max(1, math.ceil(min_cell / max(1, min(w, h))))
    return w * factor, h * factor


def grid_layout(rows: int, cols: int, cell: int | tuple[int, int], title: bool = False, groups: int = 1) -> GridLayout:
    """Geometry of a rows x cols grid of already-scaled cells (`cell` = side, or (width, height)).

    `groups` splits the columns into that many equal groups with a wider gap between them.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"a grid needs at least one row and one column, got rows={rows}, cols={cols}")
    if groups < 1 or cols % groups:
        raise ValueError(f"groups={groups}: must be a positive divisor of the {cols} columns")
    cell_w, cell_h = (cell, cell) if isinstance(cell, int) else cell
    return GridLayout(rows, cols, cell_w, cell_h, bool(title), groups)


def grid_size(
    rows: int, cols: int, cell: int | tuple[int, int], title: bool = False, groups: int = 1
) -> tuple[int, int]:
    """Exact (width, height) in pixels of a grid whose cells are `cell` pixels after upscaling."""
    return grid_layout(rows, cols, cell, title, groups).size


def make_grid(
    images: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str | None = None,
    min_cell: int = MIN_CELL,
    groups: int = 1,
) -> Image.Image:
    """One RGB image: `images[row][col]` in cells, `row_labels` on the left, `col_labels` on top.

    Every cell takes the size of the first image (others are resized to it); small images are upscaled
    with NEAREST to at least `min_cell` pixels. A "\\n" in a label starts a new line. `groups` > 1 splits
    the columns into equal groups set apart by a wider gap.
    """
    rows = len(images)
    cols = len(images[0]) if rows else 0
    if rows == 0 or cols == 0:
        raise ValueError("make_grid: no images to lay out")
    if any(len(row) != cols for row in images):
        raise ValueError(f"make_grid: rows have different lengths {[len(r) for r in images]}; every row needs {cols}")
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(
            f"make_grid: {rows} rows x {cols} columns of images but {len(row_labels)} row labels "
            f"and {len(col_labels)} column labels"
        )
    layout = grid_layout(rows, cols, cell_size(images[0][0].size, min_cell), title=bool(title), groups=groups)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.font_size)
    cell = (layout.cell_w, layout.cell_h)

    for r, row in enumerate(images):
        for c, image in enumerate(row):
            resample = Image.Resampling.NEAREST if _is_upscale(image.size, cell) else Image.Resampling.LANCZOS
            tile = image.convert("RGB")
            if tile.size != cell:
                tile = tile.resize(cell, resample)
            canvas.paste(tile, layout.cell_origin(r, c))

    max_row_lines = max(1, (layout.cell_h - layout.pad) // layout.line_h)
    for r, label in enumerate(row_labels):
        _, y = layout.cell_origin(r, 0)
        lines = wrap(label, font, layout.left - 2 * layout.pad, max_row_lines)
        _draw_lines(draw, lines, font, layout.pad, y + layout.pad // 2, layout.line_h)

    header_y = layout.title_h + layout.pad
    for c, label in enumerate(col_labels):
        x, _ = layout.cell_origin(0, c)
        lines = wrap(label, font, layout.cell_w - 4, COL_LABEL_LINES)
        # Bottom-align the header so one-line labels sit right above their column.
        y = header_y + (COL_LABEL_LINES - len(lines)) * layout.line_h
        _draw_lines(draw, lines, font, x + 2, y, layout.line_h)

    if title:
        title_font = _font(layout.font_size + 4)
        (line,) = wrap(title, title_font, layout.size[0] - 2 * layout.pad, 1)
        draw.text((layout.pad, layout.pad), line, font=title_font, fill=TITLE)
        draw.line([(0, layout.title_h - 1), (layout.size[0], layout.title_h - 1)], fill=(200, 200, 200))
    return canvas


def wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; over-long words break by character; extra lines end in "..."."""
    text = _renderable(text, font)
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if font.getlength(candidate) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            current = ""
            for ch in word:  # a word wider than the box: break it where it stops fitting
                if current and font.getlength(current + ch) > width:
                    lines.append(current)
                    current = ""
                current += ch
        lines.append(current)
    if len(lines) <= max_lines:
        return lines
    kept = lines[:max_lines]
    last = kept[-1]
    while last and font.getlength(last + "...") > width:
        last = last[:-1]
    kept[-1] = last.rstrip() + "..."
    return kept


@cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _renderable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """Text the font can draw: control characters become spaces, and letters the font lacks fall back to
    their unaccented form ("café" -> "cafe"; Pillow's bundled font covers little beyond ASCII). Letters
    with no such form stay as they are and draw as boxes. The bitmap font (Pillow without FreeType) is latin-1.
    """
    text = "".join(ch if ch.isprintable() or ch == "\n" else " " for ch in text.replace("\t", " "))
    if not isinstance(font, ImageFont.FreeTypeFont):
        return text.encode("latin-1", "replace").decode("latin-1")
    size = int(font.size)
    return "".join(ch if ch == "\n" or _has_glyph(size, ch) else _plain_form(size, ch) for ch in text)


@cache
def _has_glyph(size: int, ch: str) -> bool:
    font = _font(size)
    if not isinstance(font, ImageFont.FreeTypeFont) or ch.isspace():
        return True
    missing = font.getmask("\uffff")
    mask = font.getmask(ch)
    return not (mask.size == missing.size and bytes(mask) == bytes(missing))


def _plain_form(size: int, ch: str) -> str:
    plain = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    return plain if plain and plain != ch and all(_has_glyph(size, c) for c in plain) else ch


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], font, x: int, y: int, line_h: int) -> None:
    for i, line in enumerate(lines):
        draw.text((x, y + i * line_h), line, font=font, fill=TEXT)


def _is_upscale(size: tuple[int, int], cell: tuple[int, int]) -> bool:
    return cell[0] >= size[0] and cell[1] >= size[1]
