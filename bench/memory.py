"""Peak memory of every stage, each an `sp` command in its own process, at several image counts.

    python bench/memory.py --images 100 1000

For each count N, `sp demo-data` writes N unlabeled and N labeled images (480x640, like COCO) under --work;
then gen-masks runs over the N unlabeled images, pretrain one epoch over the resulting store, finetune one
epoch over the N labeled images (evaluating on 16 others), and evaluate over the N labeled images. Small
models (ResNet-18), 256 px short side, --workers 0, CPU. A stage's peak RSS is its process's own maximum
resident set (os.wait4), so the figures do not include this script. Prints one markdown row per stage and count.
`--stages evaluate` reruns only that stage on the outputs of an earlier full run (same --work).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZE = ["--image-size", "256", "--max-size", "427", "--workers", "0", "--device", "cpu"]
STAGES = ("gen-masks", "pretrain", "finetune", "evaluate")


def stage_commands(data: Path, run: Path) -> dict[str, list[str]]:
    """The four stages on one demo dataset, writing under run/."""
    return {
        "gen-masks": ["gen-masks", f"{data}/unlabeled", "--store", f"{run}/store.zarr", "--backbone", "resnet18",
                      "--batch-size", "8", *SIZE],
        "pretrain": ["pretrain", "--store", f"{run}/store.zarr", "--images", f"{data}/unlabeled", "--out",
                     f"{run}/pretrain", "--small", "--epochs", "1", "--batch-size", "4", "--warmup-steps", "10",
                     "--keep-every", "0", *SIZE],
        "finetune": ["finetune", "--train-ann", f"{data}/annotations/train.json", "--train-images", f"{data}/train",
                     "--val-ann", f"{data}/annotations/val.json", "--val-images", f"{data}/val", "--out",
                     f"{run}/finetune", "--small", "--epochs", "1", "--batch-size", "4", "--warmup-steps", "10", *SIZE],
        "evaluate": ["evaluate", f"{run}/finetune/final.pth", "--ann", f"{data}/annotations/train.json", "--images",
                     f"{data}/train", "--workers", "0", "--device", "cpu"],
    }


def run_measured(args: list[str], log: Path, env: dict | None = None) -> tuple[float, resource.struct_rusage]:
    """Run `sp ARGS` to completion (with `env` added to the environment); (wall seconds, that process's own
    resource usage: ru_maxrss in KiB on Linux, ru_utime and ru_stime in seconds)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                 cwd=Path(__file__).resolve().parents[1], env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"sp {' '.join(args)} failed; its output: {log}")
    return time.perf_counter() - start, usage


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sp-bench/memory"))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = parser.parse_args()
    print("| stage | images | wall (s) | peak RSS (MiB) |\n|---|---:|---:|---:|")
    for count in args.images:
        data, run = args.work / f"data{count}", args.work / f"run{count}"
        if not (data / "annotations" / "val.json").exists():
            subprocess.run([sys.executable, "-m", "pipeline.cli", "demo-data", str(data), "--num-unlabeled",
                            str(count), "--num-train", str(count), "--num-val", "16"], check=True,
                           capture_output=True, cwd=Path(__file__).resolve().parents[1])
        if args.stages == list(STAGES):
            shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True, exist_ok=True)
        for stage in args.stages:
            command = stage_commands(data, run)[stage]
            wall, usage = run_measured(command, run / f"{stage}.log")
            rss = usage.ru_maxrss / 1024
            print(f"| {stage} | {count} | {wall:.0f} | {rss:.0f} |", flush=True)
            (run / f"{stage}.json").write_text(json.dumps({"stage": stage, "images": count, "wall_s": wall,
                                                           "peak_rss_mib": rss}))


if __name__ == "__main__":
    main()
