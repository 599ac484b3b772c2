import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from typer.testing import CliRunner

from conftest import assert_stores_equal
from models.backbone import resolve_backbone_weights
from models.mask_refinement import RefineConfig
from pipeline.cli import app
from stages.eval_masks import evaluate_pseudo_masks
from stages.gen_masks import GenerationSettings, RunOptions, generate, part_path, shard_range
from store import rle
from store.merge import find_parts, merge_stores
from store.pseudo_label_store import DONE, SKIPPED, PseudoLabelStore, StoreError

REPO = Path(__file__).resolve().parents[2]


def test_store_holds_full_resolution_masks_with_tight_boxes(demo, tiny_settings, tmp_path):
    tiny_settings.saliency = type(tiny_settings.saliency)(min_score=0.0)
    store = generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings, RunOptions(batch_size=4, workers=0))
    assert store.complete and store.num_images == 12
    assert (store.image_array("status") == DONE).all()
    heights, widths = store.image_array("height"), store.image_array("width")
    boxes, offsets = store.mask_array("box"), store.mask_offset
    assert offsets[-1] > 0
    for i, (h, w) in enumerate(zip(heights, widths)):
        with Image.open(Path(demo["unlabeled"]) / store.file_names[i]) as im:
            assert im.size == (w, h)
        feats = store.seed_features(i)
        assert feats.shape == (offsets[i + 1] - offsets[i], 512) and feats.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1, atol=1e-2)
        for k, counts in enumerate(store.rle(i)):
            x, y, bw, bh = rle.bbox(counts, h, w)  # the stored xyxy box is the mask's tight box
            np.testing.assert_array_equal(boxes[offsets[i] + k], [x, y, x + bw, y + bh])
            assert rle.decode(counts, h, w).any()


class CellFeatures(torch.nn.Module):
    """A stand-in backbone whose C5 cell sees only its own 32x32 pixels: with a ResNet, padding reaches the
    border cells through the receptive field, so exact equality is only defined for such a backbone."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(16, 3 * 4, generator=torch.Generator().manual_seed(0)))
        self.channels = {"c5": 16}

    def forward(self, x):
        cells = torch.nn.functional.avg_pool2d(x.double(), 8)  # 4x4 sub-cells per C5 cell
        cells = torch.nn.functional.pixel_unshuffle(cells, 4)[:, [0, 5, 10, 15, 16, 21, 26, 31, 32, 37, 42, 47]]
        return {"c5": torch.tanh(torch.einsum("dc,bchw->bdhw", self.proj.double(), cells))}


@pytest.mark.parametrize("method", ["none", "superpixel", "guided"])
def test_masks_do_not_depend_on_batching_padding_or_workers(demo, tiny_settings, tmp_path, monkeypatch, method):
    """For every refinement: images of different sizes padded into batches of 4 give the masks they give alone
    (batch size 1); superpixels made in a DataLoader worker (--workers 1) give the very store of --workers 0;
    and a refinement changes the masks (it is not silently skipped)."""
    monkeypatch.setattr("stages.gen_masks.build_backbone", lambda *a, **k: CellFeatures())
    tiny_settings.saliency = type(tiny_settings.saliency)(min_score=0.0)
    plain = generate(demo["unlabeled"], tmp_path / "plain.zarr", tiny_settings, RunOptions(batch_size=4, workers=0))
    tiny_settings.refine = RefineConfig(method=method, downsample=2, radius=8)
    one = generate(demo["unlabeled"], tmp_path / "b1.zarr", tiny_settings, RunOptions(batch_size=1, workers=0))
    four = generate(demo["unlabeled"], tmp_path / "b4.zarr", tiny_settings, RunOptions(batch_size=4, workers=0))
    worker = generate(demo["unlabeled"], tmp_path / "w1.zarr", tiny_settings, RunOptions(batch_size=4, workers=1))
    assert len(set(zip(one.image_array("height"), one.image_array("width")))) > 1  # padding did happen
    assert one.mask_offset[-1] > 12
    assert_stores_equal(one, four, float_atol=1e-3)  # float16 features: 1e-3 is a few ulps
    assert_stores_equal(four, worker)
    assert (one.rle_images(0, 12) != plain.rle_images(0, 12)) == (method != "none")


def test_refinement_is_a_recorded_setting_and_another_is_refused_on_resume(demo, tiny_settings, tmp_path):
    options = RunOptions(batch_size=4, workers=0, limit=4)
    # the paper's generator keeps the settings (and so the hash) its stores had before refinement existed
    assert "refine" not in tiny_settings.to_dict()
    tiny_settings.refine = RefineConfig(method="superpixel")
    store = generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings, options)
    assert store.attrs["settings"]["refine"] == {"method": "superpixel", "downsample": 2, "scale": 400.0,
                                                 "sigma": 0.5, "min_size": 100}
    tiny_settings.refine = RefineConfig(method="superpixel", scale=100.0)
    with pytest.raises(StoreError, match="refine: store=.*'scale': 400.0.* now=.*'scale': 100.0"):
        generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings, options)
    tiny_settings.refine = RefineConfig()
    with pytest.raises(StoreError, match="refine: store=.*'superpixel'.* now=None"):
        generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings, options)


def test_a_refinement_whose_library_is_missing_is_refused_before_the_store_exists(demo, tmp_path, monkeypatch):
    """Without kornia (e.g. an install that skipped it), `--refine guided` stops at once naming it, instead of
    failing at the first image with a half-made store left behind."""
    monkeypatch.setitem(sys.modules, "kornia", None)  # `import kornia...` now raises ImportError
    monkeypatch.setitem(sys.modules, "kornia.filters", None)
    result = CliRunner().invoke(app, ["gen-masks", str(demo["unlabeled"]), "--store", str(tmp_path / "s.zarr"),
                                      "--refine", "guided", "--backbone", "resnet18", "--backbone-weights", "none",
                                      "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "refinement 'guided' needs kornia" in result.output
    assert not (tmp_path / "s.zarr").exists() and list(tmp_path.iterdir()) == []


def test_gen_masks_help_explains_the_refinement():
    text = " ".join(CliRunner().invoke(app, ["gen-masks", "--help"], env={"COLUMNS": "200"}).output.split())
    for words in ("--refine", "none|superpixel|guided", "Felzenszwalb segment", "paper's generator",
                  "[default: none]", "--superpixel-scale", "--guided-radius", "--refine-downsample"):
        assert words in text, words


def test_real_photos_in_every_mode_give_full_size_masks_independent_of_batching(real_photos, tiny_settings,
                                                                               tmp_path, monkeypatch):
    """Grayscale, RGBA and JPEG photographs of six sizes: every image is done, its masks have its own size,
    and batches of 4 (padded) give the store of batch size 1."""
    monkeypatch.setattr("stages.gen_masks.build_backbone", lambda *a, **k: CellFeatures())
    tiny_settings.saliency = type(tiny_settings.saliency)(min_score=0.0)
    one = generate(real_photos, tmp_path / "b1.zarr", tiny_settings, RunOptions(batch_size=1, workers=0))
    four = generate(real_photos, tmp_path / "b4.zarr", tiny_settings, RunOptions(batch_size=4, workers=0))
    assert (one.image_array("status") == DONE).all() and one.num_images == 6
    for i, name in enumerate(one.file_names):
        with Image.open(real_photos / name) as im:
            assert (one.image_array("height")[i], one.image_array("width")[i]) == (im.height, im.width)
        assert all(rle.decode(c, im.height, im.width).any() for c in one.rle(i)), name
    assert one.mask_offset[-1] >= 12  # filters may empty an image, not the set
    assert_stores_equal(one, four, float_atol=1e-3)


def test_grayscale_photo_is_read_as_its_grey_rgb_copy(real_photos, tiny_settings, tmp_path):
    """An 8-bit grayscale file gives the masks of the same picture saved as RGB (three equal channels)."""
    folders = {mode: tmp_path / mode for mode in ("L", "RGB")}
    with Image.open(real_photos / "camera.png") as im:
        for mode, folder in folders.items():
            folder.mkdir()
            im.convert(mode).save(folder / "camera.png")
    grey, rgb = (generate(f, tmp_path / f"{m}.zarr", tiny_settings, RunOptions(batch_size=1, workers=0))
                 for m, f in folders.items())
    assert grey.mask_offset[-1] > 0
    assert_stores_equal(grey, rgb, float_atol=0.0)


def test_corrupt_images_are_skipped_with_their_reason(demo, tiny_settings, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(demo["unlabeled"], folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    good = sorted(folder.glob("*.jpg"))[0]
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    store = generate(folder, tmp_path / "s.zarr", tiny_settings, RunOptions(batch_size=4, workers=0))
    names = store.file_names
    bad = {names.index("broken.jpg"), names.index("truncated.jpg")}
    assert set(store.skipped) == bad
    assert all(reason for reason in store.skipped.values())
    status = store.image_array("status")
    assert all(status[i] == SKIPPED for i in bad) and (np.delete(status, list(bad)) == DONE).all()


def test_empty_or_missing_folder_is_a_clear_error(tiny_settings, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        generate(tmp_path / "empty", tmp_path / "s.zarr", tiny_settings, RunOptions(workers=0))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        generate(tmp_path / "file.txt", tmp_path / "s.zarr", tiny_settings, RunOptions(workers=0))
    assert not (tmp_path / "s.zarr").exists()


def test_other_settings_are_refused_naming_the_keys(demo, tiny_settings, tmp_path):
    generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings, RunOptions(batch_size=4, workers=0, limit=4))
    tiny_settings.image_size = 160
    with pytest.raises(StoreError, match="image_size: store=128 now=160"):
        generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings, RunOptions(batch_size=4, workers=0, limit=4))
    tiny_settings.image_size = 128
    with pytest.raises(StoreError, match="another image list"):
        generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings, RunOptions(batch_size=4, workers=0, limit=8))


def test_shards_merge_into_the_single_process_store(demo, tiny_settings, tmp_path):
    single = generate(demo["unlabeled"], tmp_path / "one.zarr", tiny_settings, RunOptions(batch_size=2, workers=0))
    for i in range(3):
        generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings,
                 RunOptions(batch_size=2, workers=0, shard=(i, 3)))
    parts = find_parts(tmp_path / "s.zarr")
    assert parts == [part_path(tmp_path / "s.zarr", (i, 3)) for i in range(3)]
    merged = merge_stores(parts, tmp_path / "s.zarr")
    assert_stores_equal(merged, single)


def test_shard_ranges_cover_every_image_once_on_batch_boundaries():
    for n, bs, count in [(12, 2, 3), (13, 4, 3), (5, 8, 4), (100, 7, 6)]:
        ranges = [shard_range(n, (i, count), bs) for i in range(count)]
        assert [i for r in ranges for i in r] == list(range(n))
        assert all(r.start % bs == 0 for r in ranges if len(r))


def test_merge_refuses_missing_or_unfinished_parts(demo, tiny_settings, tmp_path):
    generate(demo["unlabeled"], tmp_path / "s.zarr", tiny_settings, RunOptions(batch_size=2, workers=0, shard=(0, 2)))
    with pytest.raises(StoreError, match="1 of 2 part stores"):
        find_parts(tmp_path / "s.zarr")
    progress = json.loads((part_path(tmp_path / "s.zarr", (0, 2)) / "progress.json").read_text())
    progress["complete"] = False
    (part_path(tmp_path / "s.zarr", (0, 2)) / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(StoreError, match="not complete"):
        merge_stores([part_path(tmp_path / "s.zarr", (0, 2))], tmp_path / "m.zarr")


def test_random_method_gives_box_masks_reproducibly(demo, tiny_settings, tmp_path):
    tiny_settings.method, tiny_settings.random_boxes = "random", 5
    a = generate(demo["unlabeled"], tmp_path / "a.zarr", tiny_settings, RunOptions(batch_size=4, workers=0, limit=4))
    b = generate(demo["unlabeled"], tmp_path / "b.zarr", tiny_settings, RunOptions(batch_size=3, workers=0, limit=4))
    assert a.rle_images(0, 4) == b.rle_images(0, 4)  # boxes are drawn per file, whatever the batches
    np.testing.assert_array_equal(a.mask_array("score"), b.mask_array("score"))
    assert (np.diff(a.mask_offset) == 5).all()
    h, w = a.image_array("height")[0], a.image_array("width")[0]
    for counts, box in zip(a.rle(0), a.mask_array("box")[:5]):
        x1, y1, x2, y2 = box.astype(int)
        assert rle.area(counts, h, w) == (x2 - x1) * (y2 - y1)  # the mask fills its box


def _sp(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_kill_9_then_rerun_equals_an_uninterrupted_run(demo, tmp_path):
    args = ["gen-masks", str(demo["unlabeled"]), "--backbone", "resnet18", "--backbone-weights", "none", "--image-size", "128",
            "--max-size", "192", "--batch-size", "2", "--workers", "1", "--device", "cpu", "--min-score", "0.5",
            "--commit-every", "2"]
    assert _sp(*args, "--store", str(tmp_path / "full.zarr")).wait(timeout=300) == 0
    victim = tmp_path / "killed.zarr"
    proc = _sp(*args, "--store", str(victim))
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once some but not all batches are committed
        progress = victim / "progress.json"
        if progress.exists() and 2 <= json.loads(progress.read_text())["images_done"] < 10:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = json.loads((victim / "progress.json").read_text())
    assert not interrupted["complete"] and interrupted["images_done"] < 12
    rerun = _sp(*args, "--store", str(victim))
    out = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, out
    assert_stores_equal(PseudoLabelStore.open(victim), PseudoLabelStore.open(tmp_path / "full.zarr"))


def test_real_weights_give_better_pseudo_masks_than_random_ones(coco_subset, tmp_path):
    """On real photos, ImageNet features put pseudo masks on objects; a random backbone does not."""
    images, gt = coco_subset / "val" / "images", coco_subset / "val" / "annotations.json"
    quality = {}
    for weights in ("imagenet", "none"):
        settings = GenerationSettings(backbone="efficientnet_lite0", image_size=512, max_size=853)
        store = generate(images, tmp_path / f"{weights}.zarr", settings, RunOptions(batch_size=4, workers=0, limit=32),
                         backbone_weights=resolve_backbone_weights("efficientnet_lite0", weights))
        assert store.complete and (store.image_array("status") == DONE).all()
        quality[weights] = evaluate_pseudo_masks(store, gt)["segm"]
    print({w: {k: round(q[k], 2) for k in ("AP50", "AR100")} for w, q in quality.items()})  # pytest -s
    assert quality["imagenet"]["AR100"] > 3 * quality["none"]["AR100"] + 0.3
    assert quality["imagenet"]["AP50"] > quality["none"]["AP50"]
