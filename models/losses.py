"""K-Net set-prediction losses: sigmoid focal classification, Dice and BCE on matched masks.

Every stage is Hungarian-matched (:func:`models.matcher.hungarian_match`) and supervised with
cls (focal) + dice + mask (BCE) terms; the RPN stage has no class scores, so only dice + mask.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from models.matcher import FOCAL_ALPHA, FOCAL_GAMMA, hungarian_match

DEFAULT_WEIGHTS = dict(cls=2.0, dice=4.0, mask=1.0, rpn_dice=4.0, rpn_mask=1.0)


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


def knet_losses(stages: Sequence[Mapping[str, Tensor | None]], targets: Sequence[Mapping[str, Tensor]],
                weights: Mapping[str, float] = DEFAULT_WEIGHTS,
                ) -> tuple[dict[str, Tensor], list[list[tuple[Tensor, Tensor]]]]:
    """Weighted losses of all stages and the assignment each stage was supervised with.

    Args:
        stages: ``KNet.forward``'s stage list: stage 0 is the RPN stage ('logits' None), each dict has
            'masks' (B, N, h, w) logits at stride 4 and 'logits' (B, N, C) or None.
        targets: per image dict(masks=(L, h, w) float in {0, 1}, labels=(L,) long).
        weights: keys cls, dice, mask (update stages) and rpn_dice, rpn_mask (stage 0).

    Returns:
        losses: {'s0_dice', 's0_mask', 's1_cls', 's1_dice', 's1_mask', ...}, each a scalar already
            multiplied by its weight, so the training loss is their sum and a NaN can be named.
        assignments: assignments[s][b] = (pred_idx, gt_idx) used for stage s of image b.

    Stage 0 is matched on its own masks; stage s >= 1 on stage s-1's detached masks and class logits (no
    class cost for s = 1 because the RPN stage has none), as in K-Net without post-assignment. The RPN
    semantic-segmentation focal term of the reference (``loss_rpn_seg`` on its ``conv_seg`` map) is not
    computed: our RPN stage has no semantic head, and that term only trains that head.
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
        if stage["logits"] is not None:
            logits = stage["logits"]
            onehot = torch.zeros_like(logits)
            for b, (t, (p, g)) in enumerate(zip(targets, matched)):
                onehot[b, p.to(dev), t["labels"][g].to(dev)] = 1.0
            # the reference clamps the positive count at 1 so images without targets still give a finite loss
            num_pos = max(1.0, float(sum(len(p) for p, _ in matched)))
            losses[f"s{s}_cls"] = w["cls"] * sigmoid_focal_loss(logits, onehot, avg_factor=num_pos)
    return losses, assignments
