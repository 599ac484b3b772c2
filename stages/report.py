"""`sp table`: the results table (markdown and JSON) of several evaluated fine-tuning runs.

A row is a setting; several files under one name are its seeds, shown as mean ± sample standard deviation.
With the runs' metrics.jsonl the table adds the mask AP after the first fine-tuning epochs (the convergence
claim of the paper's Figure 3) and a plot of every row's mean learning curve; with `sp eval-masks` files it adds
the class-agnostic quality of the pseudo masks (Table 6).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from pipeline.plots import line_chart

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the values that are numbers (NaN: no GT in that size range);
    (NaN, NaN) when none is, sd NaN for a single value."""
    numbers = [v for v in values if not math.isnan(v)]
    if not numbers:
        return math.nan, math.nan
    return statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else math.nan


def cell(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f}" if math.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"


def epoch_ap(metrics_file: Path) -> dict[int, float]:
    """{epoch: mask AP on the validation set} from a `sp finetune` metrics.jsonl."""
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    return {int(r["epoch"]): float(r["segm_AP"]) for r in records if "segm_AP" in r}


def load_rows(eval_files: list[Path], names: list[str], metrics_files: list[Path] = ()) -> dict[str, list[dict]]:
    """{row name: one record per seed}, rows in first-seen order; a record is the `sp evaluate` metrics,
    plus 'curve' ({epoch: mask AP}) where metrics files are given (one per eval file, in the same order)."""
    if len(names) != len(eval_files):
        raise ValueError(f"{len(names)} names for {len(eval_files)} files")
    if metrics_files and len(metrics_files) != len(eval_files):
        raise ValueError(f"{len(metrics_files)} metrics files for {len(eval_files)} evaluation files")
    rows: dict[str, list[dict]] = {}
    for i, (name, path) in enumerate(zip(names, eval_files)):
        record = json.loads(Path(path).read_text())
        if metrics_files:
            record["curve"] = epoch_ap(metrics_files[i])
        rows.setdefault(name, []).append(record)
    return rows


def results_table(rows: dict[str, list[dict]], iou_type: str = "segm", early_epochs: tuple[int, ...] = ()) -> str:
    """Markdown table, one row per setting, AP columns in percent (mean ± sd over seeds), then 'AP@eK': the
    mask AP after fine-tuning epoch K ('-' where a run has no evaluation at that epoch)."""
    header = [*COLUMNS, *(f"AP@e{e}" for e in early_epochs)]
    lines = ["| run | seeds | " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(header)]
    for name, records in rows.items():
        cells = [cell([r[iou_type][c] for r in records]) for c in COLUMNS]
        cells += [cell([r.get("curve", {}).get(e, math.nan) for r in records]) for e in early_epochs]
        lines.append(f"| {name} | {len(records)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pseudo_mask_table(quality: dict[str, dict]) -> str:
    """Markdown table of `sp eval-masks` results (percent), one row per store."""
    lines = ["| store | masks | images | " + " | ".join(f"mask {c}" for c in COLUMNS) + " | box AP | AR100 |",
             "|---|---:|---:|" + "---:|" * (len(COLUMNS) + 2)]
    for name, q in quality.items():
        cells = [cell([q["segm"][c]]) for c in COLUMNS] + [cell([q["bbox"]["AP"]]), cell([q["segm"]["AR100"]])]
        lines.append(f"| {name} | {q['masks']} | {q['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(rows: dict[str, list[dict]], out_png: Path) -> Path:
    """Mean mask AP against fine-tuning epoch, one line per row (epochs that every seed evaluated)."""
    series = {}
    for name, records in rows.items():
        epochs = sorted(set.intersection(*(set(r["curve"]) for r in records)))
        series[name] = [(e, statistics.fmean(r["curve"][e] for r in records)) for e in epochs]
    return line_chart(series, out_png, title="Fine-tuning: mask AP on the validation set (mean over seeds)",
                      xlabel="epoch", ylabel="mask AP (%)", size=(800, 480))


def write_table(eval_files: list[Path], names: list[str], out_prefix: Path, metrics_files: list[Path] = (),
                early_epochs: tuple[int, ...] = (), pseudo_masks: dict[str, Path] | None = None) -> str:
    """Writes OUT.md (mask table, box table, pseudo-mask quality), OUT.json (every number) and, with metrics
    files, OUT_curves.png; returns the markdown."""
    if early_epochs and not metrics_files:
        raise ValueError("early-epoch columns need the runs' metrics.jsonl files")
    rows = load_rows(eval_files, names, metrics_files)
    quality = {name: json.loads(Path(p).read_text()) for name, p in (pseudo_masks or {}).items()}
    text = (f"mask AP\n\n{results_table(rows, 'segm', tuple(early_epochs))}\n\n"
            f"box AP\n\n{results_table(rows, 'bbox')}\n")
    if quality:
        text += f"\npseudo masks (class-agnostic, on the unlabeled images' ground truth)\n\n{pseudo_mask_table(quality)}\n"
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    out_prefix.with_suffix(".md").write_text(text)
    out_prefix.with_suffix(".json").write_text(json.dumps({"runs": rows, "pseudo_masks": quality}, indent=2))
    if metrics_files:
        plot_curves(rows, out_prefix.with_name(out_prefix.name + "_curves.png"))
    return text
