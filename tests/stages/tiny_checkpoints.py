"""Checkpoints of tiny random models in the layouts `sp pretrain` and `sp finetune` write, for the tests of the
commands that read them (kernel maps, comparisons)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from models.knet import KNetConfig, build_knet
from models.maskrcnn import MaskRCNNConfig, build_maskrcnn_adapter
from pipeline.demo_data import CATEGORIES
from stages.training import save_checkpoint


def tiny_checkpoint(path: Path, model_kind: str = "knet", kind: str = "sp-finetune", num_kernels: int = 4,
                    seed: int = 0, image_size: int = 64, max_size: int = 96) -> Path:
    """A ResNet-18 K-Net (`num_kernels` kernels; one class when pre-trained, the demo data's
    categories when fine-tuned) or
    Mask R-CNN with random weights, saved as `kind` would save it, trained at image_size / max_size."""
    torch.manual_seed(seed)
    num_classes = 1 if kind == "sp-pretrain" else len(CATEGORIES)
    if model_kind == "knet":
        config = KNetConfig.small(num_classes=num_classes, num_kernels=num_kernels)
        model = build_knet(config)
    else:
        config = MaskRCNNConfig.small(num_classes=num_classes, min_size=image_size, max_size=max_size,
                                      box_detections_per_img=8)  # its mask head dominates CPU inference
        model = build_maskrcnn_adapter(config)
    state = {"model": model.state_dict(), "model_config": dataclasses.asdict(config), "kind": kind, "epoch": 1,
             "args": {"image_size": image_size, "max_size": max_size}}
    if kind == "sp-finetune":
        state.update(model_kind=model_kind, categories=CATEGORIES)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state)
    return path
