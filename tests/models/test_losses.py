"""K-Net losses: hand-computed values, and which predictions each stage is assigned on."""
from __future__ import annotations

import math

import pytest
import torch

from models.losses import dice_loss, knet_losses, mask_bce_loss, sigmoid_focal_loss


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_focal_loss_matches_hand_value():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    want = 0.0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = _sig(x)
        want += -0.25 * (1 - p) ** 2 * math.log(p) if t else -0.75 * p ** 2 * math.log(1 - p)
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(want, rel=1e-5)
    assert sigmoid_focal_loss(logits, targets, avg_factor=2.0).item() == pytest.approx(want / 2, rel=1e-5)


def test_dice_and_bce_match_hand_values():
    logits = torch.tensor([[[0.5, -1.0, 2.0]], [[-0.3, 0.0, 1.0]]])  # (2, 1, 3)
    targets = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 0.0, 1.0]]])
    dice, bce = [], []
    for xs, ts in zip(logits.reshape(2, 3).tolist(), targets.reshape(2, 3).tolist()):
        a = [_sig(x) for x in xs]
        num = 2 * sum(p * t for p, t in zip(a, ts))
        dice.append(1 - num / (sum(p * p for p in a) + sum(t * t for t in ts) + 2e-3))
        bce += [-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(a, ts)]
    assert dice_loss(logits, targets).item() == pytest.approx(sum(dice) / 2, rel=1e-5)
    assert mask_bce_loss(logits, targets).item() == pytest.approx(sum(bce) / 6, rel=1e-5)


def test_dice_is_zero_for_perfect_masks_and_one_for_disjoint():
    targets = torch.zeros(2, 8, 8)
    targets[0, 2:6, 1:5] = 1
    targets[1, :3, :] = 1
    perfect = (targets * 2 - 1) * 30
    assert dice_loss(perfect, targets).item() < 1e-3
    assert dice_loss(-perfect, targets).item() > 0.999


def test_empty_matches_give_finite_zero_losses():
    logits = torch.randn(0, 4, 4, requires_grad=True)
    for loss in (dice_loss(logits, torch.zeros(0, 4, 4)), mask_bce_loss(logits, torch.zeros(0, 4, 4))):
        assert loss.item() == 0.0
        loss.backward()  # still part of the graph


def _two_region_case():
    """Targets A (top half) and B (bottom half); stage 0 says kernel 0 = A, stage 1 says kernel 0 = B."""
    h = w = 8
    gt = torch.zeros(2, h, w)
    gt[0, : h // 2] = 1
    gt[1, h // 2:] = 1
    a_then_b = (torch.stack([gt[0], gt[1], torch.zeros(h, w)]) * 2 - 1) * 10  # (N=3, h, w)
    b_then_a = a_then_b[[1, 0, 2]]
    logits = torch.full((1, 3, 1), -5.0)
    stages = [
        dict(masks=a_then_b[None], logits=None),
        dict(masks=b_then_a[None], logits=logits),
        dict(masks=b_then_a[None], logits=logits),
    ]
    targets = [dict(masks=gt, labels=torch.zeros(2, dtype=torch.long))]
    return stages, targets


def test_stage_s_is_assigned_on_stage_s_minus_1():
    stages, targets = _two_region_case()
    losses, assignments = knet_losses(stages, targets)
    as_dict = [dict(zip(p.tolist(), g.tolist())) for (p, g), in assignments]
    assert as_dict[0] == {0: 0, 1: 1}  # RPN stage: its own masks
    assert as_dict[1] == {0: 0, 1: 1}  # stage 1: the RPN masks, although its own masks are swapped
    assert as_dict[2] == {0: 1, 1: 0}  # stage 2: stage 1's masks
    # so stage 1 is penalised for its swap (dice ~ 1 per mask) while stages 0 and 2 are near perfect
    assert losses["s1_dice"].item() == pytest.approx(4.0, abs=1e-3)
    assert losses["s0_dice"].item() < 1e-2 and losses["s2_dice"].item() < 1e-2


def test_knet_losses_names_weights_and_focal_normalisation():
    stages, targets = _two_region_case()
    logits = torch.tensor([[[0.2], [-1.0], [0.7]]])
    stages[2]["logits"] = logits
    empty = dict(masks=torch.zeros(0, 8, 8), labels=torch.zeros(0, dtype=torch.long))
    two_images = [dict(masks=s["masks"].repeat(2, 1, 1, 1),
                       logits=None if s["logits"] is None else s["logits"].repeat(2, 1, 1)) for s in stages]
    losses, assignments = knet_losses(two_images, targets + [empty], weights=dict(cls=3.0, rpn_mask=0.5))
    assert set(losses) == {"s0_dice", "s0_mask", "s1_dice", "s1_mask", "s1_cls", "s2_dice", "s2_mask", "s2_cls"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert [len(a[1][0]) for a in assignments] == [0, 0, 0]  # the image without targets
    # stage 2, image 0: kernels 1 and 0 positive (class 0), kernel 2 background; image 1 all background
    onehot = torch.tensor([[[1.0], [1.0], [0.0]], [[0.0], [0.0], [0.0]]])
    want = 3.0 * sigmoid_focal_loss(logits.repeat(2, 1, 1), onehot) / 2  # 2 positives in the batch
    assert losses["s2_cls"].item() == pytest.approx(want.item(), rel=1e-6)
    bce0 = mask_bce_loss(stages[0]["masks"][0, :2], targets[0]["masks"])
    assert losses["s0_mask"].item() == pytest.approx(0.5 * bce0.item(), rel=1e-6)


def _semantic_case():
    """One image, N = 2 kernels, L = 3 soft targets of 2 classes: targets 0 and 1 overlap, target 2 is left
    unmatched (more targets than kernels)."""
    torch.manual_seed(0)
    h = w = 8
    gt = torch.zeros(3, h, w)
    gt[0, :4, :4] = 1.0
    gt[0, 4, :4] = 0.25  # a soft edge still counts as the object's pixel
    gt[1, 2:6, 2:6] = 1.0
    gt[2, 6:, 6:] = 1.0
    labels = torch.tensor([1, 0, 1])
    masks = (torch.stack([gt[0], gt[1]]) * 2 - 1)[None] * 10  # kernel 0 = target 0, kernel 1 = target 1
    stages = [dict(masks=masks, logits=None, seg=torch.randn(1, 2, h, w))]
    return stages, [dict(masks=gt, labels=labels)]


def test_semantic_loss_is_focal_over_the_painted_map_per_foreground_pixel():
    """s0_seg == torchvision's sigmoid focal loss (summed) of the semantic logits against the matched targets'
    labels painted on their pixels, divided by the number of foreground pixels, times the weight."""
    from torchvision.ops import sigmoid_focal_loss as tv_focal

    stages, targets = _semantic_case()
    losses, assignments = knet_losses(stages, targets, weights=dict(rpn_seg=1.5))
    assert assignments[0][0][0].tolist() == [0, 1] and assignments[0][0][1].tolist() == [0, 1]
    gt = targets[0]["masks"]
    painted = torch.full((8, 8), -1)
    painted[gt[0] > 0] = 1
    painted[gt[1] > 0] = 0  # kernel 1's target paints over kernel 0's where they overlap
    onehot = torch.stack([painted == 0, painted == 1]).float()[None]
    num_fg = int((painted >= 0).sum())
    assert num_fg == 20 + 16 - 6  # the union of targets 0 and 1; target 2 (unmatched) is not painted
    want = 1.5 * tv_focal(stages[0]["seg"], onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_fg
    assert losses["s0_seg"].item() == pytest.approx(want.item(), rel=1e-5)


def test_semantic_loss_is_finite_without_targets():
    stages, targets = _semantic_case()
    stages[0]["seg"].requires_grad_(True)
    empty = [dict(masks=torch.zeros(0, 8, 8), labels=torch.zeros(0, dtype=torch.long))]
    losses, _ = knet_losses(stages, empty)
    losses["s0_seg"].backward()  # every pixel is background: the focal sum over at least one pixel
    assert torch.isfinite(losses["s0_seg"]) and losses["s0_seg"].item() > 0
    assert stages[0]["seg"].grad.abs().sum() > 0
