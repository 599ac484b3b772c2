"""Mask2Former's set criterion: Hungarian matching on uniformly sampled points, class cross-entropy with a
down-weighted no-object class, and mask BCE + Dice on importance-sampled points (Cheng et al. 2022, §3.3;
detectron2's ``HungarianMatcher`` / ``SetCriterion`` and PointRend's point sampling).

Every prediction step (the initial queries and each decoder layer) is matched on its own predictions and
supervised on its own. Masks are compared at K points of the unit square rather than on the full map: the
predicted logits (stride 4) and the targets (full resolution) are both read there by bilinear sampling.

Shapes: N queries, K classes (logits have K + 1 columns, the last one no-object), L targets of an image,
M matched pairs of a batch, P points.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from models.losses import mean_count

WEIGHTS = dict(cls=2.0, mask=5.0, dice=5.0)  # the same weights serve matching costs and losses
NO_OBJECT_WEIGHT = 0.1


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of (R, h, w) maps at (R, P, 2) points (x, y) in [0, 1] -> (R, P).

    align_corners=False: cell (i, j) of an h x w map is the point ((j + 0.5) / w, (i + 0.5) / h), so maps of
    different resolutions covering the same image are read at the same places."""
    grid = (2 * coords - 1)[:, :, None, :]
    return F.grid_sample(maps[:, None].float(), grid, mode="bilinear", align_corners=False)[:, 0, :, 0]


@torch.no_grad()
def importance_points(mask_logits: Tensor, num_points: int, oversample_ratio: float,
                      importance_sample_ratio: float) -> Tensor:
    """(R, P, 2) points per mask: the ``importance_sample_ratio * P`` most uncertain (|logit| smallest) of
    ``oversample_ratio * P`` uniform candidates, and the rest uniform (PointRend's training sampler).

    mask_logits: (R, h, w)."""
    r = mask_logits.shape[0]
    candidates = torch.rand(r, int(num_points * oversample_ratio), 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, candidates).abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, idx[:, :, None].expand(-1, -1, 2))
    uniform = torch.rand(r, num_points - num_uncertain, 2, device=mask_logits.device)
    return torch.cat([chosen, uniform], 1)


def sigmoid_ce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """(N, P) logits, (L, P) targets in [0, 1] -> (N, L) mean BCE of every prediction with every target."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """(N, P) logits, (L, P) targets -> (N, L) Dice loss 1 - (2 |p t| + 1) / (|p| + |t| + 1)."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def match_cost(class_logits: Tensor, point_logits: Tensor, labels: Tensor, point_targets: Tensor) -> Tensor:
    """(N, L) cost = 2 (-softmax prob of the target class) + 5 BCE + 5 Dice on the same points.

    class_logits: (N, K + 1); point_logits: (N, P); labels: (L,); point_targets: (L, P)."""
    cost_class = -class_logits.float().softmax(-1)[:, labels]
    logits, targets = point_logits.float(), point_targets.float()
    return (WEIGHTS["cls"] * cost_class + WEIGHTS["mask"] * sigmoid_ce_cost(logits, targets)
            + WEIGHTS["dice"] * dice_cost(logits, targets))


@torch.no_grad()
def hungarian_match(class_logits: Tensor, point_logits: Tensor, labels: Tensor, point_targets: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """One image's one-to-one assignment minimising :func:`match_cost` (scipy's linear_sum_assignment).

    class_logits: (N, K + 1); point_logits: (N, P); labels: (L,); point_targets: (L, P), read at the same
    points. Returns (pred_idx, gt_idx), int64 CPU tensors of length min(N, L), sorted by pred_idx."""
    if len(labels) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    cost = match_cost(class_logits.detach(), point_logits.detach(), labels.to(class_logits.device),
                      point_targets.to(point_logits.device))
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


@torch.no_grad()
def match_on_uniform_points(class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor,
                            num_points: int) -> tuple[Tensor, Tensor]:
    """:func:`hungarian_match` with every predicted and target mask read at the same ``num_points`` uniform
    points. mask_logits: (N, h, w); masks: (L, H, W) at any resolution."""
    coords = torch.rand(1, num_points, 2, device=mask_logits.device)
    point_logits = point_sample(mask_logits, coords.expand(len(mask_logits), -1, -1))
    point_targets = point_sample(masks, coords.expand(len(masks), -1, -1).to(masks.device))
    return hungarian_match(class_logits, point_logits, labels, point_targets)


def point_mask_losses(point_logits: Tensor, point_targets: Tensor, num_masks: float) -> tuple[Tensor, Tensor]:
    """(BCE, Dice) of matched masks read at the same points, each summed over masks / ``num_masks``.

    point_logits, point_targets: (M, P); BCE is the mean over a mask's points."""
    bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(1)
    probs = point_logits.sigmoid()
    dice = 1 - (2 * (probs * point_targets).sum(1) + 1) / (probs.sum(1) + point_targets.sum(1) + 1)
    return bce.sum() / num_masks, dice.sum() / num_masks


def mask2former_losses(stages: Sequence[Mapping[str, Tensor | None]], targets: Sequence[Mapping[str, Tensor]],
                       num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                       ) -> tuple[dict[str, Tensor], list[list[tuple[Tensor, Tensor]]]]:
    """Weighted losses of every prediction step and the assignment each was supervised with.

    stages: dicts with 'logits' (B, N, K + 1) and 'masks' (B, N, h, w) logits; targets: per image
    'labels' (L,) and 'full_masks' (L, H, W) bool. Returns ({'d0_cls', 'd0_mask', 'd0_dice', 'd1_cls', ...},
    assignments[s][b] = (pred_idx, gt_idx)). Mask terms are normalised by the batch's number of targets averaged
    over the processes (:func:`models.losses.mean_count`), the class term is the weighted mean over all queries.
    """
    num_masks = mean_count(sum(len(t["labels"]) for t in targets), stages[0]["logits"].device)
    losses: dict[str, Tensor] = {}
    assignments = []
    for s, stage in enumerate(stages):
        logits, masks = stage["logits"], stage["masks"]
        dev, num_classes = logits.device, logits.shape[-1] - 1
        matched = [match_on_uniform_points(logits[b], masks[b], t["labels"], t["full_masks"], num_points)
                   for b, t in enumerate(targets)]
        assignments.append(matched)
        target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=dev)
        for b, (t, (p, g)) in enumerate(zip(targets, matched)):
            target_classes[b, p.to(dev)] = t["labels"][g.to(t["labels"].device)].to(dev)
        class_weight = torch.ones(num_classes + 1, device=dev)
        class_weight[-1] = NO_OBJECT_WEIGHT
        losses[f"d{s}_cls"] = WEIGHTS["cls"] * F.cross_entropy(logits.transpose(1, 2), target_classes, class_weight)
        pred = torch.cat([masks[b, p.to(dev)] for b, (p, _) in enumerate(matched)])
        if len(pred) == 0:  # no target in the batch: zero terms that keep the graph
            losses[f"d{s}_mask"] = losses[f"d{s}_dice"] = masks.sum() * 0
            continue
        gt = torch.cat([t["full_masks"][g.to(t["full_masks"].device)] for t, (_, g) in zip(targets, matched)])
        coords = importance_points(pred, num_points, oversample_ratio, importance_sample_ratio)
        point_targets = point_sample(gt, coords.to(gt.device)).to(dev)
        bce, dice = point_mask_losses(point_sample(pred, coords), point_targets, num_masks)
        losses[f"d{s}_mask"], losses[f"d{s}_dice"] = WEIGHTS["mask"] * bce, WEIGHTS["dice"] * dice
    return losses, assignments
