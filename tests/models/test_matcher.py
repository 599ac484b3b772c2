"""Hungarian matcher: cost terms against hand loops, assignment against brute force."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from models.matcher import hungarian_match, match_cost


def _hand_cost(mask_logits, class_logits, gt_masks, gt_labels, weights=(2.0, 4.0, 1.0)):
    """The cost matrix of reference-facts §2.6, one (n, l) pair at a time in plain Python floats."""
    n_pred, n_gt = mask_logits.shape[0], gt_masks.shape[0]
    cost = torch.zeros(n_pred, n_gt, dtype=torch.float64)
    for n in range(n_pred):
        p = [1 / (1 + math.exp(-v)) for v in mask_logits[n].flatten().tolist()]
        for l in range(n_gt):
            t = gt_masks[l].flatten().tolist()
            dot = sum(a * b for a, b in zip(p, t))
            dice = -2 * dot / (sum(a * a for a in p) + sum(b * b for b in t) + 1e-3)
            agree = dot + sum((1 - a) * (1 - b) for a, b in zip(p, t))
            mask = -agree / len(p)
            focal = 0.0
            if class_logits is not None:
                s = 1 / (1 + math.exp(-class_logits[n, gt_labels[l]].item()))
                pos = -math.log(s) * 0.25 * (1 - s) ** 2
                neg = -math.log(1 - s) * 0.75 * s ** 2
                focal = pos - neg
            cost[n, l] = weights[0] * focal + weights[1] * dice + weights[2] * mask
    return cost


def _case(n_pred, n_gt, num_classes=3, seed=0, size=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    mask_logits = torch.randn(n_pred, *size, generator=g) * 2
    class_logits = torch.randn(n_pred, num_classes, generator=g)
    gt_masks = (torch.rand(n_gt, *size, generator=g) > 0.5).float()
    gt_labels = torch.randint(0, num_classes, (n_gt,), generator=g)
    return mask_logits, class_logits, gt_masks, gt_labels


@pytest.mark.parametrize("with_class", [True, False])
def test_cost_matrix_matches_hand_loop(with_class):
    mask_logits, class_logits, gt_masks, gt_labels = _case(5, 3)
    class_logits = class_logits if with_class else None
    got = match_cost(mask_logits, class_logits, gt_masks, gt_labels)
    want = _hand_cost(mask_logits, class_logits, gt_masks, gt_labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_pred,n_gt,with_class,seed", [
    (5, 3, True, 0), (5, 3, False, 1), (4, 4, True, 2), (4, 4, False, 3), (5, 3, True, 4)])
def test_assignment_is_brute_force_optimum(n_pred, n_gt, with_class, seed):
    mask_logits, class_logits, gt_masks, gt_labels = _case(n_pred, n_gt, seed=seed)
    class_logits = class_logits if with_class else None
    cost = _hand_cost(mask_logits, class_logits, gt_masks, gt_labels)
    # every injective map gt -> prediction
    best = min(sum(cost[p, l].item() for l, p in enumerate(perm))
               for perm in itertools.permutations(range(n_pred), n_gt))
    pred_idx, gt_idx = hungarian_match(mask_logits, class_logits, gt_masks, gt_labels)
    assert pred_idx.dtype == gt_idx.dtype == torch.long
    assert len(pred_idx) == len(gt_idx) == n_gt
    assert sorted(gt_idx.tolist()) == list(range(n_gt))  # each gt matched once
    assert len(set(pred_idx.tolist())) == n_gt  # to distinct predictions
    assert pred_idx.tolist() == sorted(pred_idx.tolist())  # documented order
    assert cost[pred_idx, gt_idx].sum().item() == pytest.approx(best, abs=1e-6)


def test_obvious_assignment_is_found():
    gt = torch.zeros(3, 4, 4)
    gt[0, :2, :2] = gt[1, 2:, 2:] = gt[2, :, 0] = 1
    pred = torch.full((5, 4, 4), -8.0)
    for n, l in ((4, 0), (0, 1), (2, 2)):
        pred[n][gt[l] > 0] = 8.0
    pred_idx, gt_idx = hungarian_match(pred, None, gt, torch.zeros(3, dtype=torch.long))
    assert dict(zip(pred_idx.tolist(), gt_idx.tolist())) == {4: 0, 0: 1, 2: 2}


def test_no_targets_gives_empty_match():
    mask_logits, class_logits, _, _ = _case(5, 1)
    pred_idx, gt_idx = hungarian_match(mask_logits, class_logits, torch.zeros(0, 4, 5),
                                       torch.zeros(0, dtype=torch.long))
    assert pred_idx.shape == gt_idx.shape == (0,)
    assert pred_idx.dtype == gt_idx.dtype == torch.long


def test_size_mismatch_is_an_error():
    mask_logits, class_logits, gt_masks, gt_labels = _case(5, 3)
    with pytest.raises(ValueError, match="sizes differ"):
        hungarian_match(mask_logits, class_logits, gt_masks[:, :2], gt_labels)
