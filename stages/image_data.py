"""Image folders for the stages: listing, decoding in DataLoader workers, and padded batches.

An image is resized keeping its aspect ratio (short side `image_size`, long side at most `max_size`),
ImageNet-normalised, and padded with zeros (the mean colour) to a multiple of 32 shared by its batch;
every batch carries each image's valid region so that padding can be masked out downstream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from models.backbone import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
STRIDE = 32


def list_images(root: Path) -> list[str]:
    """Sorted paths (relative to root, '/'-separated) of the image files under root, recursively."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder of images")
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not names:
        raise ValueError(f"{root} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return names


def read_image_list(list_file: Path, root: Path) -> list[str]:
    """Sorted, de-duplicated image paths (relative to root) from a text file, one per line, '#' comments;
    a listed file that does not exist under root is an error naming the first few."""
    lines = (line.split("#", 1)[0].strip() for line in Path(list_file).read_text().splitlines())
    names = sorted({line for line in lines if line})
    if not names:
        raise ValueError(f"{list_file} lists no images")
    missing = [n for n in names if not (Path(root) / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{list_file}: {len(missing)} listed images are not under {root}, e.g. "
                                f"{', '.join(missing[:3])}")
    return names


def resized_size(height: int, width: int, image_size: int, max_size: int) -> tuple[int, int]:
    scale = min(image_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def load_image(path: Path, expected_hw: tuple[int, int] | None = None) -> Image.Image:
    """Decode fully (truncated files fail here, not later) to RGB; the one loader of unlabeled and labeled images.

    Grayscale, palette, CMYK and alpha images become RGB (alpha is dropped); 16-bit grayscale is scaled to
    8 bits (65535 → 255), which Pillow's own conversion would clip instead. EXIF orientation is ignored: COCO
    annotations refer to the stored pixels. With expected_hw, a file of another size (the labels would not
    fit it) is a ValueError naming it."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit PNG/TIFF grayscale
            im = Image.fromarray((np.clip(np.asarray(im, np.float64), 0, 65535) / 257).round().astype(np.uint8))
        im = im.convert("RGB")
    if expected_hw is not None and im.size != (expected_hw[1], expected_hw[0]):
        raise ValueError(f"{path} is {im.size[1]}x{im.size[0]}, its labels say {expected_hw[0]}x{expected_hw[1]}")
    return im


MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def network_input(im: Image.Image, image_size: int, max_size: int) -> torch.Tensor:
    """Resize keeping the aspect ratio and ImageNet-normalise: (3, Hr, Wr) float."""
    rh, rw = resized_size(im.height, im.width, image_size, max_size)
    im = im.resize((rw, rh), Image.BILINEAR) if (rh, rw) != (im.height, im.width) else im
    pixels = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0
    return (pixels - MEAN) / STD


def resize_masks(masks: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Binary masks (each (H, W)) → (L, h, w) bool by nearest-neighbour resizing; L = 0 is fine."""
    if not masks:
        return torch.zeros(0, *size, dtype=torch.bool)
    stacked = torch.from_numpy(np.stack(masks))[None].float()
    return F.interpolate(stacked, size=size, mode="nearest")[0] > 0.5


class ImageFolder(Dataset):
    """Item k: dict(index, file_name, image (3, Hr, Wr) float or None, image_hw, reason, segments).

    segment: CPU work that depends on the image alone, run here (in the DataLoader workers) rather than between
    device steps: a function of the network input (e.g. `models.mask_refinement.superpixels`) whose result is
    the item's `segments` (None without it)."""

    def __init__(self, root: Path, file_names: list[str], image_size: int, max_size: int, first_index: int = 0,
                 segment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.root, self.file_names = Path(root), list(file_names)
        self.image_size, self.max_size, self.first_index = image_size, max_size, first_index
        self.segment = segment

    def __len__(self):
        return len(self.file_names)

    def __getitem__(self, k: int) -> dict:
        name = self.file_names[k]
        item = {"index": self.first_index + k, "file_name": name, "image": None, "image_hw": (0, 0), "reason": "",
                "segments": None}
        try:
            im = load_image(self.root / name)
        except Exception as e:  # noqa: BLE001 - any decoder failure means: skip this image, say why
            item["reason"] = f"{type(e).__name__}: {e}"
            return item
        image = network_input(im, self.image_size, self.max_size)
        segments = None if self.segment is None else self.segment(image)
        item.update(image=image, image_hw=(im.height, im.width), segments=segments)
        return item


@dataclass
class Batch:
    """Loaded images of one batch (padded) and the ones that failed.

    images: (B, 3, Hp, Wp) or None; index, file_name, image_hw (original), resized_hw, grid_hw (valid C5
    cells) per loaded image; failed: (index, file_name, reason) per image that could not be read; segments:
    per loaded image its `ImageFolder.segment` result (unpadded), or None.
    """

    images: torch.Tensor | None
    index: list[int]
    file_name: list[str]
    image_hw: list[tuple[int, int]]
    resized_hw: list[tuple[int, int]]
    grid_hw: list[tuple[int, int]]
    failed: list[tuple[int, str, str]]
    segments: list[torch.Tensor] | None = None

    def to(self, device) -> Batch:
        """The batch with its images and segments on `device`."""
        return replace(self, images=self.images.to(device, non_blocking=True),
                       segments=None if self.segments is None else [s.to(device, non_blocking=True)
                                                                for s in self.segments])

    def grid_valid(self, grid_shape) -> torch.Tensor:
        """(B, h, w) bool: the C5 cells that cover each image."""
        valid = torch.zeros(len(self.index), *grid_shape, dtype=torch.bool)
        for b, (gh, gw) in enumerate(self.grid_hw):
            valid[b, :gh, :gw] = True
        return valid


def collate(items: list[dict]) -> Batch:
    ok = [it for it in items if it["image"] is not None]
    failed = [(it["index"], it["file_name"], it["reason"]) for it in items if it["image"] is None]
    resized = [tuple(it["image"].shape[1:]) for it in ok]
    images = None
    if ok:
        hp = math.ceil(max(h for h, _ in resized) / STRIDE) * STRIDE
        wp = math.ceil(max(w for _, w in resized) / STRIDE) * STRIDE
        images = torch.zeros(len(ok), 3, hp, wp)
        for b, it in enumerate(ok):
            images[b, :, : resized[b][0], : resized[b][1]] = it["image"]
    return Batch(images=images, index=[it["index"] for it in ok], file_name=[it["file_name"] for it in ok],
                 image_hw=[it["image_hw"] for it in ok], resized_hw=resized,
                 grid_hw=[(math.ceil(h / STRIDE), math.ceil(w / STRIDE)) for h, w in resized], failed=failed,
                 segments=[it["segments"] for it in ok] if ok and ok[0]["segments"] is not None else None)


def batch_loader(dataset: ImageFolder, batch_size: int, workers: int) -> DataLoader:
    """In-order batches (the store commits in plan order), decoded in `workers` processes."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)
