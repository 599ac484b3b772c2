import json

import numpy as np
import pytest
import torch

import stages.pretrain as pretrain_module
from models.build import build_query_model
from models.knet import KNetConfig
from models.mask2former import Mask2FormerConfig
from models.queryinst import QueryInstConfig
from models.saliency_prompt import PromptConfig
from stages.code_version import code_version
from stages.eval_masks import class_agnostic_gt
from stages.evaluate import coco_evaluate, predictions_to_results
from stages.gen_masks import RunOptions
from stages.import_coco import import_coco
from stages.inference import predict_images
from stages.pretrain import PretrainConfig, pretrain
from stages.training import Schedule
from store.export import FG_CATEGORY, gt_image_ids
from store.pseudo_label_store import PseudoLabelStore

SMALL_MASK2FORMER = Mask2FormerConfig.small(backbone="resnet18", num_classes=1, frozen_stages=4, num_queries=8)
SMALL_QUERYINST = QueryInstConfig.small(backbone="resnet18", num_classes=1, frozen_stages=4, num_proposals=8)


@pytest.fixture(scope="module")
def gt_store(demo, tmp_path_factory):
    """The demo's unlabeled ground truth as a store (first 4 images): real masks, no saliency run needed."""
    path = tmp_path_factory.mktemp("store") / "gt.zarr"
    import_coco(demo["unlabeled_ann"], demo["unlabeled"], path, backbone="resnet18", image_size=128, max_size=192,
                options=RunOptions(batch_size=4, workers=0, limit=4))
    return path


def config(store, images, out, **kw):
    base = dict(store=store, images=images, out=out, model=KNetConfig.small(num_classes=1, frozen_stages=4, num_kernels=8),
                epochs=2, batch_size=2, image_size=128, max_size=192, workers=0, schedule=Schedule(warmup_steps=2),
                log_every=1)
    return PretrainConfig(**{**base, **kw})


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_weights(a, b):
    for key in ("model", "prompt"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("model", [KNetConfig.small(num_classes=1, frozen_stages=4, num_kernels=8), SMALL_MASK2FORMER,
                                   SMALL_QUERYINST],
                         ids=["knet", "mask2former", "queryinst"])
def test_interrupted_run_resumed_equals_uninterrupted(gt_store, demo, tmp_path, monkeypatch, model):
    """Mask2Former also draws random points in its losses: they too must not depend on where a run started."""
    full = weights(pretrain(config(gt_store, demo["unlabeled"], tmp_path / "full", model=model)))
    real_step = pretrain_module.training_step
    calls = {"n": 0}

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "training_step", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(gt_store, demo["unlabeled"], tmp_path / "cut", checkpoint_every=1, model=model))
    assert weights(tmp_path / "cut" / "last.pth")["step"] == 2
    monkeypatch.setattr(pretrain_module, "training_step", real_step)
    resumed = weights(pretrain(config(gt_store, demo["unlabeled"], tmp_path / "cut", checkpoint_every=1, resume=True,
                                      model=model)))
    assert resumed["step"] == full["step"] == 4
    assert_same_weights(resumed, full)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # the log reads as one run
    assert [r["step"] for r in records if r.get("event") == "resume"] == [2]  # where it continued, for run_minutes


def test_checkpoint_holds_what_finetuning_and_resume_need(gt_store, demo, tmp_path):
    state = weights(pretrain(config(gt_store, demo["unlabeled"], tmp_path / "run", epochs=1)))
    assert {"model", "prompt", "optimizer", "epoch", "step", "args", "model_kind", "model_config",
            "store_settings_hash"} <= set(state)
    assert state["model_kind"] == "knet"
    assert state["store_settings_hash"] == PseudoLabelStore.open(gt_store).attrs["settings_hash"]
    assert (tmp_path / "run" / "epoch_001.pth").exists()
    assert "seed_proj.weight" in state["prompt"]


@pytest.mark.parametrize("mode", ["cosine", "sequential", "random", "none"])
def test_every_prompt_mode_trains(gt_store, demo, tmp_path, mode):
    from models.saliency_prompt import PromptConfig

    cfg = config(gt_store, demo["unlabeled"], tmp_path / mode, epochs=1, prompt=PromptConfig(mode=mode),
                 kernel_loss_weight=0.0 if mode == "none" else 1.0)
    state = weights(pretrain(cfg))
    records = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["code_version"] == code_version()  # which code ran
    records = [r for r in records if "loss" in r]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert ("kernel" in records[0]) == (mode != "none")
    assert state["step"] == 2


def test_nan_loss_stops_naming_step_and_term(demo, tmp_path):
    """A store with a corrupt (NaN) seed feature makes the kernel loss NaN: training stops and says so."""
    from store.pseudo_label_store import ImageResult
    from store import rle

    store = PseudoLabelStore.create(tmp_path / "bad.zarr", ["unlabeled_000001.jpg"], {"method": "test"}, 512)
    from PIL import Image
    w, h = Image.open(demo["unlabeled"] / "unlabeled_000001.jpg").size
    mask = np.zeros((1, h, w), bool)
    mask[0, h // 4:h // 2, w // 4:w // 2] = True
    feature = np.full((1, 512), np.nan, np.float16)
    store.append([ImageResult(index=0, height=h, width=w, rle=rle.encode_batch(mask),
                              box=np.array([[w // 4, h // 4, w // 2, h // 2]], np.float32),
                              score=np.ones(1, np.float32), seed=np.zeros((1, 3), np.int16), seed_feature=feature)])
    store.finalize()
    with pytest.raises(FloatingPointError, match=r"step 0: .*kernel = nan"):
        pretrain(config(tmp_path / "bad.zarr", demo["unlabeled"], tmp_path / "run", batch_size=1, epochs=1))
    assert not (tmp_path / "run" / "last.pth").exists()


def test_images_without_pseudo_masks_train(demo, tmp_path):
    store = PseudoLabelStore.create(tmp_path / "empty.zarr", ["unlabeled_000001.jpg", "unlabeled_000002.jpg"],
                                    {"method": "test"}, 512)
    from PIL import Image
    from store.pseudo_label_store import ImageResult
    results = []
    for i, name in enumerate(store.file_names):
        w, h = Image.open(demo["unlabeled"] / name).size
        results.append(ImageResult(index=i, height=h, width=w, rle=[], box=np.zeros((0, 4), np.float32),
                                   score=np.zeros(0, np.float32), seed=np.zeros((0, 3), np.int16),
                                   seed_feature=np.zeros((0, 512), np.float16)))
    store.append(results)
    store.finalize()
    state = weights(pretrain(config(tmp_path / "empty.zarr", demo["unlabeled"], tmp_path / "run", epochs=1)))
    assert state["step"] == 1


def test_resume_refuses_a_store_with_other_settings(gt_store, demo, tmp_path):
    pretrain(config(gt_store, demo["unlabeled"], tmp_path / "run", epochs=1))
    other = tmp_path / "other.zarr"
    import_coco(demo["unlabeled_ann"], demo["unlabeled"], other, backbone="resnet18", image_size=160, max_size=192,
                options=RunOptions(batch_size=4, workers=0, limit=4))
    with pytest.raises(ValueError, match="trained on a store with settings"):
        pretrain(config(other, demo["unlabeled"], tmp_path / "run", epochs=2, resume=True))


def test_two_process_gloo_training_with_torchrun(gt_store, demo, tmp_path):
    """Multi-GPU code path on two CPU processes: DDP + rank-split sampler + rank-0 logging and saving."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "pipeline.cli", "pretrain", "--store", str(gt_store), "--images", str(demo["unlabeled"]),
           "--out", str(tmp_path / "ddp"), "--small", "--backbone", "resnet18", "--backbone-weights", "none",
           "--num-kernels", "8", "--epochs", "1", "--batch-size", "1",
           "--image-size", "128", "--max-size", "192", "--workers", "0", "--device", "cpu", "--log-every", "1"]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    state = weights(tmp_path / "ddp" / "final.pth")
    assert state["step"] == 2  # 4 images / (2 processes x 1 image)
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in line] == [1, 2]  # rank 0 alone writes


def pseudo_mask_ap(model, kind: str, store_path, images, gt_json) -> float:
    """Class-agnostic mask AP of a pre-trained model's predictions on the store's images, against their
    pseudo masks (here the demo's ground truth, which the store was imported from)."""
    store, gt = PseudoLabelStore.open(store_path), class_agnostic_gt(gt_json)
    ids = gt_image_ids(store, gt)
    order = sorted(ids)
    results = []
    for index, pred in predict_images(model, kind, images, [store.file_names[i] for i in order], 128, 192, "cpu",
                                      2, 0):
        results += predictions_to_results([pred], [ids[order[index]]], [FG_CATEGORY["id"]])
    return coco_evaluate(gt, results, image_ids=sorted(ids.values()))["segm"]["AP"]


def test_mask2former_pretraining_with_prompts_learns_the_pseudo_masks(gt_store, demo, tmp_path, one_thread):
    """80 steps on 4 images with cosine prompts and kernel supervision: the loss falls and the pseudo masks
    are found (this test printed mask AP 0.0 -> 40.1 with pytest -s; 30 s on one thread)."""
    model_config = Mask2FormerConfig.small(backbone="resnet18", num_classes=1, frozen_stages=4)
    cfg = config(gt_store, demo["unlabeled"], tmp_path / "run", model=model_config, epochs=40, lr=5e-4,
                 schedule=Schedule(warmup_steps=5, lr_steps=()), prompt=PromptConfig(mode="cosine"), flip_prob=0.0,
                 keep_every=0)
    torch.manual_seed(cfg.seed)  # the model pretrain() starts from
    before = pseudo_mask_ap(build_query_model(model_config), "mask2former", gt_store, demo["unlabeled"],
                            demo["unlabeled_ann"])
    state = weights(pretrain(cfg))
    assert state["model_kind"] == "mask2former"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in records]
    assert all("kernel" in r and "d6_mask" in r for r in records)  # kernel supervision on the decoder layers
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    model = build_query_model(model_config)
    model.load_state_dict(state["model"])
    after = pseudo_mask_ap(model, "mask2former", gt_store, demo["unlabeled"], demo["unlabeled_ann"])
    print(f"Mask2Former pseudo-mask AP on its 4 pre-training images: {before:.1f} -> {after:.1f}")  # pytest -s
    assert before < 1.0 and after > 10.0
