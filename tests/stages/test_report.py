"""stages.report (`sp table`, `sp plot-losses`): rows over seeds, early-epoch AP, learning-curve bands,
pseudo-mask quality, loss curves, and the CLI's errors."""
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli_training import display_names
from stages.plots import seed_band
from stages.report import (COLUMNS, cell, curve_series, load_rows, loss_curves, mean_sd, pseudo_mask_table,
                           run_minutes, write_table)

NAN = float("nan")


def metrics(ap: float, aps: float = 5.0) -> dict:
    values = {"AP": ap, "AP50": ap + 10, "AP75": ap - 1, "APs": aps, "APm": ap, "APl": NAN}
    return {"segm": values, "bbox": {**values, "AP": ap / 2}, "images": 4}


def version(source: str, commit: str = "c0") -> dict:
    return {"source": source, "commit": commit, "dirty": False}


def write_run(tmp_path, name: str, ap: float, curve: dict[int, float], aps: float = 5.0, epoch_s: float = 60.0,
              parts: tuple[dict, ...] = ()):
    """An `sp evaluate` file and a metrics.jsonl whose epochs each took `epoch_s` seconds; with `parts`, the code
    versions of the run's parts (a start record, then a resume record per further part), the last of which
    trained the checkpoint and evaluated it, as `sp finetune` writes them."""
    eval_file, metrics_file = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
    versions = {"code_version": parts[-1], "eval_code_version": parts[-1]} if parts else {}
    eval_file.write_text(json.dumps({**metrics(ap, aps), **versions}))
    lines = [{"step": i, "epoch": 0, "event": "resume" if i else "start", "code_version": v, "time": 1e9}
             for i, v in enumerate(parts)]
    # training records carry no AP; the evaluation of epoch e is logged 5 s after its last step
    lines += [{"epoch": e, "step": 10 * e, "loss": 1.0, "time": 1e9 + epoch_s * e} for e in curve]
    lines += [{"epoch": e, "segm_AP": v, "bbox_AP": v / 2, "time": 1e9 + epoch_s * e + 5} for e, v in curve.items()]
    metrics_file.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return eval_file, metrics_file


def row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_mean_and_sample_sd_skip_nan_and_single_values_have_no_sd():
    assert mean_sd([10.0, 20.0, NAN]) == (15.0, statistics.stdev([10.0, 20.0]))
    assert math.isnan(mean_sd([3.0])[1]) and cell([3.0]) == "3.0"
    assert cell([NAN, NAN]) == "-" and cell([10.0, 20.0]) == "15.0 ± 7.1"
    assert cell([0.12, 0.15], decimals=2) == "0.14 ± 0.02"  # sub-percent AP stays readable


def test_table_decimals_reach_every_table(tmp_path):
    """`sp table --decimals 2`: the mask, box and pseudo-mask tables all show two digits."""
    run = write_run(tmp_path, "a0", 0.123, {1: 0.045})
    quality = tmp_path / "q.json"
    stats = {c: 0.0789 for c in (*COLUMNS, "AR100")}
    quality.write_text(json.dumps({"masks": 5, "images": 2, "segm": stats, "bbox": stats}))
    text = write_table([run[0]], ["sp"], tmp_path / "out", [run[1]], early_epochs=(1,), pseudo_masks={"s": quality},
                       decimals=2)
    mask_row, box_row = [line for line in text.splitlines() if line.startswith("| sp |")]
    assert mask_row.startswith("| sp | 1 | 0.12 |") and mask_row.endswith("| 0.04 | 0 |")  # AP, AP@e1, minutes
    assert box_row.startswith("| sp | 1 | 0.06 |")
    assert "| s | 5 | 2 | 0.08 |" in text


def test_run_minutes_leave_out_the_pause_of_a_resumed_run():
    """A run trained 2 minutes, was killed, and went on 48 minutes later for 3 more (its "resume" record written
    as it started again): 5 minutes; the same log without that record counts the pause."""
    first = [{"step": s, "loss": 1.0, "time": 60.0 * s} for s in (0, 1, 2)]
    later = [{"step": s, "loss": 1.0, "time": 3000.0 + 60.0 * (s - 2)} for s in (3, 4, 5)]
    resume = {"step": 2, "event": "resume", "time": 3000.0}
    assert run_minutes(first + [resume] + later) == 5.0
    assert run_minutes(first + later) == 53.0
    assert math.isnan(run_minutes([{"step": 1, "loss": 1.0, "time": 5.0}]))


def test_table_groups_seeds_under_one_name_and_reads_early_epochs(tmp_path):
    a0 = write_run(tmp_path, "a0", 10.0, {1: 1.0, 2: 4.0, 3: 8.0})
    a1 = write_run(tmp_path, "a1", 20.0, {1: 3.0, 2: 6.0, 3: 9.0}, aps=NAN, epoch_s=120.0)
    b0 = write_run(tmp_path, "b0", 30.0, {2: 12.0, 4: 20.0})  # evaluated every other epoch
    files = [a0, a1, b0]
    text = write_table([f[0] for f in files], ["sp", "sp", "scratch"], tmp_path / "out" / "results",
                       [f[1] for f in files], early_epochs=(1, 2))
    header = row(text, "run")
    assert header == ["run", "seeds", *COLUMNS, "AP@e1", "AP@e2", "min"]
    sp = dict(zip(header, row(text, "sp")))
    assert sp["seeds"] == "2" and sp["AP"] == "15.0 ± 7.1" and sp["AP50"] == "25.0 ± 7.1"
    assert sp["APs"] == "5.0"  # one seed had no small objects: the other alone
    assert sp["APl"] == "-" and sp["AP@e1"] == "2.0 ± 1.4" and sp["AP@e2"] == "5.0 ± 1.4"
    scratch = dict(zip(header, row(text, "scratch")))
    assert scratch["AP"] == "30.0" and scratch["AP@e1"] == "-" and scratch["AP@e2"] == "12.0"
    # wall minutes from the first to the last record: epochs 1-3 of 60 s and 120 s (+ 5 s), epochs 2-4 of 60 s
    assert sp["min"] == f"{(125 + 245) / 120:.0f} ± {statistics.stdev([125 / 60, 245 / 60]):.0f}"
    assert scratch["min"] == "2"
    assert "min" not in row(text.split("box AP")[1], "run")  # the box table has no time column
    assert text.index("| sp |") < text.index("| scratch |")  # first-seen order
    box = text.split("box AP")[1]
    assert row(box, "sp")[2] == "7.5 ± 3.5"  # the box table reads the bbox metrics
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["segm"]["AP"] for r in saved["runs"]["sp"]] == [10.0, 20.0]
    assert saved["runs"]["scratch"][0]["curve"] == {"2": 12.0, "4": 20.0}
    with Image.open(tmp_path / "out" / "results_curves.png") as im:
        assert im.size == (800, 480)


def test_rows_of_an_earlier_table_are_kept_where_their_runs_are_gone(tmp_path):
    """A committed results file, then on a fresh machine one seed rerun and one added: every row is in the
    table, in the asked order; the rerun replaces its record, the new seed joins the recorded one, and a row
    with no files left is as recorded (early epochs and minutes too)."""
    a, b = write_run(tmp_path, "a", 10.0, {1: 1.0, 2: 4.0}), write_run(tmp_path, "b", 30.0, {1: 2.0, 2: 8.0})
    c = write_run(tmp_path, "c", 50.0, {1: 5.0, 2: 9.0})
    first = write_table([a[0], b[0], c[0]], ["sp", "scratch", "scratch"], tmp_path / "first", [a[1], b[1], c[1]],
                        early_epochs=(1, 2))
    earlier = tmp_path / "first.json"
    rerun_c = write_run(tmp_path, "c", 70.0, {1: 6.0, 2: 10.0})  # the same file, evaluated again
    new_seed = write_run(tmp_path, "d", 20.0, {1: 1.0, 2: 3.0})
    runner = CliRunner()
    ok = runner.invoke(app, ["table", str(rerun_c[0]), str(new_seed[0]), "--names", "scratch,scratch",
                             "--metrics", str(rerun_c[1]), "--metrics", str(new_seed[1]), "--early-epochs", "1",
                             "--early-epochs", "2", "--include", str(earlier), "--rows", "sp,scratch", "--out",
                             str(tmp_path / "second")])
    assert ok.exit_code == 0, ok.output
    second = (tmp_path / "second.md").read_text()
    assert row(second, "sp") == row(first, "sp")  # AP, early epochs and minutes as recorded
    scratch = row(second, "scratch")
    assert scratch[1] == "3" and scratch[2] == cell([30.0, 70.0, 20.0]) and second.index("| sp |") < second.index("| scratch |")
    saved = json.loads((tmp_path / "second.json").read_text())["runs"]["scratch"]
    assert [r["file"] for r in saved] == [str(b[0]), str(c[0]), str(new_seed[0])]
    assert (tmp_path / "second_curves.png").is_file()
    only_earlier = write_table([], [], tmp_path / "third", early_epochs=(1, 2), earlier=earlier, order=["scratch"])
    assert row(only_earlier, "scratch") == row(first, "scratch") and "| sp |" not in only_earlier
    unknown = runner.invoke(app, ["table", "--include", str(earlier), "--rows", "sp,maskrcnn", "--out",
                                  str(tmp_path / "u")])
    assert unknown.exit_code != 0 and "maskrcnn" in unknown.output and "first.json" in unknown.output
    unlisted = runner.invoke(app, ["table", str(a[0]), "--names", "sp", "--include", str(earlier),
                                   "--rows", "scratch", "--out", str(tmp_path / "u")])
    assert unlisted.exit_code != 0 and "not in the table's rows: sp" in unlisted.output


def test_an_earlier_tables_files_match_however_the_path_is_spelled(tmp_path, monkeypatch):
    """The committed table recorded runs/a.json; rerun and given as ./runs/a.json or by its absolute path it
    replaces that seed instead of counting twice; one file given twice in a call is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    a = write_run(tmp_path / "runs", "a", 10.0, {1: 1.0})
    write_run(tmp_path / "runs", "b", 30.0, {1: 2.0})
    write_table([Path("runs/a.json"), Path("runs/b.json")], ["sp", "sp"], tmp_path / "first")
    rerun = write_run(tmp_path / "runs", "a", 20.0, {1: 1.0})
    for spelled in ("./runs/a.json", str(rerun[0]), "runs/../runs/a.json"):
        text = write_table([Path(spelled)], ["sp"], tmp_path / "second", earlier=tmp_path / "first.json")
        assert row(text, "sp")[1:3] == ["2", cell([30.0, 20.0])], spelled
    saved = json.loads((tmp_path / "second.json").read_text())["runs"]["sp"]
    assert sorted(r["file"] for r in saved) == ["runs/a.json", "runs/b.json"]  # as spelled last, normalised
    with pytest.raises(ValueError, match="runs/a.json is given twice"):
        write_table([a[0], Path("./runs/a.json")], ["sp", "sp"], tmp_path / "third")


def test_seeds_of_different_code_are_refused_unless_allowed_and_then_counted(tmp_path):
    """Seeds whose 'source' hashes differ (or whose version is unknown: older runs) make a row of mixed code: it
    is refused, naming the row and its files; with --allow-mixed the row shows how many versions it averages and
    OUT.json lists them. A commit that changed no code (same source) is the same version."""
    runner = CliRunner()
    same = [write_run(tmp_path, "s0", 10.0, {1: 1.0}, parts=(version("aaa", "c1"),)),
            write_run(tmp_path, "s1", 20.0, {1: 2.0}, parts=(version("aaa", "c2"),))]  # a doc-only commit
    other = write_run(tmp_path, "o", 30.0, {1: 3.0}, parts=(version("bbb"),))
    unknown = write_run(tmp_path, "u", 40.0, {1: 4.0})  # a run from before versions were recorded
    resumed = write_run(tmp_path, "r", 50.0, {1: 5.0}, parts=(version("aaa"), version("bbb")))  # resumed on new code

    def table(runs, names, *flags, with_metrics=True):
        args = ["table", *(str(r[0]) for r in runs), "--names", ",".join(names), "--out", str(tmp_path / "t"), *flags]
        return runner.invoke(app, args + [a for r in runs for a in ("--metrics", str(r[1]))] if with_metrics else args)

    ok = table(same + [other], ["sp", "sp", "scratch"])
    assert ok.exit_code == 0, ok.output
    assert "versions" not in ok.output
    assert json.loads((tmp_path / "t.json").read_text())["code_versions"] == {"sp": ["aaa"], "scratch": ["bbb"]}
    assert json.loads((tmp_path / "t.json").read_text())["runs"]["sp"][1]["code_versions"] == [version("aaa", "c2")]
    for runs, keys in [([same[0], other], ["aaa", "bbb"]), ([same[0], unknown], ["aaa", "unknown"]),
                       ([same[0], resumed], ["aaa", "aaa+bbb"])]:
        for with_metrics in (True, False):  # the eval files alone know the checkpoint's version
            refused = table(runs, ["sp", "sp"], with_metrics=with_metrics)
            text = " ".join(refused.output.split())
            assert refused.exit_code == 2 and "rows sp average seeds of different code versions" in text
            assert str(runs[1][0]) in text and "--allow-mixed" in text
        allowed = table(runs, ["sp", "sp"], "--allow-mixed")
        assert allowed.exit_code == 0, allowed.output
        md = (tmp_path / "t.md").read_text()
        assert row(md, "run")[-1] == "versions" and row(md, "sp")[-1] == "2"
        assert json.loads((tmp_path / "t.json").read_text())["code_versions"]["sp"] == keys


def test_recorded_seeds_without_a_file_are_replaced_only_when_asked(tmp_path):
    """A table from before records named their file (experiments/coco_results.json): new evaluation files of one
    of its rows cannot be matched with its seeds, so the row is refused rather than doubled; --replace-fileless
    makes the new files the row. Rows given no files keep their records, and the pseudo-mask section is kept
    unless new is given."""
    old = [{**metrics(ap), "curve": {"1": ap / 10}} for ap in (10.0, 20.0)]
    stats = {c: 50.0 for c in (*COLUMNS, "AR100")}
    earlier = tmp_path / "coco_results.json"
    earlier.write_text(json.dumps({"runs": {"sp": old, "scratch": old},
                                   "pseudo_masks": {"saliency": {"segm": stats, "bbox": stats, "images": 2, "masks": 3}}}))
    new = write_run(tmp_path, "n", 50.0, {1: 5.0})
    runner = CliRunner()
    args = ["table", str(new[0]), "--names", "sp", "--metrics", str(new[1]), "--include", str(earlier), "--out",
            str(tmp_path / "t")]
    refused = runner.invoke(app, args)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "row sp:" in text and "2 seed(s) without an evaluation file" in text
    replaced = runner.invoke(app, args + ["--replace-fileless"])
    assert replaced.exit_code == 0, replaced.output
    md = (tmp_path / "t.md").read_text()
    assert row(md, "sp")[1:3] == ["1", "50.0"] and row(md, "scratch")[1:3] == ["2", cell([10.0, 20.0])]
    assert "| saliency | 3 | 2 | 50.0 |" in md  # kept from the earlier table
    assert json.loads((tmp_path / "t.json").read_text())["pseudo_masks"]["saliency"]["masks"] == 3
    quality = tmp_path / "q.json"
    quality.write_text(json.dumps({"segm": stats, "bbox": stats, "images": 4, "masks": 9}))
    given = runner.invoke(app, args + ["--replace-fileless", "--pseudo-masks", f"refined={quality}"])
    assert given.exit_code == 0, given.output
    md = (tmp_path / "t.md").read_text()
    assert "| refined | 9 | 4 |" in md and "| saliency |" not in md


def test_pseudo_mask_table_with_missing_size_ranges():
    stats = {"AP": 25.0, "AP50": 50.0, "AP75": 12.5, "APs": NAN, "APm": 20.0, "APl": 30.0, "AR100": 40.0}
    text = pseudo_mask_table({"saliency": {"segm": stats, "bbox": {**stats, "AP": 10.0}, "images": 8, "masks": 40}})
    assert row(text, "saliency") == ["saliency", "40", "8", "25.0", "50.0", "12.5", "-", "20.0", "30.0", "10.0", "40.0"]


def test_cli_writes_the_tables_and_names_bad_arguments(tmp_path):
    a0 = write_run(tmp_path, "a0", 10.0, {1: 1.0})
    quality = tmp_path / "q.json"
    stats = {c: 50.0 for c in (*COLUMNS, "AR100")}
    quality.write_text(json.dumps({"segm": stats, "bbox": stats, "images": 2, "masks": 3}))
    runner = CliRunner()
    ok = runner.invoke(app, ["table", str(a0[0]), "--names", "sp", "--out", str(tmp_path / "t"), "--metrics",
                             str(a0[1]), "--early-epochs", "1", "--pseudo-masks", f"saliency={quality}"])
    assert ok.exit_code == 0, ok.output
    written = (tmp_path / "t.md").read_text()
    assert "| sp | 1 | 10.0 |" in written and "| saliency | 3 | 2 | 50.0 |" in written
    two_names = runner.invoke(app, ["table", str(a0[0]), "--names", "a,b", "--out", str(tmp_path / "u")])
    assert two_names.exit_code != 0 and "2 names for 1 files" in two_names.output
    no_metrics = runner.invoke(app, ["table", str(a0[0]), "--names", "a", "--out", str(tmp_path / "u"),
                                     "--early-epochs", "1"])
    assert no_metrics.exit_code != 0 and "metrics.jsonl" in no_metrics.output
    bad_quality = runner.invoke(app, ["table", str(a0[0]), "--names", "a", "--out", str(tmp_path / "u"),
                                      "--pseudo-masks", str(quality)])
    assert bad_quality.exit_code != 0 and "NAME=FILE" in bad_quality.output


def test_curve_band_of_a_row_is_the_mean_and_sd_of_its_seeds_at_each_epoch(tmp_path):
    runs = [write_run(tmp_path, "s0", 1.0, {1: 1.0, 2: 4.0, 4: 9.0}),
            write_run(tmp_path, "s1", 1.0, {1: 2.0, 2: 7.0}),  # stopped before epoch 4
            write_run(tmp_path, "s2", 1.0, {2: 5.0, 4: 12.0})]  # first evaluated at epoch 2
    rows = load_rows([r[0] for r in runs], ["sp"] * 3, [r[1] for r in runs])
    epochs, mean, sd = seed_band(curve_series(rows)["sp"])
    at = {1: [1.0, 2.0], 2: [4.0, 7.0, 5.0], 4: [9.0, 12.0]}
    np.testing.assert_array_equal(epochs, [1, 2, 4])
    np.testing.assert_allclose(mean, [np.mean(at[e]) for e in (1, 2, 4)])
    np.testing.assert_allclose(sd, [np.std(at[e], ddof=1) for e in (1, 2, 4)])


def write_pretrain_log(folder, kernel: bool):
    """A `sp pretrain`-style metrics.jsonl: training records every 5 steps (an evaluation-like record too)."""
    folder.mkdir(parents=True)
    lines = []
    for step in (5, 10, 15):
        losses = {"s0_dice": 1.0 / step, "s1_cls": 2.0 / step, **({"kernel": 0.5} if kernel else {})}
        lines.append({"step": step, "epoch": 0, "lr": 1e-4, "loss": sum(losses.values()), "grad_norm": 3.0,
                      "img_per_s": 2.0, **losses, "time": 1.0})
    lines.append({"step": 15, "epoch": 1, "segm_AP": 3.0})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return folder


def test_loss_curves_are_the_logged_terms_against_step(tmp_path):
    curves = loss_curves(write_pretrain_log(tmp_path / "run", kernel=True) / "metrics.jsonl")
    assert list(curves) == ["loss", "s0_dice", "s1_cls", "kernel"]
    assert curves["s1_cls"] == [(5, 0.4), (10, 0.2), (15, 2.0 / 15)]
    assert curves["loss"][0] == (5, 0.2 + 0.4 + 0.5)


def test_plot_losses_cli_draws_runs_with_different_terms_and_names_bad_input(tmp_path):
    sp = write_pretrain_log(tmp_path / "sp" / "seed0", kernel=True)
    plain = write_pretrain_log(tmp_path / "plain" / "seed0", kernel=False)
    runner = CliRunner()
    ok = runner.invoke(app, ["plot-losses", str(sp), str(plain / "metrics.jsonl"), "--out", str(tmp_path / "l.png")])
    assert ok.exit_code == 0, ok.output
    with Image.open(tmp_path / "l.png") as im:
        pixels = np.asarray(im.convert("L"))
    assert im.size[0] > 1000 and pixels.std() > 10  # four panels side by side, not blank
    wrong = runner.invoke(app, ["plot-losses", str(sp), "--names", "a,b", "--out", str(tmp_path / "m.png")])
    assert wrong.exit_code == 2 and "2 names for 1 runs" in wrong.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "segm_AP": 1.0}) + "\n")
    empty = runner.invoke(app, ["plot-losses", str(tmp_path / "empty"), "--out", str(tmp_path / "n.png")])
    assert empty.exit_code == 2 and "no training records" in empty.output


def test_default_names_are_the_shortest_path_endings_that_differ(tmp_path):
    paths = [tmp_path / "runs" / row / "seed0" / "last.pth" for row in ("sp", "scratch")]
    assert display_names(paths, None, "checkpoints") == ["sp/seed0/last", "scratch/seed0/last"]
    assert display_names(paths[:1], None, "checkpoints") == ["last"]
    assert display_names(paths, "a,b", "checkpoints") == ["a", "b"]
