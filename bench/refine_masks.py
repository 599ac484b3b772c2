"""Refined pseudo masks (issue 20): each generator's class-agnostic mask AP and the CPU time of `sp gen-masks`.

    python bench/refine_masks.py --data ../shared/datasets/coco_subset --work /tmp/sp-bench/refine

For each split (train, val) and each generator (the paper's, `--refine none`, and the refinements with their
settings), `sp gen-masks` runs on the split's photos in its own single-threaded process (EfficientNet-Lite0
ImageNet, short side 512, long side <= 853, batch 4, --workers 0, CPU), timed by its own user + system CPU
seconds (os.wait4: other jobs on the machine change the wall time, much less the CPU time); then the store is
scored as `sp eval-masks` scores it. Prints a markdown table and writes it as JSON next to the stores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memory import run_measured  # noqa: E402
from stages.eval_masks import evaluate_pseudo_masks  # noqa: E402
from store.pseudo_label_store import PseudoLabelStore  # noqa: E402

COMMON = ["--backbone", "efficientnet_lite0", "--backbone-weights", "imagenet", "--image-size", "512",
          "--max-size", "853", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
# (name, gen-masks flags): the paper's generator first (the reference of the ratios), then every candidate measured
GENERATORS = [
    ("none", ["--refine", "none"]),
    ("superpixel", ["--refine", "superpixel"]),
    ("superpixel-full-res", ["--refine", "superpixel", "--refine-downsample", "1", "--superpixel-scale", "200",
                             "--superpixel-sigma", "0.8", "--superpixel-min-size", "50"]),
    ("superpixel-quarter-res", ["--refine", "superpixel", "--refine-downsample", "4", "--superpixel-scale", "200",
                                "--superpixel-min-size", "10"]),
    ("guided", ["--refine", "guided", "--refine-downsample", "8", "--guided-radius", "64"]),
    ("guided-r32", ["--refine", "guided", "--refine-downsample", "8", "--guided-radius", "32"]),
]


def measure(images: Path, gt: Path, store: Path, flags: list[str]) -> dict:
    """One `sp gen-masks` run from scratch (CPU seconds of its process) and the quality of its store (on its
    images only)."""
    shutil.rmtree(store, ignore_errors=True)
    _, usage = run_measured(["gen-masks", str(images), "--store", str(store), *COMMON, *flags],
                            store.with_suffix(".log"), env={"OMP_NUM_THREADS": "1"})
    result = PseudoLabelStore.open(store)
    quality = evaluate_pseudo_masks(result, gt)
    return {"images": result.num_images, "masks": quality["masks"], "cpu_s": usage.ru_utime + usage.ru_stime,
            **{key: quality["segm"][key] for key in ("AP", "AP50", "AP75", "AR100")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="coco_subset: SPLIT/images and SPLIT/annotations.json")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--only", nargs="+", help="generator names to run (default: all)")
    parser.add_argument("--limit", type=int, help="only the first K photos of each split (for tuning)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sp-bench/refine"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print("| split | generator | gen-masks flags | masks/img | mask AP | AP50 | AP75 | AR100 | CPU s/img | "
          "× none |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for split in args.splits:
        reference = None
        for name, flags in GENERATORS:
            if args.only and name not in args.only:
                continue
            row = {"split": split, "generator": name, "flags": " ".join(flags), **measure(
                args.data / split / "images", args.data / split / "annotations.json",
                args.work / f"{split}-{name}.zarr", flags + (["--limit", str(args.limit)] if args.limit else []))}
            row["cpu_s_per_image"] = row["cpu_s"] / row["images"]
            reference = reference or (row if name == "none" else None)
            ratio = f"{row['cpu_s_per_image'] / reference['cpu_s_per_image']:.2f}" if reference else "–"
            print(f"| {split} | {name} | `{row['flags']}` | {row['masks'] / row['images']:.1f} | {row['AP']:.3f} | "
                  f"{row['AP50']:.3f} | {row['AP75']:.3f} | {row['AR100']:.3f} | {row['cpu_s_per_image']:.3f} | "
                  f"{ratio} |", flush=True)
            rows.append(row)
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
