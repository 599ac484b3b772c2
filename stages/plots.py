"""Line charts with matplotlib: learning curves as the mean over seeds with a ±1 sd band (`sp finetune`'s
curve.png, `sp table`'s OUT_curves.png) and one panel per loss term (`sp plot-losses`).

Figures are drawn on matplotlib's non-interactive Agg canvas directly (no pyplot): no display is needed and
no global figure state is kept between calls.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

Points = list[tuple[float, float]]  # (x, y) of one run, e.g. (epoch, mask AP)


def seed_band(seeds: list[Points]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, sd) over the x values of any seed: at each x the mean and sample sd (ddof 1) of the seeds that
    have a point there (a seed without an evaluation at that x does not count); sd is NaN where fewer than two
    seeds have one."""
    xs = sorted({x for points in seeds for x, _ in points})
    at = [{x: y for x, y in points} for points in seeds]
    values = [[a[x] for a in at if x in a] for x in xs]
    mean = np.array([np.mean(v) for v in values], dtype=np.float64)
    sd = np.array([np.std(v, ddof=1) if len(v) > 1 else math.nan for v in values], dtype=np.float64)
    return np.array(xs, dtype=np.float64), mean, sd


def series_colours(names: list[str]) -> dict[str, str | tuple[float, ...]]:
    """name → a colour of its own: matplotlib's ten-colour cycle, or tab20 when more lines than ten share a
    chart (the ten-colour cycle would repeat and two rows would look like one)."""
    if len(names) <= 10:
        return {name: f"C{k}" for k, name in enumerate(names)}
    return {name: matplotlib.colormaps["tab20"](k % 20) for k, name in enumerate(names)}


def draw_series(ax, series: dict[str, list[Points]], colours: dict[str, str | tuple[float, ...]] | None = None,
                markers: bool = True) -> None:
    """Each named series (its seeds' points) as the mean line and, where two or more seeds have a point, a
    shaded mean ± sd band; colours: name → matplotlib colour (default: `series_colours` in series order)."""
    colours = colours or series_colours(list(series))
    for name, seeds in series.items():
        x, mean, sd = seed_band(seeds)
        colour = colours[name]
        label = name if len(seeds) == 1 else f"{name} (n={len(seeds)})"
        ax.plot(x, mean, color=colour, label=label, marker="o" if markers else None, markersize=3, linewidth=1.5)
        if np.isfinite(sd).any():
            ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.2, linewidth=0)


def save(fig: Figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png)
    return out_png


def line_chart(series: dict[str, list[Points]], out_png: Path, title: str = "", xlabel: str = "", ylabel: str = "",
               size: tuple[float, float] = (8.0, 4.8)) -> Path:
    """One chart of named series, each given as one list of (x, y) per seed: mean line ± sample-sd band (no
    band for a single seed), legend outside on the right. size in inches at 100 dpi."""
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    ax = fig.add_subplot()
    draw_series(ax, series)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    fig.suptitle(title)  # over the whole figure: an axes title is cut off when the legend beside it is wide
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return save(fig, out_png)


def panel_chart(panels: dict[str, dict[str, Points]], out_png: Path, xlabel: str = "", columns: int = 4,
                panel_size: tuple[float, float] = (3.6, 2.6)) -> Path:
    """One small chart per panel title, each with one line per run name (a run keeps its colour in every
    panel; a run missing from a panel is simply not drawn there), one shared legend."""
    runs = list(dict.fromkeys(name for lines in panels.values() for name in lines))
    colours = series_colours(runs)
    columns = max(1, min(columns, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, lines) in zip(axes, panels.items()):
        draw_series(ax, {name: [points] for name, points in lines.items()}, colours, markers=False)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel(xlabel, fontsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.remove()
    handles = [Line2D([], [], color=colours[name]) for name in runs]
    fig.legend(handles, runs, loc="outside lower center", ncols=min(len(runs), 4), frameon=False)
    return save(fig, out_png)


def heatmap_grid(maps: dict[str, np.ndarray], columns: int = 0, panel_inches: float = 0.8) -> Figure:
    """Small heatmaps, one block of rows per name: maps[name] (N, S, S) gives N panels, `columns` per row (0:
    all N in one row), titled by index, the block labelled with the name; one colour scale from 0 to the
    largest value of all maps, with its colour bar."""
    longest = max(len(m) for m in maps.values())
    columns = columns or longest
    blocks = {name: math.ceil(len(m) / columns) for name, m in maps.items()}
    fig = Figure(figsize=(panel_inches * columns + 1.5, panel_inches * 1.25 * sum(blocks.values()) + 0.3), dpi=100,
                 layout="constrained")
    axes = fig.subplots(sum(blocks.values()), columns, squeeze=False)
    top = max(float(m.max()) for m in maps.values()) or 1.0
    row = 0
    for name, stack in maps.items():
        for k, ax in enumerate(axes[row:row + blocks[name]].ravel()):
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(stack):
                ax.set_axis_off()
                continue
            image = ax.imshow(stack[k], cmap="viridis", vmin=0.0, vmax=top)
            ax.set_title(str(k), fontsize=6, pad=2)
        axes[row, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
        row += blocks[name]
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="mean mask probability")
    return fig


def image_grid(images: list[list], row_titles: list[str], column_titles: list[str], max_inches: float = 6.4) -> Figure:
    """images[r][c] (PIL images or (H, W, 3) arrays; None leaves a panel empty) in a rows x columns grid of
    axes without ticks; each column titled on the top row, each row labelled on the left. A panel is as
    wide as the widest image at 100 dpi (at most max_inches); a row as tall as its tallest image asks."""
    images = [[None if im is None else np.asarray(im) for im in line] for line in images]
    shown = [a for line in images for a in line if a is not None]
    width = min(max_inches, max((a.shape[1] for a in shown), default=100) / 100)
    heights = [width * max((a.shape[0] / a.shape[1] for a in line if a is not None), default=0.2) for line in images]
    fig = Figure(figsize=(width * len(column_titles) + 0.6, sum(heights) + 0.3 * len(images) + 0.3), dpi=100,
                 layout="constrained")
    axes = fig.subplots(len(images), len(column_titles), squeeze=False, gridspec_kw={"height_ratios": heights})
    for r, line in enumerate(images):
        for c, im in enumerate(line):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if im is not None:
                ax.imshow(im)
            if r == 0:
                ax.set_title(column_titles[c], fontsize="x-large")
        axes[r, 0].set_ylabel(row_titles[r], fontsize="large")
    return fig
