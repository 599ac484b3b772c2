"""Mask2Former's criterion: point sampling, point losses against dense losses, matching against brute force, the
normalisation by the mean number of masks of the processes of a distributed run."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.mask2former_losses import (NO_OBJECT_WEIGHT, hungarian_match, importance_points, mask2former_losses,
                                       point_mask_losses, point_sample)


def _all_cell_centres(r: int, h: int, w: int) -> torch.Tensor:
    y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)[None].expand(r, -1, -1)


def test_point_sample_reads_cells_and_maps_of_other_resolutions_alike():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 4, 6, generator=g)
    torch.testing.assert_close(point_sample(maps, _all_cell_centres(2, 4, 6)), maps.flatten(1))
    # a mask and its nearest x4 upsampling agree at the centres of the coarse cells
    masks = torch.rand(3, 5, 7, generator=g) > 0.5
    fine = masks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    coords = _all_cell_centres(3, 5, 7)
    torch.testing.assert_close(point_sample(fine, coords), point_sample(masks, coords))


def test_point_losses_equal_dense_losses_when_every_cell_is_sampled():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 8, 10, generator=g) * 3
    targets = (torch.rand(3, 8, 10, generator=g) > 0.6).float()
    coords = _all_cell_centres(3, 8, 10)
    bce, dice = point_mask_losses(point_sample(logits, coords), point_sample(targets, coords), num_masks=2.0)
    dense_bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean((1, 2)).sum() / 2
    p = logits.sigmoid()
    dense_dice = (1 - (2 * (p * targets).sum((1, 2)) + 1) / (p.sum((1, 2)) + targets.sum((1, 2)) + 1)).sum() / 2
    torch.testing.assert_close(bce, dense_bce)
    torch.testing.assert_close(dice, dense_dice)


def test_importance_sampling_puts_three_quarters_of_the_points_on_uncertain_pixels():
    logits = torch.full((2, 32, 32), 10.0)
    logits[:, :, 10:22] = 0.0  # an uncertain band (a mask boundary); bilinear reads make x in (9.5, 22.5)/32 < 10
    torch.manual_seed(0)
    coords = importance_points(logits, num_points=400, oversample_ratio=3, importance_sample_ratio=0.75)
    assert coords.shape == (2, 400, 2) and coords.min() >= 0 and coords.max() <= 1
    in_band = ((coords[..., 0] > 9.5 / 32) & (coords[..., 0] < 22.5 / 32)).sum(1)
    # ~490 of the 1200 candidates are uncertain: the 300 most uncertain all lie there, the 100 uniform ~13/32
    assert ((in_band >= 300) & (in_band <= 380)).all(), in_band


def _pair_cost(class_logits, point_logits, point_targets, n, l, label):
    """One pair's cost from scratch: 2 (-p_class) + 5 mean BCE + 5 Dice."""
    prob = class_logits[n].softmax(-1)[label]
    bce = F.binary_cross_entropy_with_logits(point_logits[n], point_targets[l])
    p, t = point_logits[n].sigmoid(), point_targets[l]
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return (-2 * prob + 5 * bce + 5 * dice).item()


@pytest.mark.parametrize("n_pred,n_gt,seed", [(5, 3, 0), (4, 4, 1), (6, 2, 2), (5, 1, 3)])
def test_matching_is_the_brute_force_optimum(n_pred, n_gt, seed):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(n_pred, 4, generator=g)  # 3 classes + no-object
    point_logits = torch.randn(n_pred, 20, generator=g) * 2
    point_targets = (torch.rand(n_gt, 20, generator=g) > 0.5).float()
    labels = torch.randint(0, 3, (n_gt,), generator=g)
    rows, cols = hungarian_match(class_logits, point_logits, labels, point_targets)
    assert rows.dtype == cols.dtype == torch.long and len(rows) == n_gt
    cost = [[_pair_cost(class_logits, point_logits, point_targets, n, l, labels[l]) for l in range(n_gt)]
            for n in range(n_pred)]
    best = min(sum(cost[p][l] for l, p in enumerate(perm)) for perm in itertools.permutations(range(n_pred), n_gt))
    assert sum(cost[r][c] for r, c in zip(rows.tolist(), cols.tolist())) == pytest.approx(best, abs=1e-4)


def _stage(logits, masks):
    return dict(logits=logits, masks=masks, queries=None)


def test_losses_supervise_matched_queries_and_push_the_rest_to_no_object():
    """Queries that predict their targets (class and mask) are matched to them and score far lower mask terms
    than inverted masks; the class term is the no-object-weighted cross-entropy over all queries."""
    n, k = 4, 2
    full = torch.zeros(1, 2, 32, 32, dtype=torch.bool)
    full[0, 0, 4:20, 8:24] = True
    full[0, 1, 20:28, 4:12] = True  # both on the 4-pixel grid of the predictions
    masks = torch.full((1, n, 8, 8), -20.0)
    masks[0, 2] = torch.where(full[0, 0, ::4, ::4], 20.0, -20.0)  # query 2 = object 0, query 0 = object 1
    masks[0, 0] = torch.where(full[0, 1, ::4, ::4], 20.0, -20.0)
    logits = torch.full((1, n, k + 1), -10.0)
    logits[0, 2, 1], logits[0, 0, 0], logits[0, [1, 3], k] = 10.0, 10.0, 10.0
    targets = [dict(labels=torch.tensor([1, 0]), full_masks=full[0])]
    torch.manual_seed(0)
    good, assignments = mask2former_losses([_stage(logits, masks)], targets, num_points=256)
    assert [a.tolist() for a in assignments[0][0]] == [[0, 2], [1, 0]]
    assert set(good) == {"d0_cls", "d0_mask", "d0_dice"}
    inverted, _ = mask2former_losses([_stage(logits, -masks)], targets, num_points=256)
    assert good["d0_cls"] < 1e-3
    assert good["d0_mask"] < 0.1 * inverted["d0_mask"] and good["d0_dice"] < 0.2 * inverted["d0_dice"]
    # every query predicts the wrong class now; unmatched queries weigh NO_OBJECT_WEIGHT in the mean
    wrong = logits.clone()
    wrong[0, [1, 3]] = torch.tensor([10.0, -10.0, -10.0])
    losses, _ = mask2former_losses([_stage(wrong, masks)], targets, num_points=256)
    ce = F.cross_entropy(wrong[0], torch.tensor([0, k, 1, k]), reduction="none")
    expected = 2 * (ce * torch.tensor([1, NO_OBJECT_WEIGHT, 1, NO_OBJECT_WEIGHT])).sum() / (2 + 2 * NO_OBJECT_WEIGHT)
    torch.testing.assert_close(losses["d0_cls"], expected)


def test_images_without_targets_give_finite_differentiable_losses():
    logits = torch.randn(2, 3, 2, requires_grad=True)
    masks = torch.randn(2, 3, 8, 8, requires_grad=True)
    targets = [dict(labels=torch.zeros(0, dtype=torch.long), full_masks=torch.zeros(0, 32, 32, dtype=torch.bool))] * 2
    losses, assignments = mask2former_losses([_stage(logits, masks)] * 2, targets, num_points=64)
    assert all(len(p) == 0 for stage in assignments for p, _ in stage)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and logits.grad.abs().sum() > 0  # everything is pushed to no-object


def _losses_in_process(rank: int, init_file: str, stages: list, targets: list, out: str) -> None:
    """One process of a two-process gloo group: this rank's losses, saved for the test to read."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    losses, _ = mask2former_losses(stages[rank], targets[rank], num_points=64)
    torch.save(losses, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_distributed_processes_divide_mask_terms_by_the_mean_number_of_masks(tmp_path):
    """Two processes with 1 and 3 targets both divide their mask terms by 2 (the reference's all-reduced mean),
    not by their own count: after DDP averages the gradients, every mask of the global batch weighs alike."""
    g = torch.Generator().manual_seed(0)
    stages, targets = [], []
    for num_targets in (1, 3):
        stages.append([_stage(torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 8, 8, generator=g))])
        full = torch.rand(num_targets, 32, 32, generator=g) > 0.5
        targets.append([dict(labels=torch.zeros(num_targets, dtype=torch.long), full_masks=full)])
    mp.spawn(_losses_in_process, args=(str(tmp_path / "init"), stages, targets, str(tmp_path)), nprocs=2)
    for rank, local_count in enumerate((1, 3)):
        torch.manual_seed(0)
        alone, _ = mask2former_losses(stages[rank], targets[rank], num_points=64)  # divided by its own count
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["d0_cls"], alone["d0_cls"])
        for key in ("d0_mask", "d0_dice"):
            torch.testing.assert_close(got[key], alone[key] * local_count / 2)
