"""`sp viz`: draw the pseudo masks of a store over their images, for a quick look at their quality."""
from __future__ import annotations

import colorsys
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stages.image_data import load_image
from store import rle
from store.pseudo_label_store import DONE, PseudoLabelStore

log = logging.getLogger(__name__)
ALPHA = 0.45  # overlay opacity: the image stays readable under a few overlapping masks
BACKGROUND = (32, 32, 32)


def mask_colour(k: int) -> tuple[int, int, int]:
    """A bright colour per mask rank; golden-ratio hue steps keep neighbouring ranks far apart."""
    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def pick_images(store: PseudoLabelStore, n: int, seed: int | None) -> list[int]:
    """n done image indices: the first n when seed is None, else a sample drawn with that seed (sorted)."""
    done = np.flatnonzero(store.image_array("status") == DONE)
    if seed is None or len(done) <= n:
        return [int(i) for i in done[:n]]
    return sorted(int(i) for i in np.random.default_rng(seed).choice(done, n, replace=False))


def overlay(image: Image.Image, masks: list[np.ndarray], boxes: np.ndarray, scores: np.ndarray | None,
            names: list[str] | None = None, font_size: int | None = None) -> Image.Image:
    """image (W x H, RGB) with each mask (H, W) blended in its colour, its box (xyxy, x2/y2 exclusive)
    outlined and its name and score (each when given) written at the box's top-left corner, in PIL's default
    font (at font_size pixels when given). Returns a new image."""
    pixels = np.asarray(image, dtype=np.float32).copy()
    for k, mask in enumerate(masks):
        inside = mask.astype(bool)
        pixels[inside] = (1 - ALPHA) * pixels[inside] + ALPHA * np.array(mask_colour(k), np.float32)
    out = Image.fromarray(np.round(pixels).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(font_size) if font_size else None
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        if x2 <= x1 or y2 <= y1:
            continue  # empty mask: no box to draw
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=mask_colour(k))
        caption = [names[k]] if names is not None else []
        caption += [f"{scores[k]:.2f}"] if scores is not None else []
        draw.text((x1 + 2, y1 + 1), " ".join(caption), fill=mask_colour(k), font=font)
    return out


def draw_overlays(store: PseudoLabelStore, images_dir: Path, out_dir: Path, n: int = 16,
                  seed: int | None = 0) -> list[Path]:
    """Write one overlay PNG (original size) per picked image (see `pick_images`) into out_dir, named
    IIIIII_<stem>.png after the store index. Returns the paths written, in index order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, offset = store.file_names, store.mask_offset
    boxes, scores = store.mask_array("box"), store.mask_array("score")
    paths = []
    for i in pick_images(store, n, seed):
        height, width = int(store.image_array("height")[i]), int(store.image_array("width")[i])
        image = load_image(Path(images_dir) / names[i])
        if image.size != (width, height):
            log.warning("%s is %dx%d, the store says %dx%d: not the image the masks were made from; skipped",
                        names[i], *image.size, width, height)
            continue
        masks = [rle.decode(c, height, width) for c in store.rle(i)]
        a, b = offset[i], offset[i + 1]
        path = out_dir / f"{i:06d}_{Path(names[i]).stem}.png"
        overlay(image, masks, boxes[a:b], scores[a:b]).save(path)
        paths.append(path)
    log.info("wrote %d overlays to %s", len(paths), out_dir)
    return paths


def contact_sheet(paths: list[Path], out_png: Path, columns: int = 4, thumb: int = 256) -> Path:
    """Tile the images at paths into one grid PNG: each shrunk (aspect kept) to fit a thumb x thumb cell,
    `columns` cells per row, row-major in the given order. Returns out_png."""
    if not paths:
        raise ValueError("no images to tile into a contact sheet (the store has no done images?)")
    rows = math.ceil(len(paths) / columns)
    sheet = Image.new("RGB", (min(columns, len(paths)) * thumb, rows * thumb), BACKGROUND)
    for k, path in enumerate(paths):
        with Image.open(path) as im:
            tile = im.convert("RGB")
        tile.thumbnail((thumb, thumb))
        row, col = divmod(k, columns)
        # Centre the tile in its cell.
        sheet.paste(tile, (col * thumb + (thumb - tile.width) // 2, row * thumb + (thumb - tile.height) // 2))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
