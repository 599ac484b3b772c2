"""Hungarian matching of predicted masks (and class scores) to ground-truth masks, as K-Net assigns them.

cost = w_cls * focal + w_dice * dice + w_mask * mask, all on sigmoid probabilities (reference-facts §2.6):
  focal[n, l] = pos[n, c_l] - neg[n, c_l], pos = -a (1-p)^g log p, neg = -(1-a) p^g log(1-p)
  dice[n, l]  = -2 <p_n, t_l> / (|p_n|^2 + |t_l|^2 + 1e-3)
  mask[n, l]  = -(<p_n, t_l> + <1-p_n, 1-t_l>) / (h * w)
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
DICE_EPS = 1e-3


def focal_cost(class_logits: Tensor, gt_labels: Tensor, alpha: float = FOCAL_ALPHA,
               gamma: float = FOCAL_GAMMA) -> Tensor:
    """(N, C) logits, (L,) labels -> (N, L) focal classification cost."""
    p = class_logits.sigmoid()
    eps = 1e-12  # keeps log finite for saturated scores
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    return (pos - neg)[:, gt_labels]


def dice_cost(probs: Tensor, targets: Tensor) -> Tensor:
    """(N, P) probabilities, (L, P) targets -> (N, L) negative soft Dice."""
    inter = probs @ targets.T
    denom = (probs * probs).sum(1)[:, None] + (targets * targets).sum(1)[None, :] + DICE_EPS
    return -2 * inter / denom


def mask_cost(probs: Tensor, targets: Tensor) -> Tensor:
    """(N, P) probabilities, (L, P) targets -> (N, L) negative mean pixel agreement."""
    agree = probs @ targets.T + (1 - probs) @ (1 - targets).T
    return -agree / probs.shape[1]


def match_cost(mask_logits: Tensor, class_logits: Tensor | None, gt_masks: Tensor, gt_labels: Tensor,
               weights: tuple[float, float, float] = (2.0, 4.0, 1.0)) -> Tensor:
    """(N, L) assignment cost; weights = (class, dice, mask). No class term when ``class_logits`` is None."""
    if mask_logits.shape[-2:] != gt_masks.shape[-2:]:
        raise ValueError(f"mask sizes differ: predictions {tuple(mask_logits.shape[-2:])}, "
                         f"targets {tuple(gt_masks.shape[-2:])}")
    w_cls, w_dice, w_mask = weights
    probs = mask_logits.flatten(1).float().sigmoid()
    targets = gt_masks.flatten(1).float()
    cost = w_dice * dice_cost(probs, targets) + w_mask * mask_cost(probs, targets)
    if class_logits is not None:
        cost = cost + w_cls * focal_cost(class_logits.float(), gt_labels)
    return cost


@torch.no_grad()
def hungarian_match(mask_logits: Tensor, class_logits: Tensor | None, gt_masks: Tensor, gt_labels: Tensor,
                    weights: tuple[float, float, float] = (2.0, 4.0, 1.0)) -> tuple[Tensor, Tensor]:
    """One-to-one assignment minimising :func:`match_cost`.

    Args:
        mask_logits: (N, h, w) predicted mask logits.
        class_logits: (N, C) class logits, or None (e.g. the RPN stage) for a zero class cost.
        gt_masks: (L, h, w) float targets in [0, 1]; gt_labels: (L,) long.
        weights: (class, dice, mask) cost weights.

    Returns:
        (pred_idx, gt_idx), two int64 CPU tensors of length min(N, L): prediction ``pred_idx[i]`` is matched
        to target ``gt_idx[i]``; the pairs come sorted by ``pred_idx`` (scipy's row order). L = 0 gives two
        empty tensors.
    """
    if gt_masks.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    cost = match_cost(mask_logits.detach(), None if class_logits is None else class_logits.detach(),
                      gt_masks, gt_labels, weights)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
