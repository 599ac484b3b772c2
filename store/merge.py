"""`sp store merge`: join the part stores written by `sp gen-masks --shard I/N` into one store.

The parts cover contiguous, batch-aligned ranges of one image list, so concatenating them in shard order
gives exactly the store a single process would have written.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from store.pseudo_label_store import ImageResult, PseudoLabelStore, StoreError

log = logging.getLogger(__name__)
PART_GLOB = "{stem}.part*-of-*.zarr"
IMAGES_PER_COMMIT = 512


def find_parts(store: Path) -> list[Path]:
    """The part stores of `store` (siblings named STEM.partIII-of-NNN.zarr), checked to be all N of them."""
    store = Path(store)
    parts = sorted(store.parent.glob(PART_GLOB.format(stem=store.stem)))
    if not parts:
        raise StoreError(f"no part stores {PART_GLOB.format(stem=store.stem)} next to {store}")
    counts = {p.name.rsplit("-of-", 1)[1].split(".")[0] for p in parts}
    if len(counts) != 1:
        raise StoreError(f"part stores of different shard counts next to {store}: {[p.name for p in parts]}")
    expected = int(counts.pop())
    if len(parts) != expected:
        raise StoreError(f"{len(parts)} of {expected} part stores of {store} are present: "
                         f"{[p.name for p in parts]}; run the missing shards first")
    return parts


def merge_stores(parts: list[Path], out: Path, remove_parts: bool = False) -> PseudoLabelStore:
    """Concatenate complete part stores (in the given order) into a new store at `out`."""
    opened = [PseudoLabelStore.open(p) for p in parts]
    first = opened[0]
    for p, store in zip(parts, opened):
        if not store.complete:
            raise StoreError(f"{p} is not complete ({store.images_done} of {store.num_images} images); "
                             "rerun its gen-masks command to finish it")
        if store.attrs["settings_hash"] != first.attrs["settings_hash"]:
            raise StoreError(f"{p} was generated with other settings than {parts[0]}")
    ranges = [s.attrs.get("image_range") for s in opened]
    for a, b in zip(ranges, ranges[1:]):
        if a and b and a[1] != b[0]:
            raise StoreError(f"part stores do not cover adjacent image ranges: {ranges}")
    names = [n for s in opened for n in s.file_names]
    keep = {k: v for k, v in first.attrs.items() if k in ("images_root", "batch_size", "backbone_weights")}
    attrs = {**keep, "shard": [0, 1], "image_range": [ranges[0][0], ranges[-1][1]] if ranges[0] else None,
             "merged_from": [str(p) for p in parts]}
    merged = PseudoLabelStore.create(out, names, first.attrs["settings"], first.attrs["feature_dim"], attrs)
    offset = 0
    for store in opened:
        skipped = store.skipped
        heights, widths, status = (store.image_array(n) for n in ("height", "width", "status"))
        moff, box, score, seed = store.mask_offset, *(store.mask_array(n) for n in ("box", "score", "seed"))
        for i0 in range(0, store.num_images, IMAGES_PER_COMMIT):
            i1 = min(i0 + IMAGES_PER_COMMIT, store.num_images)
            features = store.root["masks/seed_feature"][moff[i0]:moff[i1]]
            rles = store.rle_images(i0, i1)
            results = []
            for i in range(i0, i1):
                a, b = moff[i], moff[i + 1]
                results.append(ImageResult(
                    index=offset + i, height=int(heights[i]), width=int(widths[i]), status=int(status[i]),
                    reason=skipped.get(i, ""), rle=rles[i - i0],
                    box=box[a:b], score=score[a:b], seed=seed[a:b],
                    seed_feature=features[a - moff[i0]:b - moff[i0]]))
            merged.append(results)
        offset += store.num_images
    merged.finalize()
    log.info("merged %d parts into %s: %d images, %d masks", len(parts), out, merged.num_images,
             merged.progress["masks_done"])
    if remove_parts:
        for p in parts:
            shutil.rmtree(p)
    return merged

