"""torchvision's Mask R-CNN as the CNN baseline (paper §4.1), on the same backbone and weights as our K-Net.

The backbone is ours (``models.backbone.build_backbone``: every backbone and weights layout K-Net accepts)
under torchvision's FPN with a max-pooled extra level, as torchvision builds its ResNet-FPN. Unlike
torchvision's FrozenBatchNorm2d, batch norms keep trainable affine parameters with fixed statistics
(``norm_eval``), as in K-Net's fine-tuning. ``MaskRCNNAdapter`` gives it K-Net's fine-tuning interface:
contiguous labels 0..C-1 and ``predict`` dicts like ``KNet.predict``. For pre-training on pseudo masks,
``drop_loss_iou`` puts CutLER's DropLoss (``models.drop_loss``) in place of the RoI classification loss.

Input convention differs from K-Net: images are 0-1 RGB tensors (3, H, W) of any size, NOT normalised;
torchvision's GeneralizedRCNNTransform normalises them (ImageNet mean/std) and resizes them so the short
side is ``min_size`` (long side at most ``max_size``), and maps outputs back to the input size.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from models.backbone import IMAGENET_MEAN, IMAGENET_STD, LEVELS, FeatureBackbone, build_backbone
from models.drop_loss import with_drop_loss
from models.saliency import mask_boxes
from models.settings import MaskRCNNConfig


class BackboneFPN(nn.Module):
    """Our feature backbone + torchvision's FPN: ``forward`` gives the OrderedDict of P2..P6 that
    torchvision's detection heads expect ('0'..'3' at strides 4..32, 'pool' at 64)."""

    def __init__(self, body: FeatureBackbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork([body.channels[lvl] for lvl in LEVELS], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), feats[lvl]) for i, lvl in enumerate(LEVELS)))


def build_maskrcnn(cfg: MaskRCNNConfig, backbone_weights: Path | None = None,
                   drop_loss_iou: float | None = None) -> MaskRCNN:
    """torchvision Mask R-CNN on our backbone (``None`` weights: random, with a loud warning).

    drop_loss_iou: train the RoI classifier with CutLER's DropLoss at this IoU threshold (None: torchvision's
    loss). It changes the training loss only: parameters, state dict and inference stay the same."""
    body = build_backbone(cfg.backbone, backbone_weights, frozen_stages=cfg.frozen_stages, norm_eval=True)
    c, classes = cfg.fpn_channels, cfg.num_classes + 1  # torchvision counts the background as a class
    mask_layers = [cfg.mask_head_channels] * 4
    model = MaskRCNN(
        BackboneFPN(body, c), min_size=cfg.min_size, max_size=cfg.max_size,
        box_head=TwoMLPHead(c * 7 * 7, cfg.box_head_dim), box_predictor=FastRCNNPredictor(cfg.box_head_dim, classes),
        mask_head=MaskRCNNHeads(c, mask_layers, 1),
        mask_predictor=MaskRCNNPredictor(mask_layers[-1], cfg.mask_head_channels, classes),
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image, box_detections_per_img=cfg.box_detections_per_img)
    if drop_loss_iou is not None:
        model.roi_heads = with_drop_loss(model.roi_heads, drop_loss_iou)
    return model


class MaskRCNNAdapter(nn.Module):
    """Mask R-CNN behind K-Net's fine-tuning interface: ``loss`` (also ``forward``) and ``predict`` on 0-1 RGB
    image lists."""

    def __init__(self, cfg: MaskRCNNConfig, model: MaskRCNN) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model

    @contextmanager
    def _mode(self, training: bool) -> Iterator[None]:
        # torchvision returns losses in train mode and detections in eval mode; both modes are otherwise
        # equivalent here (FrozenBN, no dropout) apart from proposal counts, so switching is safe.
        was_training = self.training
        self.train(training)
        try:
            yield
        finally:
            self.train(was_training)

    def loss(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Mask R-CNN losses (RPN objectness/box, RoI classifier/box, mask), each a scalar tensor.

        images: 0-1 RGB (3, H, W) each; targets: dict(masks (L, H, W) bool/uint8, labels (L,) long in
        0..C-1, optional boxes (L, 4) xyxy). L = 0 is allowed (a negative image).
        """
        tv_targets = []
        for t in targets:
            masks, labels = t["masks"].bool(), t["labels"].long()
            if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.cfg.num_classes:
                raise ValueError(f"labels must be in 0..{self.cfg.num_classes - 1}, got {labels.tolist()}")
            # an empty mask gives a zero-size box, which torchvision rejects, and supervises nothing
            keep = masks.flatten(1).any(1)
            boxes = t["boxes"].float() if "boxes" in t else mask_boxes(masks)
            tv_targets.append(dict(masks=masks[keep].to(torch.uint8), labels=labels[keep] + 1,  # background is 0
                                   boxes=boxes[keep]))
        with self._mode(True):
            return self.model(list(images), tv_targets)

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``loss``; training calls the module itself, so that DistributedDataParallel averages gradients."""
        return self.loss(images, targets)

    @torch.no_grad()
    def predict(self, images: Sequence[Tensor], orig_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections per image, in ``KNet.predict``'s format, sorted by decreasing score.

        images: 0-1 RGB (3, H, W) each; orig_sizes[b] = (h0, w0) size to return masks and boxes at (the
        image's size before the caller resized it, if it did). Returns dict(scores (k,), labels (k,) long
        in 0..C-1, masks (k, h0, w0) bool, boxes (k, 4) xyxy float: the detector's boxes, not mask-tight
        ones), k <= box_detections_per_img.
        """
        with self._mode(False):
            outputs = self.model(list(images))
        results = []
        for image, out, (h0, w0) in zip(images, outputs, orig_sizes):
            h, w = image.shape[-2:]
            # soft masks (k, 1, h, w) are pasted at the input size; resize before thresholding, as K-Net does
            probs = F.interpolate(out["masks"], size=(h0, w0), mode="bilinear", align_corners=False)
            scale = out["boxes"].new_tensor([w0 / w, h0 / h, w0 / w, h0 / h])
            results.append(dict(scores=out["scores"], labels=out["labels"] - 1,
                                 masks=probs[:, 0] > self.cfg.mask_threshold, boxes=out["boxes"] * scale))
        return results


def build_maskrcnn_adapter(cfg: MaskRCNNConfig, backbone_weights: Path | None = None,
                           drop_loss_iou: float | None = None) -> MaskRCNNAdapter:
    """``build_maskrcnn`` wrapped in ``MaskRCNNAdapter``."""
    return MaskRCNNAdapter(cfg, build_maskrcnn(cfg, backbone_weights, drop_loss_iou))


def maskrcnn_optimizer(model: nn.Module, lr: float = 0.02, momentum: float = 0.9,
                       weight_decay: float = 1e-4) -> torch.optim.SGD:
    """SGD of §4.1 over the trainable parameters (frozen backbone stages have requires_grad False).

    lr 0.02 is for a total batch of 16 images; scale it linearly for other batch sizes.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
