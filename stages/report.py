"""`sp table`: one AP table (markdown and JSON) from several `sp evaluate --out` files."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def results_table(runs: dict[str, dict], iou_type: str = "segm") -> str:
    """Markdown table, one row per run (name → coco_evaluate metrics), AP columns in percent."""
    lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, metrics in runs.items():
        values = metrics[iou_type]
        cells = ["-" if values[c] != values[c] else f"{values[c]:.1f}" for c in COLUMNS]  # NaN → '-'
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(eval_files: list[Path], names: list[str], out_prefix: Path) -> str:
    """Reads the metrics files, writes OUT.md (mask and box tables) and OUT.json; returns the markdown."""
    if len(names) != len(eval_files):
        raise ValueError(f"{len(names)} names for {len(eval_files)} files")
    runs = {name: json.loads(Path(f).read_text()) for name, f in zip(names, eval_files)}
    text = f"mask AP\n\n{results_table(runs, 'segm')}\n\nbox AP\n\n{results_table(runs, 'bbox')}\n"
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    out_prefix.with_suffix(".md").write_text(text)
    out_prefix.with_suffix(".json").write_text(json.dumps(runs, indent=2))
    return text
