"""Pre-training data: images with their pseudo masks, boxes and seed features, read from the store.

Per-image metadata lives in numpy arrays (fixed-width bytes for names), never in Python lists of objects, so
DataLoader workers share it copy-on-write and memory stays flat with the store's size. The zarr store is
opened lazily in each worker. Randomness (the flip) is a function of (seed, epoch, image), so a resumed run
sees exactly the samples an uninterrupted one would have.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from stages.image_data import STRIDE, load_image, network_input, resize_masks
from store import rle
from store.pseudo_label_store import DONE, PseudoLabelStore, StoreError


def large_masks(counts: list, height: int, width: int, min_mask_area: float) -> np.ndarray:
    """(L,) bool: which of a photo's RLE masks cover at least min_mask_area of it (`sp pretrain --min-mask-area`)."""
    return np.array([rle.area(c, height, width) >= min_mask_area * height * width for c in counts], bool)


class PseudoLabelDataset(Dataset):
    """Item: dict(image (3, Hr, Wr) float, masks (L, Hr, Wr) bool, boxes (L, 4) xyxy in resized pixels,
    seed_features (L, D) float32, index, small_masks: how many of the image's masks min_mask_area left out).

    min_mask_area: leave out the masks covering less than this fraction of their photo (0 keeps all)."""

    def __init__(self, store_path: Path, images_dir: Path, image_size: int, max_size: int,
                 flip_prob: float = 0.5, seed: int = 0, min_mask_area: float = 0.0):
        store = PseudoLabelStore.open(store_path)
        if not store.complete:
            raise StoreError(f"{store_path} is not complete ({store.images_done} of {store.num_images} images); "
                             "finish `sp gen-masks` (or `sp store merge`) first")
        self.store_path, self.images_dir = Path(store_path), Path(images_dir)
        self.image_size, self.max_size, self.flip_prob, self.seed = image_size, max_size, flip_prob, seed
        self.min_mask_area = min_mask_area
        self.settings_hash = store.attrs["settings_hash"]
        self.feature_dim = int(store.attrs["feature_dim"])
        self.backbone = store.attrs["settings"].get("backbone")
        self.images = np.nonzero(store.image_array("status") == DONE)[0]
        self.names = np.array([n.encode() for n in store.file_names], dtype=np.bytes_)
        self.heights = store.image_array("height").copy()
        self.widths = store.image_array("width").copy()
        self.offsets = store.mask_offset.copy()
        self.boxes = store.mask_array("box").copy()
        self.epoch = 0
        self._store: PseudoLabelStore | None = None
        missing = [self.names[i].decode() for i in self.images[:1] if not (self.images_dir / self.names[i].decode()).exists()]
        if missing:
            raise FileNotFoundError(f"{self.images_dir / missing[0]} does not exist: is --images the folder "
                                    f"the store was generated from ({store.attrs.get('images_root')})?")

    def __len__(self):
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, k: int) -> dict:
        if self._store is None:
            self._store = PseudoLabelStore.open(self.store_path)
        i = int(self.images[k])
        name, height, width = self.names[i].decode(), int(self.heights[i]), int(self.widths[i])
        image = network_input(load_image(self.images_dir / name, (height, width)), self.image_size, self.max_size)
        rh, rw = image.shape[1:]
        # an image without pseudo masks (L = 0) still trains the classifier's background
        counts = self._store.rle(i)
        keep = large_masks(counts, height, width, self.min_mask_area)
        masks = resize_masks([rle.decode(c, height, width) for c, k in zip(counts, keep) if k], (rh, rw))
        boxes = torch.from_numpy(self.boxes[self.offsets[i]:self.offsets[i + 1]][keep]) * torch.tensor(
            [rw / width, rh / height, rw / width, rh / height])
        seeds = torch.from_numpy(self._store.seed_features(i)[keep].astype(np.float32))
        if np.random.default_rng([self.seed, self.epoch, i]).random() < self.flip_prob:
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([rw - boxes[:, 2], boxes[:, 1], rw - boxes[:, 0], boxes[:, 3]], 1)
        return {"image": image, "masks": masks, "boxes": boxes, "seed_features": seeds, "index": i,
                "small_masks": int((~keep).sum())}


def collate_training(items: list[dict]) -> dict:
    """Pad images to a shared multiple of 32, with soft targets at stride 4 (as the reference, not thresholded).

    Returns images (B, 3, Hp, Wp), image_hw list, dropped_targets (the objects left out because no pixel of
    theirs is left at the training resolution: an empty target would stay a positive in the matcher and the
    losses and teach confident empty masks), and per image a target dict: masks (L, Hp/4, Wp/4) float, each
    cell the fraction of its 4x4 pixels the object covers (so an object with one pixel keeps a non-empty
    target), full-resolution masks (L, Hp, Wp) bool, labels (L,) (zeros, the one foreground class, when items
    carry none), boxes, and seed_features when items carry them; small_masks, the masks the dataset's
    min_mask_area left out."""
    hp = math.ceil(max(it["image"].shape[1] for it in items) / STRIDE) * STRIDE
    wp = math.ceil(max(it["image"].shape[2] for it in items) / STRIDE) * STRIDE
    images = torch.zeros(len(items), 3, hp, wp)
    targets, dropped = [], 0
    for b, it in enumerate(items):
        h, w = it["image"].shape[1:]
        images[b, :, :h, :w] = it["image"]
        keep = it["masks"].flatten(1).any(1)
        dropped += int((~keep).sum())
        masks = F.pad(it["masks"][keep].float(), (0, wp - w, 0, hp - h))
        small = F.avg_pool2d(masks[None], 4)[0] if len(masks) else masks.new_zeros(0, hp // 4, wp // 4)
        labels = it.get("labels", torch.zeros(len(keep), dtype=torch.long))
        target = {"masks": small, "full_masks": masks.bool(), "boxes": it["boxes"][keep], "labels": labels[keep]}
        if "seed_features" in it:
            target["seed_features"] = it["seed_features"][keep]
        targets.append(target)
    return {"images": images, "image_hw": [tuple(it["image"].shape[1:]) for it in items], "targets": targets,
            "index": [it["index"] for it in items], "dropped_targets": dropped,
            "small_masks": sum(it.get("small_masks", 0) for it in items)}
