"""ResNet feature backbone and loader for self-supervised / detector checkpoints.

Stage 1 uses C5 of a self-supervised ResNet for saliency masks; K-Net
pre-training uses C2..C5 with the backbone frozen. Checkpoints from several code
bases are converted to torchvision names and loaded with strict checks, because
a half-loaded backbone silently gives meaningless pseudo-labels.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

logger = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
LEVELS = ("c2", "c3", "c4", "c5")
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}

# torchvision's ImageNet normalisation, RGB, for pixels scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetFeatures(nn.Module):
    """A torchvision ResNet without avgpool/fc that returns C2..C5 feature maps.

    Submodules keep torchvision's attribute names (conv1, bn1, layer1..layer4), so
    ``state_dict()`` keys equal a torchvision ResNet's keys minus ``fc.*``.

    Args:
        resnet: a torchvision ``ResNet`` (its modules are shared, not copied).
        out_levels: which of 'c2','c3','c4','c5' ``forward`` returns.
        frozen_stages: 0 = nothing frozen, k = stem + layer1..layerk frozen
            (no gradients, kept in eval mode); 4 = whole backbone frozen.
        norm_eval: keep every BatchNorm in eval mode (running statistics fixed)
            even after ``.train()``; usual for small detection batches.

    Attributes:
        channels: channels of each returned level, e.g. resnet50
            {'c2': 256, 'c3': 512, 'c4': 1024, 'c5': 2048}, resnet18 64..512.
        strides: stride of each returned level w.r.t. the input (4, 8, 16, 32).
    """

    def __init__(
        self,
        resnet: torchvision.models.ResNet,
        out_levels: Sequence[str] = LEVELS,
        frozen_stages: int = 0,
        norm_eval: bool = True,
    ) -> None:
        super().__init__()
        unknown = [lvl for lvl in out_levels if lvl not in LEVELS]
        if not out_levels or unknown:
            raise ValueError(f"out_levels must be a non-empty subset of {LEVELS}, got {tuple(out_levels)}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_levels = tuple(lvl for lvl in LEVELS if lvl in out_levels)  # canonical order
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.channels = {lvl: _stage_channels(self._layer(lvl)) for lvl in self.out_levels}
        self.strides = {lvl: STRIDES[lvl] for lvl in self.out_levels}
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(True)  # applies the eval-mode rules below from the start

    def _layer(self, level: str) -> nn.Sequential:
        return getattr(self, f"layer{LEVELS.index(level) + 1}")

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages == 0:
            return []
        return [self.conv1, self.bn1] + [self._layer(lvl) for lvl in LEVELS[: self.frozen_stages]]

    def train(self, mode: bool = True) -> ResNetFeatures:
        """Set train mode, but keep frozen stages (and all BN if norm_eval) in eval."""
        super().train(mode)
        if mode:
            # Frozen stages must not update BN running stats either, otherwise
            # "frozen" features would still drift during training.
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, 3, H, W) normalised RGB -> {level: (B, channels[level], H/s, W/s)}.

        s = strides[level] (sizes round up when H, W are not multiples of 32).
        Stages after the last requested level are not run.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: dict[str, Tensor] = {}
        for lvl in LEVELS:
            x = self._layer(lvl)(x)
            if lvl in self.out_levels:
                out[lvl] = x
            if lvl == self.out_levels[-1]:
                break
        return out


def _stage_channels(layer: nn.Sequential) -> int:
    last = layer[-1]  # Bottleneck ends in bn3, BasicBlock in bn2
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def build_backbone(
    name: str = "resnet50",
    weights: Path | None = None,
    out_levels: Sequence[str] = LEVELS,
    frozen_stages: int = 0,
    norm_eval: bool = True,
) -> ResNetFeatures:
    """Build a ResNet feature extractor, loading a local checkpoint if given.

    Never downloads anything: ``weights=None`` means random init (with a loud
    warning), otherwise ``weights`` must be a local file in one of the layouts
    understood by :func:`load_backbone_weights`.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choices: {', '.join(BACKBONES)}")
    resnet = getattr(torchvision.models, name)(weights=None)
    model = ResNetFeatures(resnet, out_levels=out_levels, frozen_stages=frozen_stages, norm_eval=norm_eval)
    if weights is None:
        msg = (
            f"{name} backbone built with RANDOM weights (no weights file given): features from a "
            "random backbone make saliency masks and pseudo-labels meaningless; pass a "
            "self-supervised checkpoint for real runs"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        logger.warning(msg)
        return model
    report = load_backbone_weights(model, Path(weights))
    logger.info("loaded %d tensors into %s from %s (layout %s)", len(report.loaded), name, weights, report.source_layout)
    return model


@dataclass
class LoadReport:
    """loaded: model keys filled from the file; missing: model keys left as they
    were (only ``num_batches_tracked`` is tolerated); unexpected: empty (they
    raise); dropped: file keys ignored on purpose (fc / projection heads, MoCo
    key encoder and queue, other detector parts, non-tensor entries)."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    source_layout: str
    dropped: list[str] = field(default_factory=list)


# (prefix, stem key under the prefix, layout). A layout is detected by the
# presence of prefix + stem key; everything outside the prefix is another part
# of the training model (MoCo key encoder and queue, mm* neck/head, detectron2
# FPN/RPN/ROI heads) and is dropped. Caffe2-era detectron pickles
# ('res2_0_branch2a_w') are not supported and fail detection.
_LAYOUTS = (
    ("module.encoder_q.", "conv1.weight", "moco"),  # MoCo v1/v2, DenseCL-style
    ("encoder_q.", "conv1.weight", "moco"),
    ("module.base_encoder.", "conv1.weight", "moco"),  # MoCo v3
    ("backbone.bottom_up.", "stem.conv1.weight", "detectron2"),  # full d2 detector
    ("", "stem.conv1.weight", "detectron2"),
    ("backbone.", "conv1.weight", "mmselfsup"),  # mmselfsup / mmdet / OpenSelfSup
    ("module.", "conv1.weight", "torchvision"),  # DataParallel-wrapped torchvision
    ("", "conv1.weight", "torchvision"),
)
# Heads living inside the backbone prefix: classifier fc (torchvision), MoCo's
# MLP projector (fc.0/fc.2), detectron2's optional classifier 'linear'.
_HEADS = ("fc", "linear", "neck", "head")
_D2_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(conv[123]|shortcut)(\.norm)?\.(\w+)$")


def _d2_to_torchvision(key: str) -> str:
    """detectron2 ResNet key -> torchvision key; unknown keys pass unchanged.

    Caveat: MSRA-converted detectron2 models use stride_in_1x1 (stride in the
    1x1 conv1 of a bottleneck) while torchvision strides in conv2. The shapes
    are identical so the weights load, but the network then differs slightly
    from the one they were trained in; such models also expect BGR, 0-255
    input normalised with their own mean/std, not IMAGENET_MEAN/STD.
    """
    if key.startswith("stem.conv1.norm."):
        return "bn1." + key[len("stem.conv1.norm."):]
    if key.startswith("stem.conv1."):
        return "conv1." + key[len("stem.conv1."):]
    m = _D2_BLOCK.match(key)
    if m is None:
        return key
    stage, block, conv, norm, param = m.groups()
    prefix = f"layer{int(stage) - 1}.{block}."
    if conv == "shortcut":
        return prefix + ("downsample.1." if norm else "downsample.0.") + param
    return prefix + (f"bn{conv[-1]}." if norm else f"conv{conv[-1]}.") + param


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 .pkl files that only resolves numpy array types,
    so reading a weights file cannot execute arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_checkpoint(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about protocol-4 pickles before we fall back
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as torch_err:  # noqa: BLE001 - any failure: try the detectron2 pickle route
        try:
            with open(path, "rb") as f:
                # latin1: detectron2 model-zoo pickles were written by Python 2.
                return _NumpyUnpickler(f, encoding="latin1").load()
        except Exception as pickle_err:  # noqa: BLE001
            first_line = (str(torch_err).strip().splitlines() or [""])[0]
            raise ValueError(
                f"{path}: cannot read weights: torch.load(weights_only=True) failed ({first_line}); "
                f"numpy-only pickle fallback failed ({pickle_err}). Re-save the bare state dict with torch.save."
            ) from torch_err


def _to_state_dict(obj: Any, path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """Unwrap {'state_dict'|'model'|'module': ...} and turn arrays into tensors."""
    for _ in range(3):  # e.g. {'model': {'module': {...}}}
        inner = next((obj[k] for k in ("state_dict", "model", "module") if isinstance(obj, Mapping)
                      and isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: no state dict found (got {type(obj).__name__})")
    sd: dict[str, Tensor] = {}
    non_tensors: list[str] = []
    for k, v in obj.items():
        if isinstance(v, Tensor):
            sd[str(k)] = v
        elif isinstance(v, (np.ndarray, np.generic)):
            arr = np.asarray(v)
            # copy + native byte order: torch rejects big-endian and warns on read-only arrays
            sd[str(k)] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
        else:
            non_tensors.append(str(k))
    return sd, non_tensors


def load_backbone_weights(model: ResNetFeatures, path: Path) -> LoadReport:
    """Load a local checkpoint into ``model``, converting its layout to torchvision names.

    Layouts (auto-detected): torchvision, MoCo/DenseCL ('module.encoder_q.'),
    mmselfsup/mmdet ('backbone.'), detectron2 ('stem.', 'res2'..'res5', optional
    'backbone.bottom_up.', numpy arrays in a .pkl). The file may hold the state
    dict bare or under 'state_dict' / 'model' / 'module'.

    Raises:
        ValueError: unreadable file, unknown layout, or after conversion any
            missing backbone tensor (except num_batches_tracked), unexpected key
            or shape mismatch; the message names the file and the layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    sd, dropped = _to_state_dict(_read_checkpoint(path), path)
    found = next(((p, lay) for p, stem, lay in _LAYOUTS if p + stem in sd), None)
    if found is None:
        raise ValueError(f"{path}: unknown checkpoint layout; first keys: {list(sd)[:10]}")
    prefix, layout = found
    converted: dict[str, Tensor] = {}
    for key, value in sd.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or name.split(".", 1)[0] in _HEADS:
            dropped.append(key)
            continue
        converted[_d2_to_torchvision(name) if layout == "detectron2" else name] = value

    expected = model.state_dict()
    absent = [k for k in expected if k not in converted]
    # BN batch counters are not weights (detectron2 FrozenBN has none): tolerate.
    tolerated = [k for k in absent if k.endswith("num_batches_tracked")]
    missing = [k for k in absent if k not in tolerated]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items() if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path}: weights do not fit the backbone (detected layout '{layout}', prefix '{prefix}'):\n"
            f"  missing ({len(missing)}): {missing[:10]}\n"
            f"  unexpected ({len(unexpected)}): {unexpected[:10]}\n"
            f"  shape mismatch ({len(mismatched)}): {mismatched[:10]}"
        )
    model.load_state_dict(converted, strict=False)  # strictness enforced above
    return LoadReport(loaded=sorted(converted), missing=tolerated, unexpected=[],
                      source_layout=layout, dropped=dropped)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
