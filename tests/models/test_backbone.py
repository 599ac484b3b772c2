"""Tests for models.backbone: layout conversion, strict loading, shapes, freezing."""

from __future__ import annotations

import hashlib
import logging
import pickle
import re

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from models.backbone import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, ResNetFeatures, build_backbone
from models.backbone_weights import check_name_hash, file_sha256, load_resnet_weights

LAYER_OF = {"c2": "layer1", "c3": "layer2", "c4": "layer3", "c5": "layer4"}


@pytest.fixture(scope="module")
def reference():
    """A random resnet18 with randomised BN affine params AND running stats.

    Default init has weight=1, bias=0, mean=0, var=1 in every BN, which would
    hide a conversion that swaps BN tensors; randomising makes such bugs visible.
    Returns (state_dict incl. fc, input, {level: expected feature map}).
    """
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    ref.eval()
    x = torch.randn(1, 3, 64, 96)
    # Intermediate outputs via torchvision's FX extractor: independent of our forward.
    extractor = create_feature_extractor(ref, return_nodes={v: k for k, v in LAYER_OF.items()})
    with torch.no_grad():
        expected = extractor(x)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    return sd, x, expected


def _to_detectron2(key: str) -> str:
    """torchvision -> detectron2 ResNet names (inverse mapping, written independently)."""
    if key.startswith("conv1."):
        return "stem.conv1." + key[len("conv1."):]
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1."):]
    m = re.match(r"layer(\d)\.(\d+)\.(.+)$", key)
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def _write(tmp_path, layout, sd):
    """Write ``sd`` (torchvision keys) re-keyed into ``layout``; return the path."""
    body = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    if layout == "torchvision":
        path, obj = tmp_path / "tv.pth", dict(sd)  # keeps fc.*: must be dropped
    elif layout == "torchvision-under-model":
        path, obj = tmp_path / "tv_model.pth", {"model": dict(sd), "epoch": 3}
    elif layout == "moco":
        q = {f"module.encoder_q.{k}": v for k, v in body.items()}
        head = {"module.encoder_q.fc.0.weight": torch.randn(512, 512), "module.encoder_q.fc.0.bias": torch.randn(512),
                "module.encoder_q.fc.2.weight": torch.randn(128, 512), "module.encoder_q.fc.2.bias": torch.randn(128)}
        k_enc = {f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in body.items()}
        state = {**q, **head, **k_enc, "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1)}
        path, obj = tmp_path / "moco.pth.tar", {"epoch": 200, "arch": "resnet18", "state_dict": state}
    elif layout == "mmselfsup":
        state = {f"backbone.{k}": v for k, v in body.items()}
        state.update({"neck.mlp.0.weight": torch.randn(8, 512), "head.fc.weight": torch.randn(4, 8)})
        path, obj = tmp_path / "mmselfsup.pth", {"meta": {"epoch": 1}, "state_dict": state}
    elif layout in ("detectron2", "detectron2-bottom-up"):
        pre = "backbone.bottom_up." if layout == "detectron2-bottom-up" else ""
        # detectron2 FrozenBN has no num_batches_tracked; values are numpy arrays.
        model = {pre + _to_detectron2(k): v.numpy() for k, v in body.items() if "num_batches" not in k}
        if pre:
            model.update({"backbone.fpn_lateral2.weight": torch.randn(8, 64, 1, 1).numpy(),
                          "roi_heads.box_predictor.cls_score.weight": torch.randn(2, 8).numpy()})
        path = tmp_path / f"{layout}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": model, "__author__": "test", "matching_heuristics": True}, f)
        return path
    else:
        raise AssertionError(layout)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "layout, detected",
    [("torchvision", "torchvision"), ("torchvision-under-model", "torchvision"), ("moco", "moco"),
     ("mmselfsup", "mmselfsup"), ("detectron2", "detectron2"), ("detectron2-bottom-up", "detectron2")],
)
def test_layouts_load_and_match_torchvision(tmp_path, reference, layout, detected):
    sd, x, expected = reference
    path = _write(tmp_path, layout, sd)
    model = build_backbone("resnet18", weights=path).eval()
    with torch.no_grad():
        feats = model(x)
    assert set(feats) == set(LAYER_OF)
    for lvl, want in expected.items():
        torch.testing.assert_close(feats[lvl], want, rtol=0, atol=0, msg=f"{layout} {lvl}")
    report = load_resnet_weights(ResNetFeatures(torchvision.models.resnet18()), path)
    assert report.source_layout == detected
    assert report.unexpected == []
    assert len(report.loaded) >= len([k for k in sd if not k.startswith("fc.") and "num_batches" not in k])
    assert not any(k.startswith("fc.") for k in report.loaded)
    if detected == "detectron2":
        assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)


def test_missing_keys_raise_naming_keys_and_file(tmp_path, reference):
    sd, _, _ = reference
    broken = {k: v for k, v in sd.items() if k not in ("layer4.1.conv2.weight", "layer3.0.bn1.running_var")}
    path = tmp_path / "broken_missing.pth"
    torch.save({"state_dict": broken}, path)
    model = ResNetFeatures(torchvision.models.resnet18())
    with pytest.raises(ValueError) as err:
        load_resnet_weights(model, path)
    msg = str(err.value)
    assert "broken_missing.pth" in msg and "torchvision" in msg
    assert "layer4.1.conv2.weight" in msg and "layer3.0.bn1.running_var" in msg
    assert "missing (2)" in msg


def test_wrong_shape_and_unexpected_key_raise(tmp_path, reference):
    sd, _, _ = reference
    bad = dict(sd, **{"conv1.weight": torch.randn(64, 3, 5, 5)})
    path = tmp_path / "bad_shape.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"bad_shape\.pth(.|\n)*conv1\.weight"):
        build_backbone("resnet18", weights=path)
    extra = dict(sd, **{"layer5.0.conv1.weight": torch.randn(1)})
    path = tmp_path / "extra_key.pth"
    torch.save(extra, path)
    with pytest.raises(ValueError, match=r"extra_key\.pth(.|\n)*unexpected \(1\)(.|\n)*layer5\.0\.conv1\.weight"):
        build_backbone("resnet18", weights=path)


def test_unknown_layout_and_wrong_arch_raise(tmp_path, reference):
    sd, _, _ = reference
    path = tmp_path / "odd.pth"
    torch.save({"res2_0_branch2a_w": torch.randn(1)}, path)
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        build_backbone("resnet18", weights=path)
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="r18.pth"):  # resnet18 weights into a resnet34
        build_backbone("resnet34", weights=path)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("vgg16")
    assert set(BACKBONES) == {"resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_lite0",
                              "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2"}


def test_output_shapes_and_strides():
    model = ResNetFeatures(torchvision.models.resnet18()).eval()
    x = torch.randn(2, 3, 224, 320)
    with torch.no_grad():
        feats = model(x)
    assert model.channels == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    assert model.strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    for lvl, f in feats.items():
        s = model.strides[lvl]
        assert tuple(f.shape) == (2, model.channels[lvl], 224 // s, 320 // s), lvl


def test_resnet50_channels():
    model = ResNetFeatures(torchvision.models.resnet50()).eval()
    assert model.channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 32, 32))
    assert {k: v.shape[1] for k, v in feats.items()} == model.channels


def test_out_levels_subset(reference):
    sd, x, expected = reference
    only_c5 = ResNetFeatures(torchvision.models.resnet18(), out_levels=("c5",))
    assert only_c5.channels == {"c5": 512}
    only_c2 = ResNetFeatures(torchvision.models.resnet18(), out_levels=("c2",))
    only_c2.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    with torch.no_grad():
        out = only_c2.eval()(x)
    assert list(out) == ["c2"]
    torch.testing.assert_close(out["c2"], expected["c2"], rtol=0, atol=0)
    with pytest.raises(ValueError):
        ResNetFeatures(torchvision.models.resnet18(), out_levels=("c6",))


def test_frozen_stages():
    model = ResNetFeatures(torchvision.models.resnet18(), frozen_stages=4)
    assert not any(p.requires_grad for p in model.parameters())
    model = ResNetFeatures(torchvision.models.resnet18(), frozen_stages=2, norm_eval=False).train()
    assert not any(p.requires_grad for m in (model.conv1, model.bn1, model.layer1, model.layer2) for p in m.parameters())
    assert all(p.requires_grad for m in (model.layer3, model.layer4) for p in m.parameters())
    # Frozen stages stay in eval even without norm_eval; trainable ones follow .train().
    assert not model.bn1.training and not model.layer2[0].bn1.training
    assert model.layer3[0].bn1.training
    unfrozen = ResNetFeatures(torchvision.models.resnet18(), frozen_stages=0)
    assert all(p.requires_grad for p in unfrozen.parameters())
    for bad in (-1, 5):
        with pytest.raises(ValueError):
            ResNetFeatures(torchvision.models.resnet18(), frozen_stages=bad)


def test_norm_eval_keeps_bn_stats_fixed():
    model = ResNetFeatures(torchvision.models.resnet18(), norm_eval=True)
    model.train()
    assert model.training
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = model.layer2[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.layer2[0].bn1.running_mean, before)
    # Control: without norm_eval the stats do move, so the check above can fail.
    free = ResNetFeatures(torchvision.models.resnet18(), norm_eval=False).train()
    before = free.layer2[0].bn1.running_mean.clone()
    free(torch.randn(2, 3, 64, 64))
    assert not torch.equal(free.layer2[0].bn1.running_mean, before)


def test_file_sha256(tmp_path):
    data = torch.randint(0, 256, (2_500_000,), dtype=torch.uint8).numpy().tobytes()  # > 2 chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_name_hash_is_checked(tmp_path, reference):
    sd, _, _ = reference
    good = tmp_path / "weights.pth"
    torch.save(sd, good)
    digest = file_sha256(good)
    named = tmp_path / f"resnet18-{digest[:8]}.pth"
    good.rename(named)
    assert check_name_hash(named) == digest
    assert build_backbone("resnet18", weights=named) is not None
    wrong = tmp_path / f"resnet18-{'0' * 8 if digest[0] != '0' else '1' * 8}.pth"  # a damaged download
    named.rename(wrong)
    with pytest.raises(ValueError, match=r"resnet18-\w{8}\.pth: sha256"):
        build_backbone("resnet18", weights=wrong)


def test_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="models.backbone"):
        with pytest.warns(UserWarning, match="RANDOM weights"):
            model = build_backbone("resnet18", weights=None, out_levels=("c5",), frozen_stages=4)
    assert any("meaningless" in r.getMessage() for r in caplog.records)
    assert model.out_levels == ("c5",)


def test_imagenet_constants():
    assert len(IMAGENET_MEAN) == len(IMAGENET_STD) == 3
    assert all(0 < v < 1 for v in IMAGENET_MEAN + IMAGENET_STD)
