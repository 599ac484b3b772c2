"""`sp table`: the results table (markdown and JSON) of several evaluated fine-tuning runs; `sp plot-losses`:
the training-loss curves of runs side by side.

A row is a setting; several files under one name are its seeds, shown as mean ± sample standard deviation.
With the runs' metrics.jsonl the table adds the mask AP after the first fine-tuning epochs (the convergence
claim of the paper's Figure 3) and each run's wall minutes, and a plot of every row's mean learning curve with
a ±1 sd band; with `sp eval-masks` files it adds the class-agnostic quality of the pseudo masks (Table 6).

Every record carries the code versions its seed ran (stages/code_version.py): a row whose seeds ran different
code is refused unless asked (`allow_mixed`), and then says how many versions it mixes.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from stages.plots import Points, line_chart, panel_chart

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
NOT_LOSSES = {"step", "epoch", "lr", "grad_norm", "img_per_s", "cpu_s", "time"}  # the other keys of a training record


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the values that are numbers (NaN: no GT in that size range);
    (NaN, NaN) when none is, sd NaN for a single value."""
    numbers = [v for v in values if not math.isnan(v)]
    if not numbers:
        return math.nan, math.nan
    return statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else math.nan


def cell(values: list[float], decimals: int = 1) -> str:
    mean, sd = mean_sd(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{decimals}f}" if math.isnan(sd) else f"{mean:.{decimals}f} ± {sd:.{decimals}f}"


def read_metrics(metrics_file: Path) -> list[dict]:
    return [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]


def epoch_ap(records: list[dict]) -> dict[int, float]:
    """{epoch: mask AP on the validation set} from the records of a `sp finetune` metrics.jsonl."""
    return {int(r["epoch"]): float(r["segm_AP"]) for r in records if "segm_AP" in r}


def run_minutes(records: list[dict]) -> float:
    """Wall minutes from the first to the last of a metrics.jsonl's records (each carries its 'time'): the run's
    training and evaluations, without the model's set-up before the first logged step. A resumed run sums its
    parts, each from its "resume" record (written by the training loop) to its last record, so the pause and
    the set-up after it are left out. NaN without times."""
    parts = [[]]
    for record in records:
        if record.get("event") == "resume":
            parts.append([])
        if "time" in record:
            parts[-1].append(record["time"])
    spans = [max(times) - min(times) for times in parts if len(times) > 1]
    return sum(spans) / 60 if spans else math.nan


def loss_curves(metrics_file: Path) -> dict[str, Points]:
    """{loss term: [(step, value), ...]} from the training records (those with a 'loss') of a `sp pretrain` or
    `sp finetune` metrics.jsonl, terms in the order logged: the total 'loss', then s0_dice, s0_mask, ..., kernel."""
    curves: dict[str, Points] = {}
    for record in read_metrics(metrics_file):
        if "loss" in record:
            for term, value in record.items():
                if term not in NOT_LOSSES:
                    curves.setdefault(term, []).append((record["step"], float(value)))
    return curves


def plot_losses(metrics_files: list[Path], names: list[str], out_png: Path) -> Path:
    """One panel per loss term, one line per run (loss against step), to compare pre-training runs."""
    if len(names) != len(metrics_files):
        raise ValueError(f"{len(names)} names for {len(metrics_files)} runs")
    panels: dict[str, dict[str, Points]] = {}
    for name, path in zip(names, metrics_files):
        curves = loss_curves(path)
        if not curves:
            raise ValueError(f"{path} has no training records (lines with a 'loss')")
        for term, points in curves.items():
            panels.setdefault(term, {})[name] = points
    return panel_chart(panels, out_png, xlabel="step")


def run_code_versions(evaluation: dict, logged: list[dict] = ()) -> list[dict]:
    """The code versions a seed was trained with, distinct by 'source', in the order run: every part of the run
    (the metrics.jsonl's start and resume records), else the checkpoint's as the evaluation file recorded it
    ('code_version'); [] where neither is recorded (runs from before versions were)."""
    parts = [r["code_version"] for r in logged if r.get("event") in ("start", "resume") and r.get("code_version")]
    if not parts and evaluation.get("code_version"):
        parts = [evaluation["code_version"]]
    distinct = {}
    for version in parts:
        distinct.setdefault(version["source"], version)
    return list(distinct.values())


def version_key(record: dict) -> str:
    """Which code a table record ran, for comparing seeds: the 'source' hashes of its training parts ('unknown'
    where none is recorded) and of its evaluation where that differs, joined by '+'."""
    sources = [v["source"] for v in record.get("code_versions", [])] or ["unknown"]
    if (evaluated := record.get("eval_code_version")) and evaluated["source"] != sources[-1]:
        sources.append(evaluated["source"])
    return "+".join(sources)


def file_key(path: str | Path) -> str:
    """One spelling of a path for matching files (./runs/x, runs/x and its absolute path are the same file)."""
    return os.path.normpath(os.path.abspath(path))


def load_rows(eval_files: list[Path], names: list[str], metrics_files: list[Path] = ()) -> dict[str, list[dict]]:
    """{row name: one record per seed}, rows in first-seen order; a record is the `sp evaluate` metrics,
    plus 'curve' ({epoch: mask AP}) and 'minutes' (`run_minutes`) where metrics files are given (one per eval
    file, in the same order), 'code_versions' (`run_code_versions`; the evaluation's stays 'eval_code_version')
    and 'file', the evaluation file it came from (normalised)."""
    if len(names) != len(eval_files):
        raise ValueError(f"{len(names)} names for {len(eval_files)} files")
    if metrics_files and len(metrics_files) != len(eval_files):
        raise ValueError(f"{len(metrics_files)} metrics files for {len(eval_files)} evaluation files")
    rows: dict[str, list[dict]] = {}
    seen: dict[str, int] = {}
    for i, (name, path) in enumerate(zip(names, eval_files)):
        if (first := seen.setdefault(file_key(path), i)) != i:
            raise ValueError(f"evaluation file {path} is given twice (also as {eval_files[first]})")
        record = {**json.loads(Path(path).read_text()), "file": os.path.normpath(path)}
        logged = read_metrics(metrics_files[i]) if metrics_files else []
        if metrics_files:
            record["curve"], record["minutes"] = epoch_ap(logged), run_minutes(logged)
        record["code_versions"] = run_code_versions(record, logged)
        record.pop("code_version", None)  # the checkpoint's: one of code_versions
        rows.setdefault(name, []).append(record)
    return rows


def read_table(path: Path) -> dict:
    """An earlier OUT.json of `write_table`: {'runs': {row: records}, 'pseudo_masks': {...}}."""
    table = json.loads(Path(path).read_text())
    for records in table["runs"].values():  # JSON turned the curves' epochs into strings
        for r in records:
            r["curve"] = {int(e): ap for e, ap in r.get("curve", {}).items()}
    return table


def select_rows(rows: dict[str, list[dict]], recorded: dict[str, list[dict]] | None = None, order: list[str] = (),
                replace_fileless: bool = False, source: str = "the earlier table") -> dict[str, list[dict]]:
    """The table's rows in `order` (default: `rows`' own, then the recorded others). `recorded` holds the rows
    of an earlier table (`source`, a committed results file whose runs are no longer on disk): a row has the
    records it recorded, but for the evaluation files this call reads again (the same file however spelled:
    those replace them), then this call's other records (seeds run since).

    A recorded record without a 'file' (tables from before records named one) cannot be matched with a file:
    a row given files here while it has such records is an error, unless `replace_fileless`, which drops them
    (the row is then this call's records and the recorded ones with files)."""
    recorded = recorded or {}
    order = list(order) or [*rows, *(name for name in recorded if name not in rows)]
    if unlisted := [name for name in rows if name not in order]:
        raise ValueError(f"evaluated rows not in the table's rows: {', '.join(unlisted)}")
    if missing := [name for name in order if name not in rows and name not in recorded]:
        raise ValueError(f"no evaluation files and no record in {source} for: {', '.join(missing)}")
    table = {}
    for name in order:
        given = {file_key(r["file"]) for r in rows.get(name, [])}
        kept = [r for r in recorded.get(name, []) if "file" not in r or file_key(r["file"]) not in given]
        if given and (fileless := sum("file" not in r for r in kept)):
            if not replace_fileless:
                raise ValueError(f"row {name}: {source} records {fileless} seed(s) without an evaluation file, "
                                 "which this call's files cannot be matched with; pass --replace-fileless to "
                                 "replace them by this call's files, or give the row no files to keep them")
            kept = [r for r in kept if "file" in r]
        table[name] = kept + rows.get(name, [])
    return table


def row_versions(rows: dict[str, list[dict]], allow_mixed: bool = False) -> dict[str, list[str]]:
    """{row: the distinct `version_key`s of its records}. A row of several (its seeds ran different code, or
    some ran unknown code) is an error naming its files, unless `allow_mixed`."""
    versions = {name: sorted({version_key(r) for r in records}) for name, records in rows.items()}
    mixed = [name for name, keys in versions.items() if len(keys) > 1]
    if mixed and not allow_mixed:
        name = mixed[0]
        detail = "; ".join(f"{key}: " + ", ".join(r.get("file", "(recorded without a file)") for r in rows[name]
                                                  if version_key(r) == key) for key in versions[name])
        raise ValueError(f"rows {', '.join(mixed)} average seeds of different code versions ({name}: {detail}); "
                         "rerun the seeds with one version, or pass --allow-mixed to average them anyway (the "
                         "table then counts the versions of each row)")
    return versions


def results_table(rows: dict[str, list[dict]], iou_type: str = "segm", early_epochs: tuple[int, ...] = (),
                  decimals: int = 1, versions: dict[str, list[str]] | None = None) -> str:
    """Markdown table, one row per setting, AP columns in percent (mean ± sd over seeds), then 'AP@eK': the
    mask AP after fine-tuning epoch K ('-' where a run has no evaluation at that epoch), and 'min', the runs'
    wall minutes, where the records have them (the mask table of runs with metrics files); last 'versions',
    how many code versions a row's seeds ran, where a row mixes several (`row_versions`)."""
    minutes = iou_type == "segm" and any("minutes" in r for records in rows.values() for r in records)
    mixed = any(len(keys) > 1 for keys in (versions or {}).values())
    header = [*COLUMNS, *(f"AP@e{e}" for e in early_epochs), *(["min"] if minutes else []),
              *(["versions"] if mixed else [])]
    lines = ["| run | seeds | " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(header)]
    for name, records in rows.items():
        cells = [cell([r[iou_type][c] for r in records], decimals) for c in COLUMNS]
        cells += [cell([r.get("curve", {}).get(e, math.nan) for r in records], decimals) for e in early_epochs]
        cells += [cell([r.get("minutes", math.nan) for r in records], 0)] if minutes else []
        cells += [str(len(versions[name]))] if mixed else []
        lines.append(f"| {name} | {len(records)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pseudo_mask_table(quality: dict[str, dict], decimals: int = 1) -> str:
    """Markdown table of `sp eval-masks` results (percent), one row per store."""
    lines = ["| store | masks | images | " + " | ".join(f"mask {c}" for c in COLUMNS) + " | box AP | AR100 |",
             "|---|---:|---:|" + "---:|" * (len(COLUMNS) + 2)]
    for name, q in quality.items():
        cells = [cell([q[iou][c]], decimals) for iou, c in [*(("segm", c) for c in COLUMNS), ("bbox", "AP"), ("segm", "AR100")]]
        lines.append(f"| {name} | {q['masks']} | {q['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_series(rows: dict[str, list[dict]]) -> dict[str, list[Points]]:
    """{row name: one [(epoch, mask AP), ...] per seed}, for `line_chart`."""
    return {name: [sorted(r["curve"].items()) for r in records] for name, records in rows.items()}


def plot_curves(rows: dict[str, list[dict]], out_png: Path) -> Path:
    """Mask AP against fine-tuning epoch, one line per row: the mean over its seeds with a ±1 sample-sd band
    (at each epoch, over the seeds evaluated there)."""
    return line_chart(curve_series(rows), out_png, xlabel="epoch", ylabel="mask AP (%)",
                      title="Fine-tuning: mask AP on the validation set (mean ± sd over seeds)")


def write_table(eval_files: list[Path], names: list[str], out_prefix: Path, metrics_files: list[Path] = (),
                early_epochs: tuple[int, ...] = (), pseudo_masks: dict[str, Path] | None = None,
                decimals: int = 1, earlier: Path | None = None, order: list[str] = (), replace_fileless: bool = False,
                allow_mixed: bool = False) -> str:
    """Writes OUT.md (mask table, box table, pseudo-mask quality; numbers in percent with `decimals` digits),
    OUT.json (every number, and each row's code versions) and, where the rows have learning curves,
    OUT_curves.png; returns the markdown. `earlier`, `order` and `replace_fileless`: rows kept from an earlier
    OUT.json, and the rows' order (`select_rows`); the earlier pseudo-mask quality is kept unless new is given.
    `allow_mixed`: average seeds of different code versions (`row_versions`)."""
    if early_epochs and not metrics_files and earlier is None:
        raise ValueError("early-epoch columns need the runs' metrics.jsonl files")
    recorded = read_table(earlier) if earlier is not None else {"runs": {}}
    rows = select_rows(load_rows(eval_files, names, metrics_files), recorded["runs"], order, replace_fileless,
                       str(earlier or "(no earlier table given)"))
    versions = row_versions(rows, allow_mixed)
    quality = {name: json.loads(Path(p).read_text()) for name, p in (pseudo_masks or {}).items()}
    quality = quality or recorded.get("pseudo_masks", {})
    text = (f"mask AP\n\n{results_table(rows, 'segm', tuple(early_epochs), decimals, versions)}\n\n"
            f"box AP\n\n{results_table(rows, 'bbox', decimals=decimals, versions=versions)}\n")
    if any(len(keys) > 1 for keys in versions.values()):
        text += (f"\nversions: rows whose seeds ran more than one code version (`--allow-mixed`); "
                 f"{out_prefix.with_suffix('.json').name} lists them under code_versions\n")
    if quality:
        text += ("\npseudo masks (class-agnostic, on the unlabeled images' ground truth)\n\n"
                 f"{pseudo_mask_table(quality, decimals)}\n")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    out_prefix.with_suffix(".md").write_text(text)
    out_prefix.with_suffix(".json").write_text(json.dumps({"runs": rows, "pseudo_masks": quality,
                                                           "code_versions": versions}, indent=2))
    if rows and all(r.get("curve") for records in rows.values() for r in records):
        plot_curves(rows, out_prefix.with_name(out_prefix.name + "_curves.png"))
    return text
