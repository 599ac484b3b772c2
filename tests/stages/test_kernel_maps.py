"""stages.kernel_maps (`sp kernel-maps`): each kernel's mean map over a folder equals a per-image loop, padding
stays out of the maps, maps live in normalised image coordinates, and the CLI writes the grid and the maps."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from models.knet import KNetConfig, build_knet
from pipeline.cli import app
from stages.image_data import load_image, network_input
from stages.kernel_maps import image_maps, kernel_maps
from tiny_checkpoints import tiny_checkpoint

SIZE, MAX = 64, 96


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Noise photos of three aspect ratios (wide, tall, square) and one file that is no image."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"wide.png": (80, 124), "tall.png": (130, 82), "square.jpg": (70, 70)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def knet():
    torch.manual_seed(0)
    return build_knet(KNetConfig.small(num_classes=1, num_kernels=4)).eval()


def test_mean_map_equals_a_per_image_loop(knet, photos):
    files = ["broken.jpg", "square.jpg", "tall.png", "wide.png"]
    maps, count = kernel_maps(knet, photos, files, SIZE, MAX, workers=0)
    assert count == 3 and maps.shape == (4, 64, 64)  # the broken file is skipped
    per_image = []
    with torch.no_grad():
        for name in files[1:]:
            x = network_input(load_image(photos / name), SIZE, MAX)
            h, w = x.shape[1:]
            padded = F.pad(x, (0, math.ceil(w / 32) * 32 - w, 0, math.ceil(h / 32) * 32 - h))
            probs = knet(padded[None])[0][-1]["masks"][0].sigmoid()  # (N, H/4, W/4), last stage
            crop = probs[:, :math.ceil(h / 4), :math.ceil(w / 4)]
            per_image.append(F.interpolate(crop[None], size=(64, 64), mode="bilinear", antialias=True)[0].numpy())
    np.testing.assert_allclose(maps, np.mean(per_image, axis=0), rtol=0, atol=1e-6)


def test_padding_never_reaches_the_maps():
    """Two images' logits in one padded batch, the padding filled with extreme values, give each image's maps
    computed from its logits alone (also for sizes that are not multiples of the stride)."""
    torch.manual_seed(0)
    sizes = [(64, 96), (93, 61)]  # resized (h, w); the batch is padded to 96 x 96, mask logits at 24 x 24
    alone = [torch.randn(1, 3, math.ceil(h / 4), math.ceil(w / 4)) for h, w in sizes]
    batch = torch.full((2, 3, 24, 24), 30.0)
    for b, logits in enumerate(alone):
        batch[b, :, :logits.shape[2], :logits.shape[3]] = logits[0]
    batched = image_maps(batch, sizes, (96, 96), canvas=16)
    for b, ((h, w), logits) in enumerate(zip(sizes, alone)):
        own = image_maps(logits, [(h, w)], (logits.shape[2] * 4, logits.shape[3] * 4), canvas=16)
        torch.testing.assert_close(batched[b], own[0], rtol=0, atol=1e-6)  # a leak would be ~1


def test_maps_are_in_normalised_image_coordinates():
    """A kernel firing on the left half of the image gives the left half of the canvas, whatever the aspect."""
    sizes = [(64, 128), (128, 64)]
    logits = torch.full((2, 1, 32, 32), -20.0)
    logits[0, 0, :16, :16] = 20.0  # wide image: 16 x 32 cells, left half
    logits[1, 0, :32, :8] = 20.0  # tall image: 32 x 16 cells, left half
    maps = image_maps(logits, sizes, (128, 128), canvas=8)
    for m in maps:
        assert torch.all(m[0, :, :3] > 0.99) and torch.all(m[0, :, 5:] < 0.01)


def test_cli_writes_the_grid_and_n_maps_per_checkpoint(photos, tmp_path):
    pre = tiny_checkpoint(tmp_path / "pre.pth", kind="sp-pretrain", num_kernels=4)
    fine = tiny_checkpoint(tmp_path / "fine.pth", kind="sp-finetune", num_kernels=6, seed=1)
    runner = CliRunner()
    result = runner.invoke(app, ["kernel-maps", str(pre), str(fine), "--images", str(photos), "--names", "sp,tuned",
                                 "--out", str(tmp_path / "out" / "grid.png"), "--limit", "2", "--workers", "0",
                                 "--device", "cpu", "--canvas", "32"])
    assert result.exit_code == 0, result.output
    a, b = np.load(tmp_path / "out" / "grid.sp.npy"), np.load(tmp_path / "out" / "grid.tuned.npy")
    assert a.shape == (4, 32, 32) and b.shape == (6, 32, 32)
    assert 0 < a.min() and a.max() < 1 and not np.allclose(a[0], a[1])
    with Image.open(tmp_path / "out" / "grid.png") as im:
        pixels = np.asarray(im.convert("L"))
    assert im.size[0] > 6 * 60 and pixels.std() > 10  # a row of six maps, not blank
    maskrcnn = tiny_checkpoint(tmp_path / "mrcnn.pth", model_kind="maskrcnn")
    refused = runner.invoke(app, ["kernel-maps", str(maskrcnn), "--images", str(photos), "--out",
                                  str(tmp_path / "x.png"), "--workers", "0", "--device", "cpu"])
    assert refused.exit_code == 2 and "kernel maps need a K-Net" in refused.output
