"""Bad input, tried as a new user would: every case ends with exit code 2 and one `error:` line naming the file
and the offending id, with no traceback and nothing written. Each case failed on the code before the up-front
checks (a traceback, a message without the file, or training and writing before the error)."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from models.knet import KNetConfig, build_knet
from pipeline.cli import app
from stages.training import save_checkpoint
from store import rle
from store.pseudo_label_store import ImageResult, PseudoLabelStore

runner = CliRunner()
SMALL = ["--image-size", "64", "--max-size", "96", "--workers", "0", "--device", "cpu"]
TRAIN = ["--small", "--epochs", "1", "--batch-size", "2", "--warmup-steps", "1", *SMALL]
BACKBONE = ["--backbone", "resnet18", "--backbone-weights", "none", "--batch-size", "2", *SMALL]


@dataclasses.dataclass
class Inputs:
    """A fresh copy of three labeled demo images for each case, and what a case may need besides."""
    root: Path
    images: Path
    data: dict
    finished_run: Path  # a `sp finetune` run folder (1 epoch on these images)

    @property
    def ann(self) -> Path:
        return self.root / "ann.json"

    def write(self, data: dict | None = None, text: str | None = None) -> Path:
        self.ann.write_text(text if text is not None else json.dumps(data or self.data))
        return self.ann

    def finetune(self, *extra: str) -> list[str]:
        return ["finetune", "--train-ann", str(self.ann), "--train-images", str(self.images), "--val-ann",
                str(self.ann), "--val-images", str(self.images), *TRAIN, *extra]

    def store(self, name: str = "masks.zarr", sizes: dict | None = None) -> Path:
        """A finished store of the labeled images with one whole-image mask each."""
        images = self.data["images"]
        store = PseudoLabelStore.create(self.root / name, [im["file_name"] for im in images], {"method": "test"}, 4)
        results = []
        for i, im in enumerate(images):
            h, w = (sizes or {}).get(im["file_name"], (im["height"], im["width"]))
            results.append(ImageResult(index=i, height=h, width=w, rle=rle.encode_batch(np.ones((1, h, w), bool)),
                                       box=np.array([[0, 0, w, h]], np.float32), score=np.ones(1, np.float32),
                                       seed=np.zeros((1, 3), np.int16), seed_feature=np.ones((1, 4), np.float16)))
        store.append(results)
        store.finalize()
        return self.root / name


def three_images(demo, folder: Path) -> dict:
    data = json.loads(Path(demo["train_ann"]).read_text())
    images = data["images"][:3]
    (folder / "images").mkdir(parents=True)
    for im in images:
        shutil.copy(Path(demo["train"]) / im["file_name"], folder / "images" / im["file_name"])
    ids = {im["id"] for im in images}
    return {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}


@pytest.fixture(scope="module")
def finished_run(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = three_images(demo, root)
    (root / "ann.json").write_text(json.dumps(data))
    inputs = Inputs(root, root / "images", data, root / "run")
    result = runner.invoke(app, inputs.finetune("--out", str(root / "run")))
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture
def inputs(demo, tmp_path, finished_run):
    data = three_images(demo, tmp_path)
    inputs = Inputs(tmp_path, tmp_path / "images", data, finished_run)
    inputs.write()
    return inputs


def with_annotation(inputs, k, **changes):
    data = json.loads(json.dumps(inputs.data))
    data["annotations"][k].update(changes)
    return inputs.write(data)


def first(inputs, key="annotations"):
    return inputs.data[key][0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


# Each case: (name, prepare(inputs) → (argv, [texts the error line holds], [paths that must stay as they were]))
def missing_image(i):
    (i.images / "train_000002.jpg").unlink()
    return i.finetune("--out", str(i.root / "out")), ["ann.json", "image file missing", "image 2 'train_000002.jpg'"]


def truncated_jpeg(i):
    path = i.images / "train_000002.jpg"
    path.write_bytes(path.read_bytes()[:2000])
    return i.finetune("--out", str(i.root / "out")), ["ann.json", "image file unreadable", "image 2"]


def unknown_image_id(i):
    with_annotation(i, 0, image_id=99)
    return i.finetune("--out", str(i.root / "out")), ["ann.json", "unknown image_id", f"annotation {first(i)['id']} "
                                                      "(image_id 99)"]


def unknown_category_id(i):
    with_annotation(i, 0, category_id=7)
    return i.finetune("--out", str(i.root / "out")), ["ann.json", f"annotation {first(i)['id']} (category_id 7)"]


def two_point_polygon(i):
    with_annotation(i, 1, segmentation=[[10, 10, 20, 20]])
    return i.finetune("--out", str(i.root / "out")), ["polygon with fewer than 3 points", "annotation 2 (2 points)"]


def odd_polygon(i):
    with_annotation(i, 1, segmentation=[[10, 10, 20, 20, 30]])
    return i.finetune("--out", str(i.root / "out")), ["polygon of odd length", "annotation 2"]


def image_of_another_size(i):
    data = json.loads(json.dumps(i.data))
    data["images"][1]["height"] += 10
    i.write(data)
    return i.finetune("--out", str(i.root / "out")), ["ann.json", "image of another size", "image 2"]


def rle_of_another_size(i):
    seg = dict(first(i)["segmentation"], size=[10, 10])
    with_annotation(i, 0, segmentation=seg)
    return i.finetune("--out", str(i.root / "out")), ["RLE of another size than its image", "annotation 1"]


def duplicate_image_id(i):
    data = json.loads(json.dumps(i.data))
    data["images"][2]["id"] = data["images"][1]["id"]
    i.write(data)
    return i.finetune("--out", str(i.root / "out")), ["duplicate image id", "image 2 'train_000003.jpg'"]


def malformed_json(i):
    i.write(text='{"images": [\n,]}')
    return i.finetune("--out", str(i.root / "out")), [f"{i.ann}:2:1: not valid JSON"]


def other_categories_in_val(i):
    data = json.loads(json.dumps(i.data))
    data["categories"] = data["categories"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 3]
    (i.root / "val.json").write_text(json.dumps(data))
    argv = i.finetune("--out", str(i.root / "out"))
    argv[argv.index("--val-ann") + 1] = str(i.root / "val.json")
    return argv, ["ann.json and", "val.json", "only in the first: [3]"]


def init_not_a_checkpoint(i):
    (i.root / "weights.pth").write_bytes(b"\x00garbage" * 100)
    return i.finetune("--out", str(i.root / "out"), "--init", str(i.root / "weights.pth")), \
        ["--init", "weights.pth is not a readable PyTorch checkpoint"]


def init_of_another_architecture(i):
    config = KNetConfig.small(num_classes=1, num_kernels=8)
    save_checkpoint(i.root / "pre.pth", {"kind": "sp-pretrain", "model": build_knet(config).state_dict(),
                                         "model_config": dataclasses.asdict(config)})
    return i.finetune("--out", str(i.root / "out"), "--init", str(i.root / "pre.pth")), \
        ["pre.pth is another architecture", "num_kernels: checkpoint=8 now=16"]


def out_holds_a_run(i):
    shutil.copytree(i.finished_run, i.root / "out")
    return i.finetune("--out", str(i.root / "out")), ["--out", "holds a run already", "--resume", "--overwrite"]


def resume_with_other_settings(i):
    shutil.copytree(i.finished_run, i.root / "out")
    return i.finetune("--out", str(i.root / "out"), "--resume", "--lr", "0.5"), \
        ["holds a run with other settings", "lr: run=None now=0.5"]


def evaluate_missing_image(i):
    (i.images / "train_000003.jpg").unlink()
    return ["evaluate", str(i.finished_run / "final.pth"), "--ann", str(i.ann), "--images", str(i.images),
            "--out", str(i.root / "eval.json"), *SMALL], ["image file missing", "image 3 'train_000003.jpg'"]


def evaluate_without_area(i):
    data = json.loads(json.dumps(i.data))
    del data["annotations"][3]["area"]
    i.write(data)
    return ["evaluate", str(i.finished_run / "final.pth"), "--ann", str(i.ann), "--images", str(i.images),
            "--out", str(i.root / "eval.json"), *SMALL], ["ann.json", "annotation without area", "annotation 4"]


def evaluate_other_categories(i):
    data = json.loads(json.dumps(i.data))
    data["categories"].append({"id": 9, "name": "extra"})
    i.write(data)
    return ["evaluate", str(i.finished_run / "final.pth"), "--ann", str(i.ann), "--images", str(i.images),
            "--out", str(i.root / "eval.json"), *SMALL], ["final.pth and --ann", "only in the second: [9]"]


def evaluate_not_a_checkpoint(i):
    (i.root / "model.pth").write_text("not a checkpoint")
    return ["evaluate", str(i.root / "model.pth"), "--ann", str(i.ann), "--images", str(i.images),
            "--out", str(i.root / "eval.json"), *SMALL], ["model.pth is not a readable PyTorch checkpoint"]


def predict_not_a_checkpoint(i):
    (i.root / "model.pth").write_bytes(b"PK\x03\x04 truncated zip")
    return ["predict", str(i.root / "model.pth"), str(i.images), "--out", str(i.root / "pred"), *SMALL[4:]], \
        ["model.pth is not a readable PyTorch checkpoint"]


def eval_masks_unknown_image_id(i):
    store = i.store()
    with_annotation(i, 0, image_id=42)
    return ["eval-masks", str(store), "--gt", str(i.ann), "--out", str(i.root / "q.json")], \
        ["ann.json", "unknown image_id", "(image_id 42)"]


def eval_masks_malformed_json(i):
    store = i.store()
    i.write(text='{"images": []')
    return ["eval-masks", str(store), "--gt", str(i.ann), "--out", str(i.root / "q.json")], \
        [f"{i.ann}:1:14: not valid JSON"]


def eval_masks_other_sizes(i):
    store = i.store(sizes={"train_000002.jpg": (50, 60)})
    return ["eval-masks", str(store), "--gt", str(i.ann), "--out", str(i.root / "q.json")], \
        ["masks.zarr have another size", "train_000002.jpg (50x60, GT 273x289)"]


def import_coco_missing_image(i):
    (i.images / "train_000001.jpg").unlink()
    return ["store", "import-coco", str(i.ann), "--images", str(i.images), "--store", str(i.root / "s.zarr"),
            *BACKBONE], ["ann.json", "image file missing", "image 1 'train_000001.jpg'"]


def import_coco_odd_polygon(i):
    with_annotation(i, 2, segmentation=[[1, 1, 9, 1, 9]])
    return ["store", "import-coco", str(i.ann), "--images", str(i.images), "--store", str(i.root / "s.zarr"),
            *BACKBONE], ["polygon of odd length", "annotation 3 (5 numbers)"]


def split_malformed_json(i):
    i.write(text='{"images": [\n,]}')
    return ["split", str(i.ann), "--out", str(i.root / "splits"), "--percent", "50"], [f"{i.ann}:2:1"]


def split_unknown_image_id(i):
    with_annotation(i, 0, image_id=77)
    return ["split", str(i.ann), "--out", str(i.root / "splits"), "--percent", "50"], \
        ["ann.json", "unknown image_id", "(image_id 77)"]


def split_malformed_ids_file(i):
    (i.root / "ids.json").write_text("[1, 2,")
    return ["split", str(i.ann), "--out", str(i.root / "splits"), "--ids-file", str(i.root / "ids.json")], \
        [f"{i.root / 'ids.json'}:1:7: not valid JSON"]


def pretrain_on_part_stores(i):
    for k in range(2):
        PseudoLabelStore.create(i.root / f"masks.part{k:03d}-of-002.zarr", ["a.jpg"], {"method": "test"}, 4)
    return ["pretrain", "--store", str(i.root / "masks.zarr"), "--images", str(i.images), "--out",
            str(i.root / "pre"), *TRAIN], ["masks.zarr does not exist yet", "2 part store(s)", "sp store merge"]


def pretrain_on_damaged_store(i):
    store = i.store()
    (store / "progress.json").write_text('{"images_done": 3,')
    return ["pretrain", "--store", str(store), "--images", str(i.images), "--out", str(i.root / "pre"), *TRAIN], \
        ["masks.zarr/progress.json is damaged"]


def pretrain_into_a_finetune_run(i):
    shutil.copytree(i.finished_run, i.root / "out")
    store = i.store()
    return ["pretrain", "--store", str(store), "--images", str(i.images), "--out", str(i.root / "out"), "--resume",
            *TRAIN], ["holds a sp-finetune run, not a sp-pretrain one"]


CASES = [missing_image, truncated_jpeg, unknown_image_id, unknown_category_id, two_point_polygon, odd_polygon,
         image_of_another_size, rle_of_another_size, duplicate_image_id, malformed_json, other_categories_in_val,
         init_not_a_checkpoint, init_of_another_architecture, out_holds_a_run, resume_with_other_settings,
         evaluate_missing_image, evaluate_without_area, evaluate_other_categories, evaluate_not_a_checkpoint,
         predict_not_a_checkpoint, eval_masks_unknown_image_id, eval_masks_malformed_json, eval_masks_other_sizes,
         import_coco_missing_image, import_coco_odd_polygon, split_malformed_json, split_unknown_image_id,
         split_malformed_ids_file, pretrain_on_part_stores, pretrain_on_damaged_store, pretrain_into_a_finetune_run]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_clear_error_and_nothing_is_written(inputs, case):
    argv, expected = case(inputs)
    before = snapshot(inputs.root)
    torch.set_num_threads(1)
    result = runner.invoke(app, argv)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    assert all(text in errors[0] for text in expected), errors[0]
    assert snapshot(inputs.root) == before  # nothing written, nothing replaced


def test_skip_bad_trains_on_the_rest_and_lists_what_it_left_out(inputs):
    (inputs.images / "train_000002.jpg").unlink()
    with_annotation(inputs, 0, segmentation=[[1, 1, 5, 5]])
    result = runner.invoke(app, inputs.finetune("--out", str(inputs.root / "out"), "--skip-bad"))
    assert result.exit_code == 0, result.output
    skipped = json.loads((inputs.root / "out" / "skipped.json").read_text())
    assert set(skipped) == {"train", "val"}  # the same file serves as both here
    assert [im["id"] for im in skipped["train"]["images"]] == [2]
    left_out = {a["id"]: a["problems"] for a in skipped["train"]["annotations"]}
    assert left_out[1] == ["polygon with fewer than 3 points (2 points)"]
    assert all(left_out[a["id"]] == ["its image is left out"] for a in inputs.data["annotations"] if a["image_id"] == 2)
    assert torch.load(inputs.root / "out" / "final.pth", weights_only=False)["epoch"] == 1


def test_overwrite_replaces_a_run_and_resume_continues_a_matching_one(inputs):
    out = inputs.root / "out"
    assert runner.invoke(app, inputs.finetune("--out", str(out))).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, inputs.finetune("--out", str(out), "--resume", "--epochs", "2"))
    assert result.exit_code == 0, result.output  # same settings, one more epoch
    assert torch.load(out / "final.pth", weights_only=False)["epoch"] == 2
    result = runner.invoke(app, inputs.finetune("--out", str(out), "--lr", "0.001", "--overwrite"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in records) == 1  # the old run's records are gone, not appended to
    assert torch.load(out / "final.pth", weights_only=False)["args"]["lr"] == 0.001
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are deleted


@pytest.mark.parametrize("argv_of, message", [
    (lambda i: ["predict", str(i.root / "pre.pth"), str(i.images), "--out", str(i.root / "out"), "--workers", "0",
                "--device", "cpu"],
     "is not a `sp finetune` checkpoint (kind 'sp-pretrain')"),
    (lambda i: i.finetune("--out", str(i.root / "out"), "--init", str(i.finished_run / "final.pth")),
     "is not a `sp pretrain` checkpoint (kind 'sp-finetune')"),
    (lambda i: i.finetune("--out", str(i.root / "out"), "--backbone-weights", str(i.root / "pre.pth")),
     "pre.pth"),
])
def test_inputs_refused_before_stay_refused(inputs, argv_of, message):
    """Checkpoints of the other stage, and a checkpoint given as backbone weights: clear errors already. (`sp
    evaluate` takes a pre-training checkpoint: class-agnostic AP, tests/stages/test_finetune.py.)"""
    save_checkpoint(inputs.root / "pre.pth", {"kind": "sp-pretrain", "model": {}, "model_config": {}})
    result = runner.invoke(app, argv_of(inputs))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (inputs.root / "out").exists()
