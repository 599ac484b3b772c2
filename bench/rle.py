"""Our numba RLE codec against pycocotools, per mask, on COCO-sized ellipse masks (byte-identical output).

    python bench/rle.py --masks 20 --size 480 640
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from store import rle  # noqa: E402


def ellipses(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), bool)
    for k in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(10, h / 3), rng.uniform(10, w / 3)
        out[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return out


def best_of(fn, repeat: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=20)
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640])
    args = parser.parse_args()
    masks = ellipses(args.masks, *args.size)
    h, w = args.size
    ours = rle.encode_batch(masks)
    theirs = [coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))["counts"] for m in masks]
    assert ours == theirs, "encodings differ"
    n = len(masks)
    # pycocotools needs Fortran-ordered uint8: the conversion is part of what a caller pays.
    enc_coco = best_of(lambda: coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))))
    enc_ours = best_of(lambda: rle.encode_batch(masks))
    objs = [{"size": [h, w], "counts": c} for c in theirs]
    dec_coco = best_of(lambda: [np.ascontiguousarray(coco_mask.decode(o)) for o in objs])
    dec_ours = best_of(lambda: [rle.decode(c, h, w) for c in ours])
    print(json.dumps({"masks": n, "size": [h, w], "encode_us_per_mask": {"ours": enc_ours / n * 1e6,
                      "pycocotools": enc_coco / n * 1e6}, "decode_us_per_mask": {"ours": dec_ours / n * 1e6,
                      "pycocotools_c_order": dec_coco / n * 1e6}, "mean_counts_bytes": float(np.mean([len(c) for c in ours]))},
                     indent=2))


if __name__ == "__main__":
    main()
