"""Heatmap images for tensorboard: plain colour blocks, and a readable labelled one for expert loads.

    heatmap(values, vmax)                     uint8 [rows*cell, cols*cell, 3], colour blocks only
    labelled_heatmap(values, vmax, rows, ...) uint8 image with a title, row labels (layers, down),
                                              column labels (experts, across) and a colour bar with values

Colours are viridis-like over [0, vmax] (dark purple = 0, yellow = vmax or more); the RGB sum rises
with the value, so brighter is more. Drawn with Pillow (already installed with tensorboard): a few
rectangles and text lines need no plotting library.
"""

from __future__ import annotations

import math

import numpy as np

_STOPS = np.linspace(0.0, 1.0, 5)
_COLOURS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
MARGIN = 8
"""Pixels around the picture and between its parts."""
BAR_WIDTH = 16
"""Pixels across the colour bar."""
BAR_LABELS = 96
"""Pixels right of the colour bar for its value labels (the bar's right edge is this far from the image's)."""
TOP = 40
"""Pixels above the cells: the title and the column axis's name."""


def colours(values: np.ndarray, vmax: float) -> np.ndarray:
    """float RGB [..., 3] in 0..255 of `values` on the colour scale over [0, vmax] (NaN -> 0)."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64) / max(vmax, 1e-12)), 0.0, 1.0)
    return np.stack([np.interp(x, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)


def heatmap(values: np.ndarray, vmax: float, cell: int = 8) -> np.ndarray:
    """[rows, cols] -> uint8 image [rows*cell, cols*cell, 3], viridis-like colours over [0, vmax]."""
    rgb = colours(values, vmax)
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1).round().astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (FreeType)
    except (TypeError, OSError, ImportError):  # an old Pillow or one without FreeType: the bitmap font
        return ImageFont.load_default()


def _format(value: float) -> str:
    return f"{value:.3g}"


def labelled_heatmap(
    values: np.ndarray,
    vmax: float,
    row_labels: list[str],
    title: str,
    column_axis: str = "expert",
    scale_label: str = "",
    marks: dict[float, str] | None = None,
) -> np.ndarray:
    """[rows, cols] values -> uint8 RGB image [H, W, 3], with row labels left of the cells (one per row,
    top to bottom), column numbers under them (every column, or every k-th when crowded) and the column
    axis's name, a title on top, and a vertical colour bar right of the cells over [0, vmax]: 0 at the
    bottom, vmax at the top, labelled at 0, vmax ('>= vmax') and at each value of `marks` (value -> text,
    e.g. {1/E: 'mean'}). Cells are square, 6 to 40 pixels so the grid is about 480 pixels wide, and at
    least 12 pixels high so the labels fit. The bar spans the cells' rows (at least 120 pixels) and
    sits BAR_LABELS pixels from the right edge, from row TOP down.
    """
    from PIL import Image, ImageDraw

    rows, cols = values.shape
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    cell_w = int(np.clip(480 // max(cols, 1), 6, 40))
    cell_h = max(cell_w, 12)
    font = _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((probe.textlength(t, font=font) for t in row_labels), default=0)
    left = MARGIN + math.ceil(label_w) + MARGIN
    grid_w, grid_h = cols * cell_w, rows * cell_h
    bar_h = max(grid_h, 120)
    width = max(left + grid_w + 2 * MARGIN + BAR_WIDTH + BAR_LABELS, math.ceil(probe.textlength(title, font=font)) + 16)
    height = TOP + max(grid_h + 36, bar_h + MARGIN + 14)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    cells = np.repeat(np.repeat(colours(values, vmax), cell_h, axis=0), cell_w, axis=1).round().astype(np.uint8)
    image.paste(Image.fromarray(cells), (left, TOP))
    draw.text((MARGIN, 6), title, fill=INK, font=font)
    for r, label in enumerate(row_labels):
        draw.text((MARGIN, TOP + r * cell_h + (cell_h - 11) // 2), label, fill=INK, font=font)
    step = max(1, math.ceil(24 / cell_w))  # a number per column, or every k-th when cells are narrow
    for c in range(0, cols, step):
        text = str(c)
        x = left + c * cell_w + (cell_w - probe.textlength(text, font=font)) / 2
        draw.text((x, TOP + grid_h + 3), text, fill=INK, font=font)
    draw.text((left, TOP + grid_h + 18), f"{column_axis} ->", fill=INK, font=font)
    draw.text((left, TOP - 16), f"{column_axis}s across, layers down", fill=INK, font=font)

    bar_x = width - BAR_LABELS - BAR_WIDTH
    levels = np.linspace(vmax, 0.0, bar_h)[:, None].repeat(BAR_WIDTH, axis=1)  # top = vmax
    image.paste(Image.fromarray(colours(levels, vmax).round().astype(np.uint8)), (bar_x, TOP))
    ticks = {0.0: "0", vmax: ">= " + _format(vmax), **{v: f"{_format(v)} {t}" for v, t in (marks or {}).items()}}
    for value, text in ticks.items():
        y = TOP + round((1 - value / max(vmax, 1e-12)) * (bar_h - 1))
        draw.line([(bar_x + BAR_WIDTH, y), (bar_x + BAR_WIDTH + 3, y)], fill=INK)
        draw.text((bar_x + BAR_WIDTH + 5, y - 6), text, fill=INK, font=font)
    if scale_label:
        draw.text((bar_x, TOP + bar_h + 3), scale_label, fill=INK, font=font)
    return np.asarray(image, dtype=np.uint8)
