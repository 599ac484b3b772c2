"""Reading backbone weight files: torch or numpy-only pickles, state-dict unwrapping, the ResNet layouts of
several code bases converted to torchvision names, and the file's sha256.

Loading is strict everywhere, because a half-loaded backbone silently gives meaningless pseudo-labels.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


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


def read_checkpoint(path: Path) -> Any:
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


def to_state_dict(obj: Any, path: Path) -> tuple[dict[str, Tensor], list[str]]:
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


def load_resnet_weights(model: nn.Module, path: Path) -> LoadReport:
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
    sd, dropped = to_state_dict(read_checkpoint(path), path)
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


_NAME_HASH = re.compile(r"-([0-9a-f]{8,})\.(pth|pt|pkl|bin)$")


def check_name_hash(path: Path) -> str:
    """The file's sha256, checked against the hex digits its name ends with where it has them
    (``efficientnet-lite0-57934424.pth``, torchvision's ``resnet50-0676ba61.pth``): a truncated or
    replaced download is caught before it becomes features."""
    digest = file_sha256(path)
    m = _NAME_HASH.search(Path(path).name)
    if m and not digest.startswith(m.group(1)):
        raise ValueError(f"{path}: sha256 {digest[:16]}... does not start with {m.group(1)} as its name says; "
                         "the file is damaged or not the one named: reinstall or re-download it")
    return digest


def weights_record(path: Path | None) -> dict:
    """What stores and checkpoints record of the backbone weights: the file and its sha256 (None: random)."""
    return {"backbone_weights": None if path is None else str(path),
            "backbone_weights_sha256": None if path is None else file_sha256(path)}
