"""Stage 1 (`sp gen-masks`) on real photos: is it bound by the backbone? One subcommand per figure of
bench/README.md; each prints a markdown table and writes its JSON under --out.

    python bench/gen_masks.py loop       # the device loop against the backbone alone, stage by stage
    python bench/gen_masks.py loop --busy-neighbour --refine none   # ... with a loader worker busy on the other core
    python bench/gen_masks.py command    # the whole command: --refine none / superpixel x --workers 0 / 1 / 2
    python bench/gen_masks.py loader     # CPU seconds per image of the loader workers, 512 and 800 px
    python bench/gen_masks.py saliency --backbone resnet50 --weights none   # Eq. 3-4 against a per-seed loop

Defaults: the first 96 photos of ../shared/datasets/coco_subset/train/images, EfficientNet-Lite0 with its
ImageNet weights, short side 512 (long side <= 853), batch 4, CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import queue
import shutil
import sys
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models.saliency  # noqa: E402
import stages.gen_masks  # noqa: E402
from bench.memory import run_measured  # noqa: E402
from models.backbone import build_backbone, resolve_backbone_weights  # noqa: E402
from models.mask_refinement import RefineConfig  # noqa: E402
from models.saliency import SaliencyConfig, saliency_maps, select_candidates  # noqa: E402
from stages.gen_masks import GenerationSettings, image_folder, saliency_proposals, to_results  # noqa: E402
from stages.image_data import batch_loader, list_images  # noqa: E402
from stages.code_version import code_version  # noqa: E402
from store import rle  # noqa: E402

warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
REPO = Path(__file__).resolve().parents[1]
# The main loop's steps, timed (in a separate pass) by wrapping each function where stage 1 calls it.
STEPS = [(stages.gen_masks, "select_candidates"), (models.saliency, "saliency_maps"),
         (stages.gen_masks, "kept_maps"), (models.saliency, "refine_maps")]


def settings_for(args, refine: str, image_size: int | None = None, max_size: int | None = None):
    return GenerationSettings(backbone=args.backbone, image_size=image_size or args.image_size,
                              max_size=max_size or args.max_size, refine=RefineConfig(method=refine))


def synchronizer(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


@contextmanager
def timed_steps(totals: dict, sync):
    """Add the seconds of every call of the STEPS functions to totals[name] (nested calls count in both)."""
    originals = [(module, name, getattr(module, name)) for module, name in STEPS]

    def timed(fn, name):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            totals[name] += time.perf_counter() - start
            return out
        return call

    for module, name, fn in originals:
        setattr(module, name, timed(fn, name))
    try:
        yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def interleaved_loops(batches, backbone, settings, device, sync) -> tuple[dict, queue.SimpleQueue]:
    """`generate`'s loop without the loader and the writer (what the device, and the thread feeding it, does per
    batch up to the hand-off of the batch's per-image work) and the backbone alone, over the same batches: each
    batch goes through both back to back, in alternating order, so that a shared machine's drifts in speed hit
    both alike. Returns ({"main" | "backbone_only": [wall, CPU seconds]}, the main loop's hand-offs)."""
    seconds, handoff = {"main": [0.0, 0.0], "backbone_only": [0.0, 0.0]}, queue.SimpleQueue()
    for i, batch in enumerate(batches):
        for which in ("main", "backbone_only") if i % 2 else ("backbone_only", "main"):
            start, cpu = time.perf_counter(), time.process_time()
            on_device = batch.to(device)
            c5 = backbone(on_device.images)["c5"]
            if which == "main":
                handoff.put((on_device, saliency_proposals(c5, on_device, settings)))
            sync()
            seconds[which][0] += time.perf_counter() - start
            seconds[which][1] += time.process_time() - cpu
    return seconds, handoff


def writer_work(handoff: queue.SimpleQueue, sync) -> dict:
    """The writer thread's work on the hand-offs, timed step by step (seconds in all) and the masks made."""
    t = defaultdict(float)
    while not handoff.empty():
        batch, finish = handoff.get()
        start = time.perf_counter()
        proposals = finish()
        sync()
        t["full_size_masks"] += time.perf_counter() - start
        start = time.perf_counter()
        results = to_results(batch, proposals)
        t["copy_to_cpu"] += time.perf_counter() - start
        start = time.perf_counter()
        t["masks"] += sum(len(rle.encode_batch(r.rle)) for r in results)
        t["rle_encode"] += time.perf_counter() - start
    return t


def keep_loading(images: Path, names: list[str], settings, stop) -> None:
    """A loader worker's work (decoding, resizing, segments) over and over until `stop` is set."""
    torch.set_num_threads(1)
    folder = image_folder(images, names, settings)
    while not stop.is_set():
        for k in range(len(folder)):
            if stop.is_set():
                return
            folder[k]


@contextmanager
def busy_neighbour(args, names):
    """With --busy-neighbour, a process doing a `--refine superpixel` loader worker's work on the other core for the
    duration: what the main loop shares the machine with in the whole command at --workers 1."""
    if not args.busy_neighbour:
        yield
        return
    stop = multiprocessing.Event()
    worker = multiprocessing.Process(target=keep_loading, args=(args.images, names, settings_for(args, "superpixel"),
                                                                stop))
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


def loop(args) -> dict:
    """Main-loop time per image (decoding and writing excluded: they run in the workers and the writer thread)
    against a backbone-only loop over the same batches, interleaved batch by batch, per refinement: the median of
    --repeats; then one instrumented pass for the per-step breakdown."""
    names = list_images(args.images)[: args.count]
    backbone = build_backbone(args.backbone, resolve_backbone_weights(args.backbone, args.weights),
                              out_levels=("c5",)).to(args.device).eval()
    sync = synchronizer(args.device)
    out = {}
    with torch.inference_mode(), busy_neighbour(args, names):
        for refine in args.refine:
            settings = settings_for(args, refine)
            # decoded, resized and segmented up front: that is the loader workers' part, timed by `loader`
            batches = list(batch_loader(image_folder(args.images, names, settings), args.batch_size, 0))
            writer_work(interleaved_loops(batches[:1], backbone, settings, args.device, sync)[1], sync)  # warm-up
            # each repeat's (wall, CPU seconds) of both; the repeat with the median throughput ratio is reported.
            # Nothing else of this process runs meanwhile, so on a CPU its CPU time is the loop's compute, less
            # disturbed than wall time by other jobs on a shared machine
            repeats = []
            for _ in range(args.repeats):
                seconds, handoff = interleaved_loops(batches, backbone, settings, args.device, sync)
                repeats.append((seconds["backbone_only"][0] / seconds["main"][0], seconds))
                writer = writer_work(handoff, sync)
            ratios = sorted(ratio for ratio, _ in repeats)
            seconds = sorted(repeats, key=lambda r: r[0])[len(repeats) // 2][1]
            backbone_only, main = seconds["backbone_only"], seconds["main"]
            steps = defaultdict(float)
            with timed_steps(steps, sync):
                for batch in batches:
                    batch = batch.to(args.device)
                    start = time.perf_counter()
                    c5 = backbone(batch.images)["c5"]
                    sync()
                    steps["backbone"] += time.perf_counter() - start
                    saliency_proposals(c5, batch, settings)
            n = len(names)
            out[refine] = {
                "backbone_only_s_per_img": backbone_only[0] / n, "main_loop_s_per_img": main[0] / n,
                "main_loop_throughput_vs_backbone_only": backbone_only[0] / main[0],
                "throughput_ratio_of_each_repeat": ratios,
                "cpu_s_per_img": {"backbone_only": backbone_only[1] / n, "main_loop": main[1] / n},
                "by_cpu_time": backbone_only[1] / main[1],
                "main_loop_steps_s_per_img": {
                    "backbone": steps["backbone"] / n, "saliency_maps": steps["saliency_maps"] / n,
                    "nms_and_top_k": (steps["select_candidates"] - steps["saliency_maps"]) / n,
                    "kept_maps_to_working_grid": (steps["kept_maps"] - steps["refine_maps"]) / n,
                    "refinement": steps["refine_maps"] / n},
                "writer_s_per_img": {k: v / n for k, v in writer.items() if k != "masks"},
                "masks_per_img": writer["masks"] / n}
    print(f"{len(names)} photos, {args.backbone} ({args.weights}), {args.image_size} px, batch {args.batch_size}, "
          f"{args.device}, {torch.get_num_threads()} threads"
          + (", a superpixel loader busy beside it" if args.busy_neighbour else "") + "\n")
    print("| --refine | backbone-only s/img | main loop s/img | throughput vs backbone-only (by CPU time) | "
          "main-loop steps s/img: backbone / saliency maps / NMS + top-k / kept maps to working grid / refinement | "
          "writer s/img: full-size masks / copy to CPU / RLE |\n|---|---:|---:|---:|---|---|")
    for refine, r in out.items():
        steps, writer = r["main_loop_steps_s_per_img"], r["writer_s_per_img"]
        print(f"| {refine} | {r['backbone_only_s_per_img']:.3f} | {r['main_loop_s_per_img']:.3f} | "
              f"**{r['main_loop_throughput_vs_backbone_only']:.3f}** ({r['by_cpu_time']:.3f}) | "
              f"{' / '.join(f'{v:.4f}' for v in steps.values())} | {' / '.join(f'{v:.4f}' for v in writer.values())} |")
    return {"photos": len(names), "threads": torch.get_num_threads(), **vars_of(args), "results": out}


def store_digest(store: Path) -> str:
    """sha256 of every file of a store but the creation time: equal digests, byte-identical stores."""
    digest = hashlib.sha256()
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path == store / "zarr.json":
            root = json.loads(data)
            root["attributes"].pop("created")
            data = json.dumps(root, sort_keys=True).encode()
        digest.update(str(path.relative_to(store)).encode() + b"\0" + data)
    return digest.hexdigest()


def command(args) -> dict:
    """The whole `sp gen-masks` (start-up, loader, device loop, writer) in its own process per run, each
    refinement at each --workers, alternating refinements, the best wall time of --repeats."""
    flags = ["--limit", str(args.count), "--backbone", args.backbone, "--backbone-weights", args.weights,
             "--image-size", str(args.image_size), "--max-size", str(args.max_size), "--batch-size",
             str(args.batch_size), "--device", args.device]
    runs = {}
    for workers in args.workers:
        for _ in range(args.repeats):
            for refine in args.refine:
                store = args.out / f"command-{refine}-w{workers}.zarr"
                shutil.rmtree(store, ignore_errors=True)
                wall, usage = run_measured(["gen-masks", str(args.images), "--store", str(store), *flags,
                                            "--workers", str(workers), "--refine", refine],
                                           store.with_suffix(".log"), env={"OMP_NUM_THREADS": str(args.threads)})
                best = runs.get((refine, workers), {"wall_s": float("inf")})
                runs[(refine, workers)] = {
                    "refine": refine, "workers": workers, "wall_s": min(wall, best["wall_s"]),
                    # the process and its reaped children (the loader workers)
                    "cpu_s_per_img": (usage.ru_utime + usage.ru_stime) / args.count, "digest": store_digest(store)}
    print(f"{args.count} photos, {args.backbone}, {args.image_size} px, batch {args.batch_size}, {args.device}, "
          f"OMP_NUM_THREADS={args.threads}\n")
    print("| --refine | --workers | wall s | img/s | CPU s/img (all processes) | wall × none | store = first "
          "--workers' |\n|---|---:|---:|---:|---:|---:|---|")
    for (refine, workers), r in runs.items():
        r["img_per_s"] = args.count / r["wall_s"]
        r["wall_vs_none"] = r["wall_s"] / runs[("none", workers)]["wall_s"] if ("none", workers) in runs else None
        r["store_same_as_first_workers"] = r["digest"] == runs[(refine, args.workers[0])]["digest"]
        print(f"| {refine} | {workers} | {r['wall_s']:.1f} | {r['img_per_s']:.3f} | {r['cpu_s_per_img']:.3f} | "
              f"{r['wall_vs_none'] or float('nan'):.3f} | {r['store_same_as_first_workers']} |")
    return {"photos": args.count, **vars_of(args), "results": list(runs.values())}


def loader(args) -> dict:
    """CPU seconds per image of a DataLoader worker (one torch thread, as in a worker): decoding and resizing,
    and with the superpixels, at each --sizes. One core feeds 1 / that images per second."""
    torch.set_num_threads(1)
    names = list_images(args.images)[: args.count]
    rows = []
    for image_size, max_size in args.sizes:
        for refine in args.refine:
            folder = image_folder(args.images, names, settings_for(args, refine, image_size, max_size))
            folder[0]  # imports and first-call costs are not per image
            start = time.process_time()
            for k in range(len(folder)):
                folder[k]
            cpu = (time.process_time() - start) / len(folder)
            rows.append({"image_size": image_size, "max_size": max_size, "refine": refine, "cpu_s_per_img": cpu,
                         "img_per_s_per_core": 1 / cpu})
    print(f"{len(names)} photos, one thread\n\n| short side (long <=) | --refine | loader CPU s/img | img/s one core "
          "feeds |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['image_size']} ({r['max_size']}) | {r['refine']} | {r['cpu_s_per_img']:.4f} | "
              f"{r['img_per_s_per_core']:.1f} |")
    return {"photos": len(names), **vars_of(args), "results": rows}


def per_seed_loop(c5: torch.Tensor, pools=(1, 2, 4)) -> torch.Tensor:
    """Eq. 3-4 written the straightforward way: one seed at a time, one similarity map each."""
    unit = F.normalize(c5, dim=0)
    maps = []
    for pool in pools:
        pooled = F.avg_pool2d(unit[None], pool)[0] if pool > 1 else unit
        for y in range(pooled.shape[1]):
            for x in range(pooled.shape[2]):
                sim = (F.normalize(pooled[:, y, x], dim=0)[:, None, None] * unit).sum(0)
                sim = sim - sim.min()
                maps.append(sim / sim.max())
    return torch.stack(maps)


def saliency(args) -> dict:
    """The saliency step (Eq. 3-4) on the C5 of one photo: vectorised (`saliency_maps`) against the per-seed
    loop above, and with NMS and top-k (`select_candidates`); best of --repeats."""
    settings = settings_for(args, "none")
    batch = next(iter(batch_loader(image_folder(args.images, list_images(args.images)[:1], settings), 1, 0)))
    backbone = build_backbone(args.backbone, resolve_backbone_weights(args.backbone, args.weights),
                              out_levels=("c5",)).eval()
    with torch.inference_mode():
        gh, gw = batch.grid_hw[0]
        c5 = backbone(batch.images)["c5"][0, :, :gh, :gw]
        valid = torch.ones(1, gh, gw, dtype=torch.bool)
        best = defaultdict(lambda: float("inf"))
        for _ in range(args.repeats):
            for name, fn in [("vectorised", lambda: saliency_maps(c5[None], valid)),
                             ("with_nms", lambda: select_candidates(c5[None], valid, SaliencyConfig())),
                             ("per_seed_loop", lambda: per_seed_loop(c5))]:
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    out = {"c5_grid": [gh, gw], **{f"{k}_ms": v * 1000 for k, v in best.items()},
           "speedup": best["per_seed_loop"] / best["vectorised"]}
    print(f"| {args.backbone}, {args.image_size} px (C5 {gh}×{gw}) | {out['vectorised_ms']:.1f} ms vs "
          f"{out['per_seed_loop_ms']:.0f} ms: **{out['speedup']:.0f}×** | with NMS and top-k: "
          f"{out['with_nms_ms']:.1f} ms |")
    return {**vars_of(args), "results": out}


def vars_of(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=["loop", "command", "loader", "saliency"])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared/datasets/coco_subset/train/images")
    parser.add_argument("--count", type=int, default=96, help="the first N photos (sorted by path)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="--backbone-weights: imagenet, none or a file")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--max-size", type=int, default=853)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--refine", nargs="+", default=["none", "superpixel"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="command: --workers of each run")
    parser.add_argument("--busy-neighbour", action="store_true",
                        help="loop: run a --refine superpixel loader worker's work in another process meanwhile")
    parser.add_argument("--threads", type=int, default=1, help="command: OMP_NUM_THREADS of each run")
    parser.add_argument("--sizes", type=lambda s: tuple(int(v) for v in s.split(",")), nargs="+",
                        default=[(512, 853), (800, 1333)], help="loader: SHORT,LONG sides")
    parser.add_argument("--repeats", type=int, default=3,
                        help="loop: the repeat with the median throughput ratio is reported; command, saliency: "
                             "the best time of each is kept")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sp-bench/gen-masks"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"loop": loop, "command": command, "loader": loader, "saliency": saliency}[args.figure](args)
    result["code_version"] = code_version()
    (args.out / f"{args.figure}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
