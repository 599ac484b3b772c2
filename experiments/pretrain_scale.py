"""The pre-training scale study (experiments/README.md, "Pre-training scale"): fine-tuned mask AP at 20 Penn-Fudan
labels against pre-training image views, per kind of pseudo label, with each pre-training's own figures, and a
log-linear fit of AP on views for the saliency masks of the 451 COCO photos.

    python experiments/pretrain_scale.py    # after (part of) snakemake ... --configfile experiments/pretrain_scale.yaml

Reads results/pretrain_scale/finetune/ROW/seedS/ (eval.json, metrics.jsonl, final.pth: its `init` names the
pre-training run) and that run's folder; evaluates each pre-trained model class-agnostically on coco_subset's val
photos once (`sp evaluate`, cached under results/pretrain_scale/pretrain_eval/). Writes
experiments/pretrain_scale_results.json (every number, each run's code version; a run no longer on disk keeps what
the committed file recorded, so a fresh machine adds to it), pretrain_scale_results.md and pretrain_scale.png.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import torch
import yaml

from stages.plots import save
from stages.report import mean_sd, read_metrics, run_minutes
from store.pseudo_label_store import PseudoLabelStore

REPO = Path(__file__).resolve().parents[1]
COCO_VAL = REPO.parent / "shared" / "datasets" / "coco_subset" / "val"
# row -> (series, what it varies); a series is one line of the chart
SERIES = {
    "sp_1x": "saliency, 451 COCO photos", "sp_4x": "saliency, 451 COCO photos", "sp_16x": "saliency, 451 COCO photos",
    "sp_random_1x": "random boxes, 451 COCO photos", "sp_min_score_05_1x": "saliency at min_score 0.5, 451 COCO photos",
    "sp_train310_saliency_4x": "saliency, 310 photos", "sp_train310_random_4x": "random boxes, 310 photos",
    "sp_train310_random_1x": "random boxes, 310 photos", "sp_train310_random_3_1x": "3 random boxes a photo, 310 photos", "sp_train310_ground_truth_1x": "ground truth, 310 photos",
    "sp_train310_ground_truth_large_1x": "ground truth >= 1 % of the photo, 310 photos",
    "sp_train310_refined_4x": "refined saliency, 310 photos", "sp_train310_ground_truth_4x": "ground truth, 310 photos",
    "sp_all_photos_4x": "saliency, 2,020 photos", "sp_coco_camvid_4x": "saliency, 451 COCO + 680 CamVid",
    "sp_coco_general_4x": "saliency, 451 COCO + 680 other", "sp_384px_4x": "saliency, 451 COCO photos, 384 px",
}
FIT_SERIES = "saliency, 451 COCO photos"
# rows whose fine-tunings the Penn-Fudan experiment ran with the very same settings (its record has 5 seeds):
# their seeds come from experiments/pennfudan_results.json, and their pre-training's figures from its folder where
# --pretrain gives it, else only what its settings fix (experiments/coco_pretraining.yaml: sp_cosine, 8 epochs of
# the 451 photos, batch 4, 256 px)
RECORDED_IN_PENNFUDAN = {
    "sp_1x": ("knet_sp_20", {"run": "sp_cosine", "photos": 451, "steps": 904, "batch_size": 4, "views": 3616,
                             "image_size": 256, "epochs": 8}),
    "sp_random_1x": ("knet_sp_random_proposals_20", {"run": "sp_random_proposals", "photos": 451, "steps": 904,
                                                     "batch_size": 4, "views": 3616, "image_size": 256, "epochs": 8})}
LOSS_TERMS = ("loss", "s3_dice", "s3_mask", "s3_cls", "kernel")


def pretrain_figures(pre: Path, results: Path) -> dict:
    """Views, steps, photos, wall / CPU minutes, last losses and class-agnostic AP of one pre-training run."""
    state = torch.load(pre / "final.pth", map_location="cpu", weights_only=False, mmap=True)
    records = read_metrics(pre / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    segments, cpu = [], 0.0
    for r in records:  # CPU seconds of each process that ran the run (a resumed run has several)
        if r.get("event") in ("start", "resume"):
            segments.append(0.0)
        elif "cpu_s" in r and segments:
            segments[-1] = r["cpu_s"]
    cpu = sum(segments) if segments else math.nan
    last = steps[-10:]
    evaluated = results / "pretrain_eval" / f"{pre.parent.name}.json"
    if not evaluated.exists():
        evaluated.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["sp", "evaluate", str(pre / "final.pth"), "--ann", str(COCO_VAL / "annotations.json"),
                        "--images", str(COCO_VAL / "images"), "--out", str(evaluated), "--workers", "0",
                        "--device", "cpu"], check=True, capture_output=True)
    own = json.loads(evaluated.read_text())
    store = state["args"]["store"]
    return {"run": pre.parent.name, "store": store, "photos": PseudoLabelStore.open(store).num_images, "steps": state["step"],
            "batch_size": state["args"]["batch_size"], "views": state["step"] * state["args"]["batch_size"],
            "image_size": state["args"]["image_size"], "epochs": state["args"]["epochs"],
            "wall_min": run_minutes(records), "cpu_min": cpu / 60,
            "last_losses": {t: float(np.mean([r[t] for r in last if t in r])) for t in LOSS_TERMS if t in last[-1]},
            "coco_val_agnostic": {"mask_AP": own["segm"]["AP"], "box_AP": own["bbox"]["AP"]},
            "code_version": state.get("code_version")}


def collect(config: dict, results: Path, recorded: dict, pretrain_folders: dict) -> dict:
    """{row: {"seeds": {seed: {...}}, "pretrain": {...}}} of the rows on disk, else as recorded."""
    rows = {}
    for run in config["finetune_runs"]:
        name, seeds = run["name"], run.get("seeds", config["seeds"])
        row = recorded.get(name, {"seeds": {}, "pretrain": None})
        if name in RECORDED_IN_PENNFUDAN:
            runs = json.loads((REPO / "experiments" / "pennfudan_results.json").read_text())["runs"]
            row["seeds"] = {str(seed): {"AP": r["segm"]["AP"], "AP50": r["segm"]["AP50"], "box_AP": r["bbox"]["AP"],
                                        "code_version": r.get("code_version"), "file": r["file"]}
                            for seed, r in enumerate(runs[RECORDED_IN_PENNFUDAN[name][0]])}
            row["pretrain"] = row["pretrain"] or RECORDED_IN_PENNFUDAN[name][1]
        if name in pretrain_folders:
            row["pretrain"] = pretrain_figures(pretrain_folders[name], results)
        for seed in seeds:
            folder = results / "finetune" / name / f"seed{seed}"
            if not (folder / "eval.json").exists():
                continue
            metrics = json.loads((folder / "eval.json").read_text())
            start = next(r for r in read_metrics(folder / "metrics.jsonl") if r.get("event") in ("start", "resume"))
            row["seeds"][str(seed)] = {"AP": metrics["segm"]["AP"], "AP50": metrics["segm"]["AP50"],
                                       "box_AP": metrics["bbox"]["AP"], "code_version": start.get("code_version"),
                                       "file": str(folder / "eval.json")}
            init = torch.load(folder / "final.pth", map_location="cpu", weights_only=False, mmap=True)["args"]["init"]
            row["pretrain"] = pretrain_figures(Path(init).parent, results)
        if row["seeds"]:
            rows[name] = row
    return rows


def log_fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares AP = a + b log10(views): (a, b, R²)."""
    x, y = np.log10([p[0] for p in points]), np.array([p[1] for p in points])
    b, a = np.polyfit(x, y, 1)
    r2 = 1 - ((y - a - b * x) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return float(a), float(b), float(r2)


def crossing(rows: dict, target: float, boots: int = 2000) -> dict | None:
    """Where the fit of the saliency-451 series meets `target` AP, with a bootstrap over seeds (each view level's
    seeds resampled with replacement); None with fewer than two view levels."""
    levels = {}
    for name, row in rows.items():
        if SERIES.get(name) == FIT_SERIES and row["pretrain"]:
            levels[row["pretrain"]["views"]] = [s["AP"] for s in row["seeds"].values()]
    if len(levels) < 2:
        return None
    def views_at(a: float, b: float) -> float:  # inf where the fit never gets there (or beyond 1e30 views)
        return 10 ** ((target - a) / b) if b > 0 and (target - a) / b < 30 else math.inf

    points = [(v, ap) for v, aps in levels.items() for ap in aps]
    a, b, r2 = log_fit(points)
    rng, found = np.random.default_rng(0), []
    for _ in range(boots):
        sample = [(v, ap) for v, aps in levels.items() for ap in rng.choice(aps, len(aps))]
        found.append(views_at(*log_fit(sample)[:2]))
    low, mid, high = np.percentile(found, [5, 50, 95], method="nearest")  # (inf: never)
    return {"a": a, "b_per_decade": b, "r2": r2, "levels": len(levels), "points": len(points), "target_AP": target,
            "views_at_target": views_at(a, b),
            "bootstrap_views_5_50_95": [float(low), float(mid), float(high)],
            "bootstrap_never": float(np.mean(np.isinf(found)))}


def baseline(name: str) -> tuple[float, float]:
    runs = json.loads((REPO / "experiments" / "pennfudan_results.json").read_text())["runs"][name]
    return mean_sd([r["segm"]["AP"] for r in runs])


def chart(rows: dict, fit: dict | None, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    for series in dict.fromkeys(SERIES.values()):
        pts = sorted((row["pretrain"]["views"], *mean_sd([s["AP"] for s in row["seeds"].values()]))
                     for name, row in rows.items() if SERIES.get(name) == series and row["pretrain"])
        if pts:
            v, m, sd = zip(*pts)
            ax.errorbar(v, m, yerr=[0 if math.isnan(x) else x for x in sd], marker="o", capsize=3, label=series)
    for name, label, style in (("knet_scratch_20", "K-Net, no pre-training", ":"),
                               ("maskrcnn_20", "Mask R-CNN, ImageNet weights", "--")):
        m, sd = baseline(name)
        ax.axhline(m, color="grey", linestyle=style, label=f"{label} ({m:.1f} ± {sd:.1f})")
    if fit:
        xs = np.logspace(3, 6.5, 50)
        ax.plot(xs, fit["a"] + fit["b_per_decade"] * np.log10(xs), color="black", linewidth=0.8, alpha=0.6,
                label=f"fit: {fit['b_per_decade']:.1f} AP per decade of views (R² {fit['r2']:.2f})")
    ax.axvline(1.4e6, color="red", linewidth=0.8, alpha=0.5, label="the paper's pre-training (~1.4M views)")
    ax.set_xscale("log")
    ax.set_xlabel("pre-training image views (steps × batch)")
    ax.set_ylabel("mask AP (%), 20 labels, Penn-Fudan val")
    ax.set_title("K-Net SP: fine-tuned mask AP against pre-training views (mean ± sd over seeds)")
    ax.legend(fontsize=7, loc="center right")
    save(fig, out)


def table(rows: dict) -> str:
    def number(value, spec: str) -> str:  # "–" for a figure this machine could not measure
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = ["| row | pseudo labels | photos | views | steps | px | wall min | CPU min | last loss (Dice s3) | "
             "own mask AP, COCO val | seeds | mask AP (20 labels) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        p, aps = row["pretrain"], [s["AP"] for s in row["seeds"].values()]
        m, sd = mean_sd(aps)
        losses, own = p.get("last_losses", {}), p.get("coco_val_agnostic", {})
        lines.append(f"| {name} | {SERIES.get(name, '')} | {p['photos']} | {p['views']:,} | {p['steps']:,} | "
                     f"{p['image_size']} | {number(p.get('wall_min'), '.0f')} | {number(p.get('cpu_min'), '.0f')} | "
                     f"{number(losses.get('loss'), '.2f')} ({number(losses.get('s3_dice'), '.2f')}) | "
                     f"{number(own.get('mask_AP'), '.2f')} | {len(aps)} | {m:.1f}"
                     + ("" if math.isnan(sd) else f" ± {sd:.1f}") + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "results" / "pretrain_scale")
    parser.add_argument("--record", type=Path, default=REPO / "experiments" / "pretrain_scale_results.json")
    parser.add_argument("--pretrain", action="append", default=[], metavar="ROW=FOLDER",
                        type=lambda text: (text.split("=", 1)[0], Path(text.split("=", 1)[1])),
                        help="the pre-training folder (with final.pth) of a row whose fine-tunings ran elsewhere ("
                             + ", ".join(RECORDED_IN_PENNFUDAN) + "), for its wall and CPU time, losses and own AP")
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "experiments" / "pretrain_scale.yaml").read_text())
    config["seeds"] = config.get("seeds", [0, 1, 2])
    recorded = json.loads(args.record.read_text())["rows"] if args.record.exists() else {}
    rows = collect(config, args.results, recorded, dict(args.pretrain))
    target, _ = baseline("maskrcnn_20")
    fit = crossing(rows, target)
    args.record.write_text(json.dumps({"rows": rows, "fit": fit}, indent=2))
    text = table(rows)
    if fit:
        text += (f"\n\nfit (saliency, 451 COCO photos; {fit['points']} seeds at {fit['levels']} view levels): AP = "
                 f"{fit['a']:.1f} + {fit['b_per_decade']:.1f} log10(views), R² {fit['r2']:.2f}; Mask R-CNN's "
                 f"{target:.1f} at {fit['views_at_target']:.3g} views (bootstrap over seeds, 5/50/95 %: "
                 + ", ".join(f"{v:.3g}" for v in fit["bootstrap_views_5_50_95"]) + ")\n")
    args.record.with_suffix(".md").write_text(text + "\n")
    chart(rows, fit, args.record.with_name("pretrain_scale.png"))
    print(text)


if __name__ == "__main__":
    main()
