"""K-Net set-prediction losses: sigmoid focal classification, Dice and BCE on matched masks.

Every stage is Hungarian-matched (:func:`models.matcher.hungarian_match`) and supervised with
cls (focal) + dice + mask (BCE) terms; the RPN stage has no class scores, so only dice + mask, plus the
semantic head's per-pixel focal loss against a map painted with its matched targets' labels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from models.matcher import FOCAL_ALPHA, FOCAL_GAMMA, hungarian_match

DEFAULT_WEIGHTS = dict(cls=2.0, dice=4.0, mask=1.0, rpn_dice=4.0, rpn_mask=1.0, rpn_seg=1.0)


def mean_count(count: float, device: torch.device) -> float:
    """A count of this process's batch (matched objects, targets) averaged over the processes of a distributed
    run, at least 1 (mmdet's ``reduce_mean(...).clamp(min=1)``): every process divides its sums by the same
    number, so once DDP averages the gradients every object of the global batch weighs alike, however the
    objects fall on the processes; the floor keeps batches without objects finite."""
    value = torch.tensor(float(count), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return max(1.0, value.item())


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA,
                       avg_factor: float = 1.0) -> Tensor:
    """Focal loss (Lin et al.) summed over all elements and divided by ``avg_factor``.

    logits, targets: same shape; targets are 0/1 (one-hot, background = all zeros).
    """
    p = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_wrong = p * (1 - targets) + (1 - p) * targets  # 1 - p_t
    weight = (alpha * targets + (1 - alpha) * (1 - targets)) * p_wrong.pow(gamma)
    return (bce * weight).sum() / avg_factor


def dice_loss(mask_logits: Tensor, targets: Tensor, eps: float = 1e-3) -> Tensor:
    """Mean over masks of 1 - 2 sum(a b) / (sum a^2 + sum b^2 + 2 eps), a = sigmoid(logits) (mmdet 2.x form).

    mask_logits, targets: (K, h, w); K = 0 gives a zero that still depends on ``mask_logits``.
    """
    a = mask_logits.flatten(1).sigmoid()
    b = targets.flatten(1).float()
    dice = 2 * (a * b).sum(1) / ((a * a).sum(1) + eps + (b * b).sum(1) + eps)
    return (1 - dice).mean() if len(dice) else mask_logits.sum() * 0


def mask_bce_loss(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """BCE-with-logits averaged over every pixel of the (K, h, w) matched masks; K = 0 gives 0."""
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(mask_logits, targets.float())


def semantic_targets(targets: Sequence[Mapping[str, Tensor]], matched: Sequence[tuple[Tensor, Tensor]],
                     num_classes: int) -> Tensor:
    """(B, K, h, w) one-hot per-pixel labels for the semantic head: each matched target's label painted where
    its (soft) mask is above zero, in the order of the matched predictions (a later one paints over an
    earlier one where they overlap); background is all zeros, as in the reference's ConvKernelHead."""
    maps = []
    for t, (_, g) in zip(targets, matched):
        masks = t["masks"]
        label_map = torch.full(masks.shape[-2:], num_classes, dtype=torch.long, device=masks.device)
        for i in g.tolist():
            label_map[masks[i] > 0] = t["labels"][i]
        maps.append(F.one_hot(label_map, num_classes + 1)[..., :num_classes].permute(2, 0, 1))
    return torch.stack(maps).float()


def knet_losses(stages: Sequence[Mapping[str, Tensor | None]], targets: Sequence[Mapping[str, Tensor]],
                weights: Mapping[str, float] = DEFAULT_WEIGHTS,
                ) -> tuple[dict[str, Tensor], list[list[tuple[Tensor, Tensor]]]]:
    """Weighted losses of all stages and the assignment each stage was supervised with.

    Args:
        stages: ``KNet.forward``'s stage list: stage 0 is the RPN stage ('logits' None, 'seg' (B, K, h, w) the
            semantic logits), each dict has 'masks' (B, N, h, w) logits at stride 4 and 'logits' (B, N, K) or None.
        targets: per image dict(masks=(L, h, w) float in [0, 1] (soft: the fraction of each cell the object
            covers), labels=(L,) long).
        weights: keys cls, dice, mask (update stages) and rpn_dice, rpn_mask, rpn_seg (stage 0).

    Returns:
        losses: {'s0_dice', 's0_mask', 's0_seg', 's1_cls', 's1_dice', 's1_mask', ...}, each a scalar already
            multiplied by its weight, so the training loss is their sum and a NaN can be named.
        assignments: assignments[s][b] = (pred_idx, gt_idx) used for stage s of image b.

    Stage 0 is matched on its own masks; stage s >= 1 on stage s-1's detached masks and class logits (no
    class cost for s = 1 because the RPN stage has none), as in K-Net without post-assignment. The semantic
    term is a sigmoid focal loss summed over pixels and classes and divided by the number of foreground pixels
    in the batch (at least 1), as the reference's ``loss_rpn_seg``.
    """
    w = {**DEFAULT_WEIGHTS, **weights}
    losses: dict[str, Tensor] = {}
    assignments: list[list[tuple[Tensor, Tensor]]] = []
    for s, stage in enumerate(stages):
        ref = stages[max(s - 1, 0)]  # predictions the assignment is computed on
        ref_logits = ref["logits"] if s > 0 else None
        matched = [
            hungarian_match(ref["masks"][b], None if ref_logits is None else ref_logits[b],
                            t["masks"], t["labels"])
            for b, t in enumerate(targets)
        ]
        assignments.append(matched)
        masks = stage["masks"]  # same size as the targets: the matcher has checked it
        dev = masks.device
        pred = torch.cat([masks[b, p.to(dev)] for b, (p, _) in enumerate(matched)])
        gt = torch.cat([t["masks"][g.to(t["masks"].device)] for t, (_, g) in zip(targets, matched)]).to(pred)
        prefix = "rpn_" if s == 0 else ""
        losses[f"s{s}_dice"] = w[prefix + "dice"] * dice_loss(pred, gt)
        losses[f"s{s}_mask"] = w[prefix + "mask"] * mask_bce_loss(pred, gt)
        if stage.get("seg") is not None:
            seg = stage["seg"]
            seg_targets = semantic_targets(targets, matched, seg.shape[1]).to(seg)
            num_fg = max(1.0, float(seg_targets.sum()))
            losses[f"s{s}_seg"] = w["rpn_seg"] * sigmoid_focal_loss(seg, seg_targets, avg_factor=num_fg)
        if stage["logits"] is not None:
            logits = stage["logits"]
            onehot = torch.zeros_like(logits)
            for b, (t, (p, g)) in enumerate(zip(targets, matched)):
                onehot[b, p.to(dev), t["labels"][g].to(dev)] = 1.0
            num_pos = mean_count(sum(len(p) for p, _ in matched), dev)
            losses[f"s{s}_cls"] = w["cls"] * sigmoid_focal_loss(logits, onehot, avg_factor=num_pos)
    return losses, assignments
