"""Cost of the up-front check of labeled data (`stages.coco_check`), extrapolated to COCO train2017
(118,287 images, 860,001 annotations).

    python bench/coco_check.py --copies 382

Records: the real COCO subset's train JSON repeated `--copies` times (ids renumbered), parsed and checked.
Image files: the subset's photos (warm page cache, after the warm-up run: a cold network disk adds its latency
per file) checked the default way (header + end marker) and with full decoding, with 1 and 16 threads.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.rle import best_of  # noqa: E402
from stages.coco_check import TRAINING, check_image_files, check_records  # noqa: E402

COCO_TRAIN_IMAGES = 118_287
SUBSET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "coco_subset" / "train"


def replicated(data: dict, copies: int) -> dict:
    """The dataset repeated with fresh image and annotation ids (file names repeat: those are not checked here)."""
    step_img = max(im["id"] for im in data["images"]) + 1
    step_ann = max(a["id"] for a in data["annotations"]) + 1
    images = [{**im, "id": im["id"] + c * step_img, "file_name": f"{c}/{im['file_name']}"}
              for c in range(copies) for im in data["images"]]
    annotations = [{**a, "id": a["id"] + c * step_ann, "image_id": a["image_id"] + c * step_img}
                   for c in range(copies) for a in data["annotations"]]
    return {**data, "images": images, "annotations": annotations}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=382, help="382 copies of 310 images ≈ COCO train2017")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up run; the best counts")
    args = parser.parse_args()
    data = json.loads((SUBSET / "annotations.json").read_text())
    big = replicated(data, args.copies)
    text = json.dumps(big)
    parse_s = best_of(lambda: json.loads(text), args.repeats)
    records_s = best_of(lambda: check_records(big, TRAINING), args.repeats)
    n_images, n_anns = len(big["images"]), len(big["annotations"])
    out = {"records": {"images": n_images, "annotations": n_anns, "json_mb": round(len(text) / 2**20),
                       "parse_s": round(parse_s, 2), "check_s": round(records_s, 2)}}
    files = len(data["images"])
    for decode in (False, True):
        for threads in (1, 16):
            seconds = best_of(lambda: check_image_files(data, SUBSET / "images", decode, threads=threads),
                              args.repeats)
            out[f"files_{'decode' if decode else 'header'}_threads{threads}"] = {
                "ms_per_image": round(1000 * seconds / files, 3),
                "coco_train2017_min": round(seconds / files * COCO_TRAIN_IMAGES / 60, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
