"""The CLI: errors name the bad input and exit with status 2; the commands chain as README shows; it starts
without importing torch."""
import json
import subprocess
import sys

from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
TINY = ["--backbone", "resnet18", "--backbone-weights", "none", "--image-size", "128", "--max-size", "192", "--workers", "0", "--device", "cpu"]


def test_gen_masks_on_an_empty_folder_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["gen-masks", str(tmp_path / "empty"), "--store", str(tmp_path / "s.zarr"), *TINY])
    assert result.exit_code == 2
    assert "holds no images" in result.output and "empty" in result.output


def test_bad_shard_is_refused(demo, tmp_path):
    result = runner.invoke(app, ["gen-masks", str(demo["unlabeled"]), "--store", str(tmp_path / "s.zarr"),
                                 "--shard", "3/3", *TINY])
    assert result.exit_code == 2 and "0 <= I < N" in result.output


def test_gen_masks_then_info_export_merge(demo, tmp_path):
    for i in range(2):
        result = runner.invoke(app, ["gen-masks", str(demo["unlabeled"]), "--store", str(tmp_path / "s.zarr"),
                                     "--shard", f"{i}/2", "--limit", "6", "--batch-size", "2", *TINY])
        assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["store", "merge", str(tmp_path / "s.zarr")]).exit_code == 0
    info = runner.invoke(app, ["store", "info", str(tmp_path / "s.zarr"), "--json"])
    summary = json.loads(info.output)
    assert summary["images_done"] == 6 and summary["complete"]
    result = runner.invoke(app, ["store", "export", str(tmp_path / "s.zarr"), "--coco", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    coco = json.loads((tmp_path / "s.json").read_text())
    assert len(coco["images"]) == 6 and len(coco["annotations"]) == summary["masks"]


def test_wrong_schema_version_is_a_clear_error(demo, tmp_path):
    runner.invoke(app, ["gen-masks", str(demo["unlabeled"]), "--store", str(tmp_path / "s.zarr"), "--limit", "2", *TINY])
    meta = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["store", "info", str(tmp_path / "s.zarr")])
    assert result.exit_code == 2 and "schema version 99" in result.output


def test_backbone_weights_errors_name_the_fix(demo, tmp_path):
    args = ["gen-masks", str(demo["unlabeled"]), "--store", str(tmp_path / "s.zarr"), "--workers", "0"]
    result = runner.invoke(app, [*args, "--backbone", "resnet50", "--backbone-weights", "imagenet"])
    assert result.exit_code == 2 and "no ImageNet weights install with a package for resnet50" in result.output
    result = runner.invoke(app, [*args, "--backbone", "resnet50", "--backbone-weights", str(tmp_path / "no.pth")])
    assert result.exit_code == 2 and "no.pth" in result.output
    result = runner.invoke(app, [*args, "--backbone", "vgg16", "--backbone-weights", "none"])
    assert result.exit_code == 2 and "unknown backbone 'vgg16'" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_image_list_selects_images_and_names_missing_ones(demo, tmp_path):
    names = sorted(p.name for p in demo["unlabeled"].iterdir())
    listing = tmp_path / "list.txt"
    listing.write_text(f"# three of them\n{names[4]}\n{names[1]}\n\n{names[7]}  # a comment\n")
    result = runner.invoke(app, ["gen-masks", str(demo["unlabeled"]), "--store", str(tmp_path / "s.zarr"),
                                 "--image-list", str(listing), *TINY])
    assert result.exit_code == 0, result.output
    from store.pseudo_label_store import PseudoLabelStore

    assert PseudoLabelStore.open(tmp_path / "s.zarr").file_names == sorted([names[1], names[4], names[7]])
    listing.write_text(f"{names[0]}\nnot_there.jpg\n")
    result = runner.invoke(app, ["gen-masks", str(demo["unlabeled"]), "--store", str(tmp_path / "t.zarr"),
                                 "--image-list", str(listing), *TINY])
    assert result.exit_code == 2 and "not_there.jpg" in result.output and "list.txt" in result.output
    assert not (tmp_path / "t.zarr").exists()


def test_the_cli_and_the_workflow_read_the_defaults_without_importing_torch():
    """Every `sp` call and every snakemake run (the Snakefile imports pipeline.workflow_defaults) pays for what
    these modules import: the options' defaults come from the settings dataclasses (stages/settings.py,
    models/settings.py), which import no model library, and the commands import their stage when they run."""
    heavy = ("torch", "torchvision", "timm", "skimage", "kornia")
    code = ("import sys, typer\n"
            "from pipeline.cli import app\n"
            "from pipeline.workflow_defaults import workflow_defaults\n"
            "workflow_defaults()\n"
            "typer.main.get_command(app)  # every command and option, as --help shows them\n"
            f"print(sorted(set({heavy!r}) & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
