"""`sp store info` and `sp store export`: summarise a pseudo-label store, or write it as COCO JSON or HDF5.

All readers walk the store in blocks of `IMAGES_PER_READ` images, so that the RLE strings of a block come
with one zarr read (a zarr call costs milliseconds; one per image would dominate on large stores).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from store import rle
from store.pseudo_label_store import DONE, SKIPPED, PseudoLabelStore, StoreError

log = logging.getLogger(__name__)
IMAGES_PER_READ = 512
MAX_SKIP_EXAMPLES = 10
# Histogram bins of masks per image: (label, lowest count, highest count inclusive).
HISTOGRAM_BINS = [("0", 0, 0), ("1", 1, 1), ("2-4", 2, 4), ("5-9", 5, 9), ("10-19", 10, 19),
                  ("20+", 20, np.iinfo(np.int64).max)]
FG_CATEGORY = {"id": 1, "name": "fg", "supercategory": "fg"}


def done_images(store: PseudoLabelStore) -> Iterator[tuple[int, int, int, int, list[bytes]]]:
    """Yield (index, height, width, first mask row, RLE counts of its K masks) for every DONE image."""
    status, heights, widths = (store.image_array(n) for n in ("status", "height", "width"))
    offset = store.mask_offset
    for start in range(0, store.images_done, IMAGES_PER_READ):
        stop = min(start + IMAGES_PER_READ, store.images_done)
        for i, counts in zip(range(start, stop), store.rle_images(start, stop)):
            if status[i] == DONE:
                yield i, int(heights[i]), int(widths[i]), int(offset[i]), counts


def _xywh(box: np.ndarray) -> list[float]:
    """Stored xyxy box (x2/y2 exclusive) → COCO [x, y, w, h]."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _write_atomically(out: Path, write) -> None:
    """Call write(tmp_path), then rename tmp over out, so readers never see a half-written file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---- summary ------------------------------------------------------------------------------------------------
def _disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def store_summary(store: PseudoLabelStore) -> dict:
    """Counts, masks-per-image histogram, settings and disk use of a store (complete or not)."""
    status = store.image_array("status")
    per_image = np.diff(store.mask_offset)[status == DONE]
    names = store.file_names
    skipped = store.skipped
    disk = _disk_bytes(store.path)
    n_done, n_masks = int(per_image.size), int(store.progress["masks_done"])
    return {
        "path": str(store.path),
        "complete": store.complete,
        "images_planned": store.num_images,
        "images_committed": store.images_done,
        "images_done": n_done,
        "images_skipped": int((status == SKIPPED).sum()),
        "skipped_examples": [{"index": i, "file_name": names[i], "reason": skipped[i]}
                             for i in sorted(skipped)[:MAX_SKIP_EXAMPLES]],
        "masks": n_masks,
        "masks_per_image_mean": float(per_image.mean()) if n_done else 0.0,
        "masks_per_image_max": int(per_image.max()) if n_done else 0,
        "masks_per_image_histogram": {label: int(((per_image >= lo) & (per_image <= hi)).sum())
                                      for label, lo, hi in HISTOGRAM_BINS},
        "settings": store.attrs.get("settings"),
        "settings_hash": store.attrs.get("settings_hash"),
        "feature_dim": store.attrs.get("feature_dim"),
        "images_root": store.attrs.get("images_root"),
        "disk_bytes": disk,
        "bytes_per_image": disk / n_done if n_done else None,
        "bytes_per_mask": disk / n_masks if n_masks else None,
    }


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def format_summary(summary: dict) -> str:
    """Readable multi-line text of `store_summary`'s dict, for `sp store info`."""
    s = summary
    state = ("complete" if s["complete"]
             else f"INCOMPLETE ({s['images_committed']} of {s['images_planned']} committed)")
    lines = [
        f"store         {s['path']}  [{state}]",
        f"images        {s['images_planned']} planned, {s['images_done']} done, {s['images_skipped']} skipped",
        f"masks         {s['masks']}  (mean {s['masks_per_image_mean']:.2f} / image, "
        f"max {s['masks_per_image_max']})",
        "masks/image   " + "  ".join(f"{k}: {v}" for k, v in s["masks_per_image_histogram"].items()),
        f"disk          {_size(s['disk_bytes'])}  ({_size(s['bytes_per_image'])} / image, "
        f"{_size(s['bytes_per_mask'])} / mask)",
        f"feature dim   {s['feature_dim']}",
        f"images root   {s['images_root']}",
        f"settings      hash {s['settings_hash']}",
    ]
    lines += [f"  {k} = {json.dumps(v)}" for k, v in sorted((s["settings"] or {}).items())]
    if s["skipped_examples"]:
        lines.append(f"skipped (first {len(s['skipped_examples'])}):")
        lines += [f"  [{e['index']}] {e['file_name']}: {e['reason']}" for e in s["skipped_examples"]]
    return "\n".join(lines)


# ---- COCO ---------------------------------------------------------------------------------------------------
def _annotation(store: PseudoLabelStore, row: int, counts: bytes, height: int, width: int) -> dict:
    """COCO fields shared by instance annotations and results: segmentation, area, bbox, score."""
    return {"segmentation": rle.to_coco(counts, height, width), "area": float(rle.area(counts, height, width)),
            "bbox": _xywh(store.mask_array("box")[row]), "score": float(store.mask_array("score")[row])}


def to_coco(store: PseudoLabelStore, out_json: Path, with_scores: bool = True) -> dict:
    """Write the pseudo masks as a COCO instances JSON (one category 'fg'; image id = store index + 1).

    Skipped images are left out. Returns the dataset dict that was written.
    """
    if not store.complete:
        log.warning("%s is incomplete: exporting its %d committed images only", store.path, store.images_done)
    names = store.file_names
    images, annotations = [], []
    for i, height, width, row, counts in done_images(store):
        images.append({"id": i + 1, "file_name": names[i], "height": height, "width": width})
        for k, c in enumerate(counts):
            ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": FG_CATEGORY["id"],
                   **_annotation(store, row + k, c, height, width), "iscrowd": 0}
            if not with_scores:
                del ann["score"]
            annotations.append(ann)
    dataset = {"info": {"description": "sp pseudo masks", "settings_hash": store.attrs.get("settings_hash"),
                        "settings": store.attrs.get("settings")},
               "images": images, "annotations": annotations, "categories": [dict(FG_CATEGORY)]}

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(dataset, f)
    _write_atomically(out_json, write)
    log.info("wrote %s: %d images, %d annotations", out_json, len(images), len(annotations))
    return dataset


def gt_image_ids(store: PseudoLabelStore, gt: dict) -> dict[int, int]:
    """Store index → GT image id for the DONE images whose file_name is in the GT dataset dict.

    A store name matches a GT file_name equal to it, or else one with the same basename (GT JSONs often
    hold bare names while the store holds paths relative to the images folder); a basename that occurs
    twice in the GT or in the store is not used, so that no two store images share a GT image.
    """
    by_name = {im["file_name"]: im["id"] for im in gt["images"]}
    by_base: dict[str, int | None] = {}
    for name, image_id in by_name.items():
        base = os.path.basename(name)
        by_base[base] = None if base in by_base else image_id
    names = store.file_names[:store.images_done]
    store_bases = Counter(os.path.basename(n) for n in names)
    status = store.image_array("status")
    out = {}
    for i, name in enumerate(names):
        base = os.path.basename(name)
        image_id = by_name.get(name, by_base.get(base) if store_bases[base] == 1 else None)
        if status[i] == DONE and image_id is not None:
            out[i] = image_id
    return out


def to_coco_results(store: PseudoLabelStore, gt: dict, category_id: int = FG_CATEGORY["id"]) -> list[dict]:
    """COCO results list (image_id, category_id, segmentation, bbox, score) of the masks of the store's
    images found in the GT dataset dict `gt` (see `gt_image_ids`); images not in GT are left out."""
    ids = gt_image_ids(store, gt)
    results = []
    for i, height, width, row, counts in done_images(store):
        if i in ids:
            for k, c in enumerate(counts):
                ann = _annotation(store, row + k, c, height, width)
                del ann["area"]  # COCO.loadRes computes the area of results itself
                results.append({"image_id": ids[i], "category_id": category_id, **ann})
    return results


# ---- HDF5 ---------------------------------------------------------------------------------------------------
def _h5_attr(value):
    """HDF5 attributes hold scalars and strings; nested values go in as JSON strings."""
    return value if isinstance(value, (str, int, float, bool)) else json.dumps(value)


def to_hdf5(store: PseudoLabelStore, out_h5: Path) -> None:
    """Write a complete store as one HDF5 file.

    Layout (I images, M masks, D feature dim):
        images/file_name (I,) str, images/height, width (I,) int32, images/status (I,) uint8,
        images/mask_offset (I+1,) int64 (masks of image i are rows mask_offset[i]:mask_offset[i+1]),
        masks/box (M,4) float32 xyxy, masks/score (M,) float32, masks/seed (M,3) int16,
        masks/seed_feature (M,D) float16, masks/rle (M,) ASCII strings (COCO compressed RLE counts);
        attrs: every store attribute (dicts such as settings as JSON strings).
    """
    if not store.complete:
        raise StoreError(f"{store.path} is incomplete ({store.images_done} of {store.num_images} images "
                         "committed, not finalized); "
                         "resume sp gen-masks before exporting to HDF5")
    n_masks = int(store.progress["masks_done"])
    ascii_str = h5py.string_dtype("ascii")

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images/file_name", data=store.file_names, dtype=h5py.string_dtype("utf-8"))
            for name in ("height", "width", "status"):
                f.create_dataset(f"images/{name}", data=store.image_array(name))
            f.create_dataset("images/mask_offset", data=store.mask_offset)
            for name in ("box", "score", "seed"):
                f.create_dataset(f"masks/{name}", data=store.mask_array(name))
            features = store.root["masks/seed_feature"]
            out_feat = f.create_dataset("masks/seed_feature", shape=(n_masks, features.shape[1]), dtype="float16")
            out_rle = f.create_dataset("masks/rle", shape=(n_masks,), dtype=ascii_str)
            # Copy in blocks of images: features and RLE of a large store do not fit in memory at once.
            offset = store.mask_offset
            for start in range(0, store.num_images, IMAGES_PER_READ):
                stop = min(start + IMAGES_PER_READ, store.num_images)
                a, b = int(offset[start]), int(offset[stop])
                if b > a:
                    out_feat[a:b] = features[a:b]
                    out_rle[a:b] = [c for counts in store.rle_images(start, stop) for c in counts]
            f.attrs.update({k: _h5_attr(v) for k, v in store.attrs.items()})
    _write_atomically(out_h5, write)
    log.info("wrote %s: %d images, %d masks", out_h5, store.num_images, n_masks)
