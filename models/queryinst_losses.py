"""QueryInst set-prediction losses: Sparse R-CNN's box Hungarian matching, then focal class, L1 and GIoU box,
and Dice mask losses per stage (mmdet's QueryInst recipe, reference-facts.md §3.2).

Matching (per stage, on that stage's own detached predictions, as mmdet's SparseRoIHead):
  cost[n, l] = 2 focal(n, c_l) + 5 |b_n - g_l|_1 / (W, H, W, H) - 2 GIoU(b_n, g_l)
Losses, each summed and divided by the number of matched pairs (averaged over the processes of a distributed
run, at least 1, as the reference's reduce_mean):
  2 focal over all N x K scores, 5 L1 on size-normalised xyxy boxes, 2 (1 - GIoU), and 8 Dice (eps 1e-5)
  of the 28x28 mask in each matched predicted box against the ground truth's full mask cropped to that box.
Boxes are normalised by the padded batch size (H, W): the model sees only the padded images.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss

from models.box_masks import crop_masks_to_boxes
from models.losses import dice_loss, mean_count, sigmoid_focal_loss
from models.matcher import focal_cost

MATCH_WEIGHTS = (2.0, 5.0, 2.0)  # (class, L1, GIoU)
DEFAULT_WEIGHTS = dict(cls=2.0, l1=5.0, giou=2.0, dice=8.0)
DICE_EPS = 1e-5


def box_match_cost(class_logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                   image_size: tuple[int, int], weights: tuple[float, float, float] = MATCH_WEIGHTS) -> Tensor:
    """(N, L) assignment cost of N predictions (class logits (N, K), boxes (N, 4) xyxy pixels) against L
    ground truths (labels (L,), boxes (L, 4) xyxy pixels) in an image of ``image_size`` (H, W)."""
    w_cls, w_l1, w_giou = weights
    h, w = image_size
    scale = boxes.new_tensor([w, h, w, h])
    boxes, gt_boxes = boxes.float(), gt_boxes.float()
    return (w_cls * focal_cost(class_logits.float(), gt_labels)
            + w_l1 * torch.cdist(boxes / scale, gt_boxes / scale, p=1)
            - w_giou * generalized_box_iou(boxes, gt_boxes))


@torch.no_grad()
def hungarian_box_match(class_logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                        image_size: tuple[int, int], weights: tuple[float, float, float] = MATCH_WEIGHTS
                        ) -> tuple[Tensor, Tensor]:
    """One-to-one assignment minimising :func:`box_match_cost`: (pred_idx, gt_idx), int64 CPU tensors of length
    min(N, L), sorted by pred_idx; L = 0 gives two empty tensors."""
    if len(gt_labels) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    cost = box_match_cost(class_logits.detach(), boxes.detach(), gt_labels, gt_boxes, image_size, weights)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def queryinst_losses(stages: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
                     weights: Mapping[str, float] = DEFAULT_WEIGHTS,
                     ) -> tuple[dict[str, Tensor], list[list[tuple[Tensor, Tensor]]]]:
    """Weighted losses of all stages and the assignment each stage was supervised with.

    Args:
        stages: ``QueryInst.forward``'s stage list: 'logits' (B, N, K), 'boxes' (B, N, 4) xyxy in padded-input
            pixels, 'masks' (B, N, M, M) logits inside each box.
        targets: per image dict(labels (L,), boxes (L, 4) xyxy pixels, full_masks (L, H, W) bool at the padded
            input size).
        weights: keys cls, l1, giou, dice.

    Returns:
        losses: {'s0_cls', 's0_l1', 's0_giou', 's0_dice', 's1_cls', ...}, each weighted.
        assignments: assignments[s][b] = (pred_idx, gt_idx) of stage s, image b.
    """
    w = {**DEFAULT_WEIGHTS, **weights}
    image_size = tuple(targets[0]["full_masks"].shape[-2:])
    # every stage matches min(N, L) pairs per image: one count (and one all-reduce) serves all stages
    num_proposals = stages[0]["logits"].shape[1]
    num_pos = mean_count(sum(min(num_proposals, len(t["labels"])) for t in targets), stages[0]["logits"].device)
    losses: dict[str, Tensor] = {}
    assignments: list[list[tuple[Tensor, Tensor]]] = []
    for s, stage in enumerate(stages):
        logits, boxes, masks = stage["logits"], stage["boxes"], stage["masks"]
        dev = logits.device
        matched = [hungarian_box_match(logits[b], boxes[b], t["labels"], t["boxes"], image_size)
                   for b, t in enumerate(targets)]
        assignments.append(matched)
        onehot = torch.zeros_like(logits)
        for b, (t, (p, g)) in enumerate(zip(targets, matched)):
            onehot[b, p.to(dev), t["labels"][g].to(dev)] = 1.0
        losses[f"s{s}_cls"] = w["cls"] * sigmoid_focal_loss(logits, onehot, avg_factor=num_pos)

        pred_boxes = torch.cat([boxes[b, p.to(dev)] for b, (p, _) in enumerate(matched)])
        gt_boxes = torch.cat([t["boxes"][g.to(t["boxes"].device)] for t, (_, g) in zip(targets, matched)]).to(pred_boxes)
        scale = pred_boxes.new_tensor([image_size[1], image_size[0]] * 2)
        losses[f"s{s}_l1"] = w["l1"] * F.l1_loss(pred_boxes / scale, gt_boxes / scale, reduction="sum") / num_pos
        losses[f"s{s}_giou"] = w["giou"] * generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="sum") / num_pos

        pred_masks = torch.cat([masks[b, p.to(dev)] for b, (p, _) in enumerate(matched)])
        mask_targets = torch.cat([
            crop_masks_to_boxes(t["full_masks"][g.to(t["full_masks"].device)], boxes[b, p.to(dev)].detach(),
                                masks.shape[-1])
            for b, (t, (p, g)) in enumerate(zip(targets, matched))]).to(pred_masks)
        # dice_loss is the mean over this process's masks: back to their sum, over the shared count
        losses[f"s{s}_dice"] = w["dice"] * dice_loss(pred_masks, mask_targets, eps=DICE_EPS) * len(pred_masks) / num_pos
    return losses, assignments
