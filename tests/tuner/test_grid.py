"""Labeled grids: exact sizes, labels actually drawn, cells in place, any text survives."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFont

from tuner.grid import BACKGROUND, GROUP_GAP, MIN_CELL, cell_size, grid_layout, grid_size, make_grid, wrap


def _tiles(rows: int, cols: int, size: tuple[int, int] = (64, 64)) -> list[list[Image.Image]]:
    """Flat colors, distinct per cell and never white, so each cell is recognizable in the grid."""
    return [[Image.new("RGB", size, (40 * r + 10, 30 * c + 10, 90)) for c in range(cols)] for r in range(rows)]


def _png_roundtrip(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    reopened = Image.open(buf)
    reopened.load()
    return reopened


def _not_blank(region: np.ndarray) -> bool:
    return bool((region != np.array(BACKGROUND, dtype=np.uint8)).any())


@pytest.mark.parametrize(
    ("rows", "cols", "size", "title"),
    [(1, 1, (64, 64), None), (2, 3, (64, 64), "lora · step 10"), (3, 2, (64, 96), "t"), (1, 4, (256, 256), None)],
)
def test_grid_size_is_exactly_computable(rows, cols, size, title):
    grid = _png_roundtrip(make_grid(_tiles(rows, cols, size), [f"p{r}" for r in range(rows)], ["c"] * cols, title))
    cell = cell_size(size)
    assert grid.format == "PNG" and grid.mode == "RGB"
    assert grid.size == grid_size(rows, cols, cell, title=bool(title))
    # The formula itself, spelled out: label margin + cells + gaps (+ right/bottom padding).
    layout = grid_layout(rows, cols, cell, title=bool(title))
    assert grid.width == layout.left + cols * cell[0] + (cols - 1) * 2 + layout.pad
    assert grid.height == layout.title_h + layout.header_h + rows * cell[1] + (rows - 1) * 2 + layout.pad


def test_column_groups_are_set_apart_and_sized_exactly():
    tiles = _tiles(2, 4)
    grid = np.asarray(make_grid(tiles, ["a", "b"], ["base", "base", "tuned", "tuned"], groups=2))
    layout = grid_layout(2, 4, (128, 128), groups=2)
    plain = grid_layout(2, 4, (128, 128))
    assert grid.shape[:2] == grid_size(2, 4, (128, 128), groups=2)[::-1]
    assert layout.size[0] == plain.size[0] + GROUP_GAP - 2
    for c in range(4):
        x, y = layout.cell_origin(1, c)
        assert (grid[y : y + 128, x : x + 128] == np.array(tiles[1][c].getpixel((0, 0)), dtype=np.uint8)).all()
    with pytest.raises(ValueError, match="divisor"):
        grid_layout(1, 3, 128, groups=2)


def test_small_images_are_upscaled_by_an_integer_factor_and_large_ones_kept():
    assert cell_size((64, 64)) == (128, 128)
    assert cell_size((48, 80)) == (144, 240)
    assert cell_size((512, 512)) == (512, 512)
    assert min(cell_size((8, 8))) >= MIN_CELL


def test_cells_hold_their_images_in_order():
    tiles = _tiles(2, 3)
    grid = np.asarray(make_grid(tiles, ["a", "b"], ["x", "y", "z"], "title"))
    layout = grid_layout(2, 3, cell_size((64, 64)), title=True)
    for r in range(2):
        for c in range(3):
            x, y = layout.cell_origin(r, c)
            block = grid[y : y + layout.cell_h, x : x + layout.cell_w]
            assert (block == np.array(tiles[r][c].getpixel((0, 0)), dtype=np.uint8)).all()


def test_nearest_upscale_keeps_pixels_crisp():
    tile = Image.new("RGB", (64, 64), (0, 0, 0))
    tile.putpixel((0, 0), (255, 0, 0))
    grid = np.asarray(make_grid([[tile]], ["r"], ["c"]))
    x, y = grid_layout(1, 1, (128, 128)).cell_origin(0, 0)
    assert (grid[y : y + 2, x : x + 2] == [255, 0, 0]).all()
    assert (grid[y + 2, x + 2] == [0, 0, 0]).all()


def test_labels_are_drawn_in_their_areas():
    grid = np.asarray(make_grid(_tiles(2, 2), ["a red circle", "a blue square"], ["base", "tuned"], "lora step 5"))
    layout = grid_layout(2, 2, (128, 128), title=True)
    row_area = grid[layout.top :, : layout.left]
    header = grid[layout.title_h : layout.top, layout.left :]
    title = grid[: layout.title_h]
    assert _not_blank(row_area) and _not_blank(header) and _not_blank(title)
    # Each row label sits beside its own row.
    for r in range(2):
        _, y = layout.cell_origin(r, 0)
        assert _not_blank(grid[y : y + layout.cell_h, : layout.left])
    # Without a title there is no title band.
    untitled = grid_layout(2, 2, (128, 128))
    assert untitled.title_h == 0 and untitled.size[1] == layout.size[1] - layout.title_h


@pytest.mark.parametrize(
    "label",
    [
        "日本語のプロンプト",
        "a photo of 🐶 in the 🌲",
        "مرحبا بالعالم",
        "tab\there\x00nul\x1bescape",
        "",
        "   ",
        "line one\nline two\r\nline three",
        "x" * 500,
        "Zalgo: Z̷̢͎a̴l̶g̵o̸",
    ],
)
def test_any_text_renders_without_error(label):
    grid = make_grid(_tiles(1, 2), [label], [label, "seed 0"], title=label)
    assert grid.size == grid_size(1, 2, (128, 128), title=bool(label))


def test_accented_letters_the_font_lacks_draw_as_their_plain_form():
    tiles = _tiles(1, 1)
    accented = np.asarray(make_grid(tiles, ["café Pokémon"], ["naïve"], title="crème"))
    plain = np.asarray(make_grid(tiles, ["cafe Pokemon"], ["naive"], title="creme"))
    assert np.array_equal(accented, plain)


def test_long_labels_wrap_then_truncate_inside_their_box():
    font = ImageFont.load_default(size=13)
    text = "a very long prompt " * 40
    lines = wrap(text, font, 150, max_lines=4)
    assert len(lines) == 4
    assert lines[-1].endswith("...")
    assert all(font.getlength(line) <= 150 for line in lines)
    # A single word wider than the box is broken rather than overflowing.
    assert all(font.getlength(line) <= 60 for line in wrap("supercalifragilistic" * 3, font, 60, max_lines=10))
    assert wrap("short", font, 150, max_lines=2) == ["short"]


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="row labels"):
        make_grid(_tiles(2, 2), ["only one"], ["a", "b"])
    with pytest.raises(ValueError, match="different lengths"):
        make_grid([_tiles(1, 2)[0], _tiles(1, 1)[0]], ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="no images"):
        make_grid([], [], [])
