"""stages.plots: the mean ± sd band over seeds, and charts that are written and show something."""
import math

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from stages.plots import draw_series, heatmap_grid, image_grid, line_chart, panel_chart, seed_band


def assert_drawn(png, size=None):
    """The PNG exists, has the expected size, and is not one flat colour."""
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    if size is not None:
        assert pixels.shape[1::-1] == size
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_seed_band_is_numpys_mean_and_sample_sd_over_the_seeds_evaluated_at_each_x():
    seeds = [[(1, 1.0), (2, 4.0), (3, 8.0)],
             [(1, 3.0), (2, 6.0)],  # not evaluated at epoch 3
             [(2, 5.0), (3, 11.0), (5, 2.0)]]
    x, mean, sd = seed_band(seeds)
    np.testing.assert_array_equal(x, [1, 2, 3, 5])
    expected = {1: [1.0, 3.0], 2: [4.0, 6.0, 5.0], 3: [8.0, 11.0], 5: [2.0]}
    np.testing.assert_allclose(mean, [np.mean(expected[e]) for e in (1, 2, 3, 5)])
    np.testing.assert_allclose(sd[:3], [np.std(expected[e], ddof=1) for e in (1, 2, 3)])
    assert math.isnan(sd[3])  # one seed there: no spread


def test_band_drawn_for_several_seeds_and_not_for_one():
    ax = Figure().add_subplot()
    draw_series(ax, {"one seed": [[(1, 1.0), (2, 2.0)]]})
    assert len(ax.collections) == 0 and len(ax.lines) == 1
    draw_series(ax, {"two seeds": [[(1, 1.0), (2, 2.0)], [(1, 3.0), (2, 2.5)]]})
    assert len(ax.collections) == 1 and len(ax.lines) == 2
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(2.0 - np.std([1.0, 3.0], ddof=1))
    assert band[:, 1].max() == pytest.approx(2.0 + np.std([1.0, 3.0], ddof=1))


def test_every_series_gets_its_own_colour_beyond_ten():
    # the real-data table has 13 rows: with the ten-colour cycle two rows were drawn in the same colour
    ax = Figure().add_subplot()
    draw_series(ax, {f"row{k}": [[(1, float(k)), (2, k + 1.0)]] for k in range(13)})
    colours = {matplotlib.colors.to_hex(line.get_color()) for line in ax.lines}
    assert len(colours) == 13


def test_line_chart_and_panel_chart_write_pngs_that_show_something(tmp_path):
    line_chart({"a": [[(1, 1.0), (2, 3.0)], [(1, 2.0), (2, 4.0)]], "b": [[(1, 0.5), (2, 0.7)]]},
               tmp_path / "sub" / "curves.png", title="t", xlabel="epoch", ylabel="AP")
    assert_drawn(tmp_path / "sub" / "curves.png", (800, 480))
    panels = {"loss": {"r1": [(1, 3.0), (2, 2.0)], "r2": [(1, 4.0), (2, 1.0)]}, "kernel": {"r2": [(1, 1.0), (2, 0.5)]}}
    panel_chart(panels, tmp_path / "losses.png", xlabel="step")
    assert_drawn(tmp_path / "losses.png")


def test_heatmap_grid_has_a_block_of_panels_per_name_and_wraps():
    maps = {"a": np.random.default_rng(0).random((5, 8, 8)), "b": np.zeros((3, 8, 8))}
    fig = heatmap_grid(maps, columns=4)  # a: 2 rows of 4 panels (5 used), b: 1 row (3 used)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 8 and len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 1
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel() and ax.get_label() != "<colorbar>"] == ["a", "b"]
    assert images[0].images[0].get_clim() == (0.0, maps["a"].max())  # one colour scale for every map


def test_image_grid_lays_out_rows_and_titled_columns():
    photo = np.zeros((30, 40, 3), np.uint8)
    fig = image_grid([[photo, photo, None], [photo, photo, photo]], ["x.jpg", "y.jpg"], ["gt", "a", "b"])
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes[:3]] == ["gt", "a", "b"]
    assert [fig.axes[0].get_ylabel(), fig.axes[3].get_ylabel()] == ["x.jpg", "y.jpg"]
    assert [len(ax.images) for ax in fig.axes] == [1, 1, 0, 1, 1, 1]
