import json

import numpy as np
import pytest
import torch

import stages.pretrain as pretrain_module
from models.knet import KNetConfig
from stages.gen_masks import RunOptions
from stages.import_coco import import_coco
from stages.pretrain import PretrainConfig, pretrain
from stages.training import Schedule
from store.pseudo_label_store import PseudoLabelStore


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


def test_interrupted_run_resumed_equals_uninterrupted(gt_store, demo, tmp_path, monkeypatch):
    full = weights(pretrain(config(gt_store, demo["unlabeled"], tmp_path / "full")))
    real_step = pretrain_module.training_step
    calls = {"n": 0}

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "training_step", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(gt_store, demo["unlabeled"], tmp_path / "cut", checkpoint_every=1))
    assert weights(tmp_path / "cut" / "last.pth")["step"] == 2
    monkeypatch.setattr(pretrain_module, "training_step", real_step)
    resumed = weights(pretrain(config(gt_store, demo["unlabeled"], tmp_path / "cut", checkpoint_every=1, resume=True)))
    assert resumed["step"] == full["step"] == 4
    assert_same_weights(resumed, full)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the log reads as one run


def test_checkpoint_holds_what_finetuning_and_resume_need(gt_store, demo, tmp_path):
    state = weights(pretrain(config(gt_store, demo["unlabeled"], tmp_path / "run", epochs=1)))
    assert {"model", "prompt", "optimizer", "epoch", "step", "args", "model_config", "store_settings_hash"} <= set(state)
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
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # rank 0 alone writes
