"""stages.compare (`sp compare`): one column per checkpoint (ground truth first), one row per photo, only the
detections above the threshold drawn, and the CLI's output and errors."""
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from stages.compare import comparison_figure, prediction_overlays
from tiny_checkpoints import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return [tiny_checkpoint(folder / "knet" / "last.pth", num_kernels=8),
            tiny_checkpoint(folder / "maskrcnn" / "last.pth", model_kind="maskrcnn")]


def val_files(demo, n):
    return [img["file_name"] for img in json.loads(demo["val_ann"].read_text())["images"][:n]]


def test_figure_has_a_column_per_checkpoint_after_the_ground_truth_and_a_row_per_photo(demo, checkpoints):
    files = val_files(demo, 2)
    fig = comparison_figure(checkpoints, ["knet", "mask r-cnn"], demo["val"], files, score_threshold=0.0,
                            ann=demo["val_ann"], device="cpu", workers=0)
    assert len(fig.axes) == 2 * 3 and all(len(ax.images) == 1 for ax in fig.axes)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["ground truth", "knet", "mask r-cnn"]
    assert [fig.axes[0].get_ylabel(), fig.axes[3].get_ylabel()] == files
    no_gt = comparison_figure(checkpoints[:1], ["knet"], demo["val"], limit=3, device="cpu", workers=0)
    assert len(no_gt.axes) == 3 and no_gt.axes[0].get_title() == "knet"


def test_only_detections_above_the_threshold_are_drawn(demo, checkpoints):
    name = val_files(demo, 1)
    with Image.open(demo["val"] / name[0]) as im:
        photo = np.asarray(im.convert("RGB"))
    nothing, = prediction_overlays(checkpoints[0], demo["val"], name, score_threshold=1.01, workers=0)
    everything, = prediction_overlays(checkpoints[0], demo["val"], name, score_threshold=0.0, workers=0)
    np.testing.assert_array_equal(np.asarray(nothing), photo)
    assert (np.asarray(everything) != photo).any(axis=2).mean() > 0.05


def test_cli_writes_the_png_and_names_bad_input(demo, checkpoints, tmp_path):
    runner = CliRunner()
    files = ",".join(val_files(demo, 2))
    base = ["compare", *map(str, checkpoints), "--images", str(demo["val"]), "--workers", "0", "--device", "cpu"]
    ok = runner.invoke(app, [*base, "--files", files, "--ann", str(demo["val_ann"]), "--out", str(tmp_path / "c.png")])
    assert ok.exit_code == 0, ok.output
    with Image.open(tmp_path / "c.png") as im:
        pixels = np.asarray(im.convert("L"))
    assert im.size[0] > 3 * 300 and pixels.std() > 10
    missing = runner.invoke(app, [*base, "--files", "nope.jpg", "--out", str(tmp_path / "d.png")])
    assert missing.exit_code == 2 and "nope.jpg is not a file" in missing.output
    names = runner.invoke(app, [*base, "--names", "one", "--out", str(tmp_path / "e.png")])
    assert names.exit_code == 2 and "1 names for 2 checkpoints" in names.output

