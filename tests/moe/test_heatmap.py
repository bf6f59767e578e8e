"""The labelled expert-load heatmap: each cell where its row and column put it, in its value's colour,
row labels and column numbers beside the cells, and a colour bar whose colours rise with the value."""

import numpy as np

from megamoe.moe.heatmap import BAR_LABELS, BAR_WIDTH, TOP, colours, labelled_heatmap

ROWS, COLS = 3, 6


def draw():
    values = (np.arange(ROWS * COLS, dtype=np.float64).reshape(ROWS, COLS) + 1) / (ROWS * COLS + 1) * (2.0 / COLS)
    labels = [f"layer{i:02d}" for i in range(ROWS)]
    return values, labelled_heatmap(values, 2.0 / COLS, labels, "expert load", marks={1.0 / COLS: "mean"})


def test_cells_are_large_and_in_place_with_labels_beside_them():
    values, img = draw()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    height, width, _ = img.shape
    bar_x = width - BAR_LABELS - BAR_WIDTH
    cells = img[:, :bar_x]
    centres, boxes = {}, {}
    for r in range(ROWS):
        for c in range(COLS):
            ys, xs = np.nonzero((cells == colours(values[r, c], 2.0 / COLS).round().astype(np.uint8)).all(-1))
            assert len(ys) >= 20 * 20, (r, c)  # a cell at least 20 pixels square: visible
            centres[r, c] = (ys.mean(), xs.mean())
            boxes[r, c] = (ys.min(), ys.max(), xs.min(), xs.max())
    for r in range(ROWS):  # layers down, experts across
        for c in range(COLS):
            if r + 1 < ROWS:
                assert centres[r, c][0] < centres[r + 1, c][0]
            if c + 1 < COLS:
                assert centres[r, c][1] < centres[r, c + 1][1]
    ink = img.max(-1) < 90  # black text, anti-aliased
    left = boxes[0, 0][2]
    for r in range(ROWS):  # a label left of each row
        top, bottom = boxes[r, 0][0], boxes[r, 0][1]
        assert ink[top : bottom + 1, :left].sum() > 20, r
    grid_bottom = boxes[ROWS - 1, 0][1]
    assert ink[grid_bottom + 1 : grid_bottom + 16, left : boxes[0, COLS - 1][3] + 1].sum() > 20  # column numbers
    assert ink[:TOP, :].sum() > 50  # title and axis names


def test_colour_bar_runs_from_zero_at_the_bottom_to_vmax_at_the_top_with_values():
    _, img = draw()
    height, width, _ = img.shape
    bar_x = width - BAR_LABELS - BAR_WIDTH
    column = img[TOP:, bar_x + BAR_WIDTH // 2].astype(int)
    filled = np.flatnonzero(column.sum(-1) < 3 * 255)  # below it: white
    bar = column[: filled[-1] + 1]
    assert len(bar) >= 120 and (np.diff(filled) == 1).all()
    vmax = 2.0 / COLS
    assert (bar[0] == colours(vmax, vmax).round()).all() and (bar[-1] == colours(0.0, vmax).round()).all()
    brightness = bar.sum(-1)
    assert (np.diff(brightness) <= 0).all() and brightness[0] > brightness[-1] + 300  # brighter = more
    ink = img[TOP : TOP + len(bar), bar_x + BAR_WIDTH + 4 :].max(-1) < 90
    ticked = np.flatnonzero(ink.any(1))
    assert ticked.min() < 12 and ticked.max() > len(bar) - 12  # values at the top (vmax) and bottom (0)
    assert ink[len(bar) // 2 - 10 : len(bar) // 2 + 10].any()  # and at the mean, halfway
