"""CutLER's DropLoss for torchvision's Mask R-CNN, for pre-training on pseudo masks that miss objects.

A region the RoI head samples as background may hold an object the pseudo labels missed; the plain loss
teaches it to be background. DropLoss (Wang et al., CutLER, CVPR 2023) leaves the classification loss
of a sampled region out when the box the head predicts for it overlaps no pseudo box by more than an IoU
threshold (CutLER: 0.01): such a region is not evidence of background. The others keep their usual
cross-entropy, and the sum is divided by the number of all sampled regions, as CutLER's weighted mean does.
The box regression, mask and RPN losses are torchvision's.

``DropLossRoIHeads`` is torchvision's ``RoIHeads`` with that classification loss; its parameters and its
inference are torchvision's, so its state dict loads into a plain Mask R-CNN (fine-tuning uses the plain
loss). The departures from CutLER's code are listed in docs/maskrcnn_pretraining.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import box_iou

if TYPE_CHECKING:
    from torchvision.models.detection._utils import BoxCoder  # RoIHeads.box_coder


def overlaps_a_target(pred_boxes: Tensor, target_boxes: Tensor, iou_threshold: float) -> Tensor:
    """(R,) bool: whether any of a region's predicted boxes overlaps any target box by IoU > iou_threshold.

    pred_boxes: (R, K, 4) xyxy, the region's box for each of the K foreground classes; target_boxes: (M, 4)
    xyxy. Without targets (an image without pseudo masks) every region's best IoU is 0."""
    regions, classes = pred_boxes.shape[:2]
    if len(target_boxes) == 0 or regions == 0:
        best = pred_boxes.new_zeros(regions)
    else:
        best = box_iou(pred_boxes.reshape(-1, 4), target_boxes).amax(1).view(regions, classes).amax(1)
    return best > iou_threshold


def drop_loss_classifier(class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                         labels: list[Tensor], target_boxes: list[Tensor], box_coder: BoxCoder,
                         iou_threshold: float) -> Tensor:
    """The RoI classification loss with DropLoss: a scalar.

    class_logits: (R, K + 1) over the sampled regions of all images (class 0: background); box_regression:
    (R, (K + 1) * 4), torchvision's per-class box deltas; proposals[b]: (R_b, 4) the sampled regions of image b;
    labels[b]: (R_b,) their classes (0: background); target_boxes[b]: (M_b, 4) its pseudo boxes. A region keeps
    its cross-entropy when one of its predicted foreground boxes (the proposal moved by the head's deltas,
    not the proposal itself, as CutLER) overlaps a target box by IoU > iou_threshold; the sum is divided by R.
    With every region kept this is torchvision's ``fastrcnn_loss`` classification term.
    """
    with torch.no_grad():  # which regions count is a selection, not something to learn
        pred_boxes = box_coder.decode(box_regression.detach(), proposals)[:, 1:]  # (R, K, 4): foreground classes
        keep = torch.cat([overlaps_a_target(boxes, targets.to(boxes), iou_threshold)
                          for boxes, targets in zip(pred_boxes.split([len(p) for p in proposals]), target_boxes)])
    cross_entropy = F.cross_entropy(class_logits, torch.cat(labels), reduction="none")
    return (cross_entropy * keep).sum() / max(len(cross_entropy), 1)


class DropLossRoIHeads(RoIHeads):
    """torchvision's RoIHeads whose training classification loss is ``drop_loss_classifier``.

    torchvision computes that loss inside ``RoIHeads.forward`` from values it does not return, so this class
    keeps them as they pass (the sampled regions from ``select_training_samples``, the box predictor's
    outputs through a forward hook) and replaces ``loss_classifier`` after the forward; nothing is computed
    twice. Build it with ``with_drop_loss``.
    """

    def __init__(self, *args, drop_loss_iou: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop_loss_iou = drop_loss_iou
        self._seen: dict = {}  # what the forward in progress sampled and predicted (training only)
        self.box_predictor.register_forward_hook(self._keep_predictions)

    def _keep_predictions(self, module, inputs, outputs) -> None:
        if self.training:
            self._seen["predictions"] = outputs

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self._seen.update(proposals=proposals, labels=labels, target_boxes=[t["boxes"] for t in targets])
        return proposals, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):
        self._seen = {}
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training:
            seen, self._seen = self._seen, {}
            class_logits, box_regression = seen["predictions"]
            losses["loss_classifier"] = drop_loss_classifier(class_logits, box_regression, seen["proposals"],
                                                             seen["labels"], seen["target_boxes"], self.box_coder,
                                                             self.drop_loss_iou)
        return result, losses


def with_drop_loss(heads: RoIHeads, iou_threshold: float) -> DropLossRoIHeads:
    """``heads`` (its modules, not copies, and its sampling and test settings) with DropLoss."""
    if heads.has_keypoint():
        raise ValueError("DropLoss is built for box and mask heads; these RoI heads also predict keypoints")
    matcher, sampler = heads.proposal_matcher, heads.fg_bg_sampler
    return DropLossRoIHeads(
        heads.box_roi_pool, heads.box_head, heads.box_predictor, matcher.high_threshold, matcher.low_threshold,
        sampler.batch_size_per_image, sampler.positive_fraction, heads.box_coder.weights, heads.score_thresh,
        heads.nms_thresh, heads.detections_per_img, mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head,
        mask_predictor=heads.mask_predictor, drop_loss_iou=iou_threshold)
