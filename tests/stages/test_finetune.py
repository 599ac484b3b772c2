import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from models.knet import KNetConfig, build_knet
from models.mask2former import Mask2FormerConfig, build_mask2former
from models.packaged_backbones import packaged_weights_path
from pipeline.cli import app
import stages.finetune as finetune_module
from stages.code_version import code_version
from stages.finetune import FinetuneConfig, finetune, load_pretrained, transfer_weights
from stages.training import Schedule, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_images(demo, tmp_path_factory):
    """The first two labeled demo images as their own COCO file (trained on and evaluated on)."""
    data = json.loads(Path(demo["train_ann"]).read_text())
    images = data["images"][:2]
    ids = {img["id"] for img in images}
    path = tmp_path_factory.mktemp("ann") / "two.json"
    path.write_text(json.dumps({**data, "images": images,
                                "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    return path


def overfit(model, ann, images, out, epochs, lr, **overrides):
    options = dict(small=True, backbone="resnet18", epochs=epochs, batch_size=2, lr=lr, image_size=160, max_size=224,
                   workers=0, flip_prob=0.0, schedule=Schedule(warmup_steps=5, lr_steps=()), eval_every=epochs)
    cfg = FinetuneConfig(train_ann=ann, train_images=images, val_ann=ann, val_images=images, out=out, model=model,
                         **{**options, **overrides})
    finetune(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records


def test_knet_learns_the_demo_objects(two_images, demo, tmp_path, one_thread):
    # 60 steps on two images: an untrained K-Net scores ~0 mask AP here; this test printed 40.8 (pytest -s).
    # The bar of 5 AP leaves room for platform differences while failing a model that does not learn.
    records = overfit("knet", two_images, demo["train"], tmp_path / "knet", epochs=60, lr=1e-3)
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"K-Net mask AP on its two training images after 60 steps: {records[-1]['segm_AP']:.1f}")  # pytest -s
    assert losses[-1] < 0.6 * losses[0]
    assert records[-1]["segm_AP"] > 5.0
    assert (tmp_path / "knet" / "curve.png").exists() and (tmp_path / "knet" / "best.pth").exists()
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(tmp_path / "knet" / "final.pth"), "--ann", str(two_images),
                                 "--images", str(demo["train"]), "--out", str(tmp_path / "eval.json"),
                                 "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["segm"]["AP"] == pytest.approx(records[-1]["segm_AP"])  # evaluate == the training-time eval
    result = runner.invoke(app, ["predict", str(tmp_path / "knet" / "final.pth"), str(demo["val"]), "--out",
                                 str(tmp_path / "pred"), "--overlays", "2", "--workers", "0", "--device", "cpu",
                                 "--score-threshold", "0"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == 2
    assert json.loads((tmp_path / "pred" / "results.json").read_text())[0]["file_name"].startswith("val_")


def same_run(records: list[dict]) -> list[dict]:
    """A metrics.jsonl without what differs between two runs of the same training: times, rates, and the
    start/resume records (where a run started or continued)."""
    return [{k: v for k, v in r.items() if k not in ("time", "img_per_s", "cpu_s")} for r in records
            if "event" not in r]


@pytest.mark.parametrize("killed", [1, 2], ids=["intermediate", "last"])
def test_a_run_killed_during_an_evaluation_redoes_it_on_resume(two_images, demo, tmp_path, monkeypatch, killed):
    """Killed during the evaluation after epoch `killed` (of --eval-at 1 and the last, 2), after that epoch's
    checkpoint: the resumed run evaluates that epoch again, so it writes the eval.json of an uninterrupted
    run (a last evaluation skipped would leave none, and the workflow's rule failing on every retry) and its
    log reads as that run's, with no hole in the learning curve."""
    options = dict(epochs=2, lr=1e-3, eval_at=(1,), log_every=1)
    full = overfit("knet", two_images, demo["train"], tmp_path / "full", **options)
    real = finetune_module.evaluate_model
    calls = {"n": 0}

    def killed_in_evaluation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == killed:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "evaluate_model", killed_in_evaluation)
    with pytest.raises(KeyboardInterrupt):
        overfit("knet", two_images, demo["train"], tmp_path / "cut", **options)
    assert torch.load(tmp_path / "cut" / "last.pth", weights_only=False)["epoch"] == killed
    assert not (tmp_path / "cut" / "eval.json").exists()
    monkeypatch.setattr(finetune_module, "evaluate_model", real)
    resumed = overfit("knet", two_images, demo["train"], tmp_path / "cut", resume=True, **options)
    evaluated = json.loads((tmp_path / "cut" / "eval.json").read_text())
    assert evaluated == json.loads((tmp_path / "full" / "eval.json").read_text())
    # the code that trained the checkpoint and evaluated it, for `sp table` (stages/report.py)
    trained = torch.load(tmp_path / "cut" / "final.pth", weights_only=False)["code_version"]
    assert evaluated["code_version"] == trained == evaluated["eval_code_version"] == code_version()
    assert same_run(resumed) == same_run(full)
    assert [r["epoch"] for r in resumed if "segm_AP" in r] == [1, 2]
    assert [r.get("event") for r in resumed if "event" in r] == ["start", "resume"]
    assert (tmp_path / "cut" / "final.pth").exists() and (tmp_path / "cut" / "best.pth").exists()


def test_maskrcnn_learns_the_demo_objects(two_images, demo, tmp_path, one_thread):
    # 80 SGD steps (lr 0.01) of the small (64-channel) heads: this test printed 32.2 mask AP (pytest -s); untrained ~0.
    records = overfit("maskrcnn", two_images, demo["train"], tmp_path / "mrcnn", epochs=80, lr=0.01)
    print(f"Mask R-CNN mask AP on its two training images after 80 steps: {records[-1]['segm_AP']:.1f}")
    assert records[-1]["segm_AP"] > 8.0


def test_mask2former_learns_the_demo_objects(two_images, demo, tmp_path, one_thread):
    # 40 steps (lr 3e-4) on two images: untrained ~0 mask AP; this test printed 35.3 (pytest -s), 30 s.
    records = overfit("mask2former", two_images, demo["train"], tmp_path / "m2f", epochs=40, lr=3e-4)
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"Mask2Former mask AP on its two training images after 40 steps: {records[-1]['segm_AP']:.1f}")
    assert losses[-1] < 0.6 * losses[0]
    assert records[-1]["segm_AP"] > 5.0
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "m2f" / "final.pth"), "--ann", str(two_images),
                                      "--images", str(demo["train"]), "--out", str(tmp_path / "eval.json"),
                                      "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["segm"]["AP"] == pytest.approx(records[-1]["segm_AP"])


def test_evaluation_turns_each_image_into_rle_as_it_comes(demo, monkeypatch):
    """Full-size masks of a whole evaluation set do not fit in memory: each image's predictions become RLE
    results before the next image is predicted, with the results of converting them all at once."""
    data = json.loads(Path(demo["val_ann"]).read_text())
    images = sorted(data["images"], key=lambda im: im["id"])
    generator = torch.Generator().manual_seed(0)

    def fake_predictions(model, kind, images_dir, names, *args):
        for index, name in enumerate(names):
            h, w = images[index]["height"], images[index]["width"]
            masks = torch.rand(3, h, w, generator=generator) > 0.7
            yield index, {"scores": torch.tensor([0.9, 0.5, 0.2]), "labels": torch.tensor([0, 1, 0]),
                          "masks": masks, "boxes": torch.tensor([[0.0, 0.0, w / 2, h / 2]] * 3)}

    calls = []
    real = finetune_module.predictions_to_results

    def recording(predictions, ids, categories):
        calls.append(len(predictions))
        return real(predictions, ids, categories)

    monkeypatch.setattr(finetune_module, "predict_images", fake_predictions)
    monkeypatch.setattr(finetune_module, "predictions_to_results", recording)
    metrics, results = finetune_module.evaluate_model(None, "knet", demo["val_ann"], demo["val"], 128, 192, "cpu")
    assert calls == [1] * len(images)
    categories = sorted(c["id"] for c in data["categories"])
    generator.manual_seed(0)
    everything = [p for _, p in fake_predictions(None, "knet", None, [im["file_name"] for im in images])]
    assert results == real(everything, [im["id"] for im in images], categories)
    assert metrics["images"] == len(images)


def test_transfer_copies_matching_tensors_and_rebuilds_the_classifier(tmp_path):
    torch.manual_seed(0)
    pre = build_knet(KNetConfig.small(num_classes=1, frozen_stages=4))
    torch.manual_seed(1)
    fine = build_knet(KNetConfig.small(num_classes=3, frozen_stages=1))
    state = {"model": pre.state_dict(), "prompt": {"seed_proj.weight": torch.zeros(64, 512)}, "kind": "sp-pretrain"}
    save_checkpoint(tmp_path / "pre.pth", state)
    before = {k: v.clone() for k, v in fine.state_dict().items()}
    report = load_pretrained(fine, tmp_path / "pre.pth", "knet")
    after = fine.state_dict()
    assert "stages.0.fc_cls.weight" in report["reinitialised"] and "stages.2.fc_cls.bias" in report["reinitialised"]
    assert torch.equal(after["stages.0.fc_cls.weight"], before["stages.0.fc_cls.weight"])
    for key in ("backbone.conv1.weight", "fpn.lateral.p5.weight" if "fpn.lateral.p5.weight" in after else
                next(k for k in after if k.startswith("fpn.")), "rpn.init_kernels.weight", "stages.1.ffn.0.weight"):
        assert key in report["loaded"] and torch.equal(after[key], pre.state_dict()[key]), key
    assert report["ignored"] == ["prompt.*"]
    assert len(report["loaded"]) + len([k for k in report["reinitialised"] if k in pre.state_dict()]) == len(pre.state_dict())


def test_transfer_refuses_a_finetune_checkpoint_as_init(tmp_path):
    save_checkpoint(tmp_path / "ft.pth", {"model": {}, "kind": "sp-finetune"})
    with pytest.raises(ValueError, match="not a `sp pretrain` checkpoint"):
        load_pretrained(build_knet(KNetConfig.small(num_classes=2)), tmp_path / "ft.pth", "knet")


def _small_mask2former(**overrides):
    return build_mask2former(Mask2FormerConfig.small(backbone="resnet18", **overrides))


def test_mask2former_transfer_copies_everything_but_the_class_head(tmp_path):
    torch.manual_seed(0)
    pre = _small_mask2former(num_classes=1, frozen_stages=4)
    torch.manual_seed(1)
    fine = _small_mask2former(num_classes=3, frozen_stages=1)
    state = {"model": pre.state_dict(), "prompt": {"seed_proj.weight": torch.zeros(64, 8)}, "kind": "sp-pretrain",
             "model_kind": "mask2former"}
    save_checkpoint(tmp_path / "pre.pth", state)
    before = {k: v.clone() for k, v in fine.state_dict().items()}
    report = load_pretrained(fine, tmp_path / "pre.pth", "mask2former")
    after = fine.state_dict()
    assert report["reinitialised"] == ["class_embed.bias", "class_embed.weight"]
    assert torch.equal(after["class_embed.weight"], before["class_embed.weight"])
    for key in ("backbone.conv1.weight", "pixel_decoder.layers.0.attention.sampling_offsets.bias", "query_feat.weight",
                "query_embed.weight", "layers.5.cross.attention.in_proj_weight", "mask_embed.4.weight"):
        assert key in report["loaded"] and torch.equal(after[key], pre.state_dict()[key]), key
    assert report["ignored"] == ["prompt.*"]


def test_transfer_refuses_a_checkpoint_of_another_model_naming_both(tmp_path):
    save_checkpoint(tmp_path / "knet.pth", {"model": build_knet(KNetConfig.small(num_classes=1)).state_dict(),
                                            "kind": "sp-pretrain", "model_kind": "knet"})
    with pytest.raises(ValueError, match="pre-trained a knet model; it cannot initialise --model mask2former"):
        load_pretrained(_small_mask2former(num_classes=2), tmp_path / "knet.pth", "mask2former")
    save_checkpoint(tmp_path / "old.pth", {"model": {}, "kind": "sp-pretrain"})  # before model_kind existed: K-Net
    with pytest.raises(ValueError, match="pre-trained a knet model"):
        load_pretrained(_small_mask2former(num_classes=2), tmp_path / "old.pth", "mask2former")


def test_queryinst_pretrains_then_finetunes_from_its_checkpoint(two_images, demo, tmp_path, one_thread):
    """QueryInst through the commands: pre-training with prompts, --init of its checkpoint, fine-tuning that
    learns the two training images (the model-level learning test is tests/models/test_queryinst.py).

    An untrained model scores 0.0 here; this seed printed 5.1 (one thread). Over seeds 5-14 the same 50 steps give
    0.9-21.8 (mean 9.1), so the bar of 2.0 fails a model that does not learn, not an unlucky draw."""
    runner = CliRunner()
    tiny = ["--small", "--backbone", "resnet18", "--backbone-weights", "none", "--image-size", "160", "--max-size",
            "224", "--workers", "0", "--device", "cpu"]
    store = tmp_path / "gt.zarr"
    result = runner.invoke(app, ["store", "import-coco", str(two_images), "--images", str(demo["train"]), "--store",
                                 str(store), "--backbone", "resnet18", "--backbone-weights", "none", "--image-size",
                                 "160", "--max-size", "224", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["pretrain", "--store", str(store), "--images", str(demo["train"]), "--out",
                                 str(tmp_path / "pre"), "--model", "queryinst", "--epochs", "2", *tiny])
    assert result.exit_code == 0, result.output
    records = overfit("queryinst", two_images, demo["train"], tmp_path / "qi", epochs=50, lr=1e-3,
                      init=tmp_path / "pre" / "final.pth")
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"QueryInst mask AP on its two training images after 50 steps: {records[-1]['segm_AP']:.1f}")
    assert losses[-1] < 0.6 * losses[0]
    assert records[-1]["segm_AP"] > 2.0
    state = torch.load(tmp_path / "qi" / "final.pth", weights_only=False)
    assert state["model_kind"] == "queryinst"


def test_transfer_weights_reports_missing_keys_as_reinitialised():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    report = transfer_weights(model, {"0.weight": torch.ones(3, 2), "9.weight": torch.ones(1)})
    assert report == {"loaded": ["0.weight"], "reinitialised": ["0.bias", "1.bias", "1.weight"], "ignored": ["9.weight"]}
    assert torch.equal(model[0].weight, torch.ones(3, 2))


def test_real_data_end_to_end(coco_subset, tmp_path, one_thread):
    ann, images = coco_subset / "train" / "annotations.json", coco_subset / "train" / "images"
    data = json.loads(ann.read_text())
    subset = {**data, "images": data["images"][:2]}  # 80 COCO categories, as in the file
    ids = {img["id"] for img in subset["images"]}
    subset["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    (tmp_path / "sub.json").write_text(json.dumps(subset))
    records = overfit("knet", tmp_path / "sub.json", images, tmp_path / "run", epochs=40, lr=1e-3,
                      backbone="efficientnet_lite0", backbone_weights=packaged_weights_path("efficientnet_lite0"),
                      image_size=256, max_size=352)
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"K-Net (ImageNet Lite0) mask AP on its two real training photos after 40 steps: {records[-1]['segm_AP']:.1f}")
    assert losses[-1] < 0.6 * losses[0]
    assert records[-1]["segm_AP"] > 5.0


def test_class_agnostic_knet_fits_24_real_photos(coco_subset, tmp_path, one_thread):
    """K-Net (small, ImageNet Lite0) fine-tuned class-agnostically on 24 COCO photos and evaluated on them: 180 steps
    of 4 photos at 256 px, AdamW 3e-4, x0.1 after epoch 25 of 30 (experiments/fit_photos.py).

    Measured with one thread (issue 18): the code before the semantic loss, the soft targets and the 0.3 mask
    threshold reached mask AP 1.11 (AP50 3.86) here; now 1.85 (AP50 4.63), 1.50 of it at the old threshold of
    0.5. The bar of 1.5 fails the old code, not a platform's float noise. (Small absolute numbers: most of the
    156 objects are small at 256 px, and K-Net's class scores barely rank its masks after 180 steps; ranked by
    class score x mask quality the same model scores 3.9: experiments/README.md.)"""
    spec = importlib.util.spec_from_file_location("fit_photos", REPO / "experiments" / "fit_photos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.fit_photos(coco_subset, tmp_path, "knet")
    print(f"K-Net on its 24 training photos: mask AP {metrics['segm']['AP']:.2f}, AP50 {metrics['segm']['AP50']:.2f}")
    assert metrics["segm"]["AP"] > 1.5


def test_class_agnostic_finetuning_evaluates_when_asked_and_sp_evaluate_agrees(two_images, demo, tmp_path,
                                                                                one_thread):
    records = overfit("knet", two_images, demo["train"], tmp_path / "ca", epochs=3, lr=1e-3, class_agnostic=True,
                      eval_at=(1,))
    assert [r["epoch"] for r in records if "segm_AP" in r] == [1, 3]  # --eval-at 1, and the last epoch
    state = torch.load(tmp_path / "ca" / "final.pth", weights_only=False)
    assert state["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
    assert state["model_config"]["num_classes"] == 1
    # sp evaluate scores it on the multi-class file class-agnostically, as fine-tuning did
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "ca" / "final.pth"), "--ann", str(two_images),
                                      "--images", str(demo["train"]), "--out", str(tmp_path / "ca.json"),
                                      "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "ca.json").read_text())
    assert evaluated["segm"]["AP"] == pytest.approx(records[-1]["segm_AP"])
    assert evaluated["code_version"] == state["code_version"] and evaluated["eval_code_version"] == code_version()


def test_a_pretrained_model_is_evaluated_class_agnostically(demo, tmp_path):
    """The paper's Table 6: the pre-trained K-Net itself (one class, 'fg') against every object of the GT."""
    from stages.coco_check import EVALUATION, checked_data
    from stages.coco_data import one_class
    from stages.inference import load_checkpoint_model
    from tiny_checkpoints import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "pre.pth", kind="sp-pretrain", image_size=128, max_size=192)
    result = CliRunner().invoke(app, ["evaluate", str(path), "--ann", str(demo["val_ann"]), "--images",
                                      str(demo["val"]), "--out", str(tmp_path / "pre.json"), "--workers", "0",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model, _ = load_checkpoint_model(path, "cpu", pretrained_ok=True)
    data = one_class(checked_data(demo["val_ann"], demo["val"], EVALUATION))
    want, _ = finetune_module.evaluate_model(model, "knet", data, demo["val"], 128, 192, "cpu", workers=0)
    got = json.loads((tmp_path / "pre.json").read_text())
    assert got["segm"] == pytest.approx(want["segm"], nan_ok=True) and got["bbox"] == pytest.approx(want["bbox"], nan_ok=True)
