"""A small line chart drawn with PIL (no plotting dependency): learning curves of fine-tuning runs."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # matplotlib's tab10


def line_chart(series: dict[str, list[tuple[float, float]]], out_png: Path, title: str = "", xlabel: str = "",
               ylabel: str = "", size: tuple[int, int] = (640, 400)) -> Path:
    """Draw each named series of (x, y) points as a line with markers; axes span all points."""
    width, height = size
    left, right, top, bottom = 60, 190, 45, 45
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    points = [p for pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points] or [0, 1], [p[1] for p in points] or [0, 1]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0

    def at(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    for i in range(5):  # y grid with labels
        y = y0 + (y1 - y0) * i / 4
        _, py = at(x0, y)
        draw.line([left, py, width - right, py], fill=(225, 225, 225))
        draw.text((5, py - 6), f"{y:.1f}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")  # over the grid
    for x in sorted(set(xs)):
        px, _ = at(x, y0)
        draw.text((px - 6, height - bottom + 5), f"{x:g}", fill="black")
    for k, (name, pts) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        coords = [at(x, y) for x, y in sorted(pts)]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for px, py in coords:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((width - right + 10, top + 15 * k), name, fill=colour)
    draw.text((left, 8), title, fill="black")
    draw.text(((width - right + left) // 2 - 20, height - 20), xlabel, fill="black")
    draw.text((5, top - 18), ylabel, fill="black")
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    im.save(out_png)
    return Path(out_png)
