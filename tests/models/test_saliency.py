import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.mask_refinement import RefineConfig, superpixels
from models.saliency import (SaliencyConfig, greedy_nms, image_masks, kept_maps, mask_boxes, mask_iou, matrix_nms,
                             saliency_maps, select_candidates, upsample_to_image)
from stages.image_data import MEAN, STD


def scene_features(h, w, d=16, objects=3, seed=0):
    """C5-like features: a background vector plus a few rectangular objects with their own vectors."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(d, generator=g)[:, None, None] + 0.3 * torch.randn(d, h, w, generator=g)
    for _ in range(objects):
        y, x = torch.randint(0, h - 1, (2,), generator=g).tolist()
        feats[:, y:y + 3, x:x + 2] += 3 * torch.randn(d, generator=g)[:, None, None]
    return feats


def padded_batch(sizes, pad_hw, d=16):
    feats = torch.randn(len(sizes), d, *pad_hw) * 50  # garbage in the padding must not matter
    valid = torch.zeros(len(sizes), *pad_hw, dtype=torch.bool)
    singles = []
    for i, (h, w) in enumerate(sizes):
        f = scene_features(h, w, d, seed=i)
        feats[i, :, :h, :w] = f
        valid[i, :h, :w] = True
        singles.append(f)
    return feats, valid, singles


def scene_photo(h, w, seed):
    """An (3, h, w) picture in [0, 1]: a few flat-coloured rectangles on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    photo = torch.rand(3, 1, 1, generator=g) + 0.05 * torch.randn(3, h, w, generator=g)
    for _ in range(4):
        y, x = torch.randint(0, h - 20, (1,), generator=g).item(), torch.randint(0, w - 20, (1,), generator=g).item()
        photo[:, y:y + 40, x:x + 60] = torch.rand(3, 1, 1, generator=g)
    return photo.clamp(0, 1)


@pytest.mark.parametrize("refine", ["none", "superpixel", "guided"])
@pytest.mark.parametrize("nms", ["matrix", "greedy"])
def test_batched_equals_per_image(nms, refine):
    """Candidates and final masks of an image in a padded batch equal those of the image alone, with and
    without refinement (which must see only the image's own pixels, not the padding)."""
    cfg = SaliencyConfig(nms=nms, min_score=0.0, max_masks=10, min_center_y_frac=0.0, max_width_frac=1.01)
    refine_cfg = RefineConfig(method=refine, radius=16)
    sizes = [(5, 7), (8, 6), (7, 9)]
    feats, valid, singles = padded_batch(sizes, (9, 10))
    images = 5 * torch.randn(len(sizes), 3, 9 * 32, 10 * 32)  # garbage in the padding must not matter
    image_hws = [(h * 32 - 5, w * 32 - 9) for h, w in sizes]
    for i, (h, w) in enumerate(image_hws):
        images[i, :, :h, :w] = (scene_photo(h, w, seed=i) - MEAN) / STD
    # as the DataLoader workers make them: from each image's own pixels
    segments = ([superpixels(images[i, :, :h, :w], refine_cfg) for i, (h, w) in enumerate(image_hws)]
                if refine == "superpixel" else None)
    batched = select_candidates(feats, valid, cfg)
    batched_slots, batched_maps = kept_maps(batched, sizes, image_hws, cfg, refine_cfg, images, segments)
    for i, (h, w) in enumerate(sizes):
        alone = select_candidates(singles[i][None], torch.ones(1, h, w, dtype=torch.bool), cfg)
        good = alone.score[0] >= 0
        assert good.sum() >= 2
        n = int(good.sum())
        torch.testing.assert_close(batched.score[i, :n], alone.score[0, :n])
        assert torch.equal(batched.seed[i, :n], alone.seed[0, :n])
        torch.testing.assert_close(batched.seed_feature[i, :n], alone.seed_feature[0, :n])
        torch.testing.assert_close(batched.soft[i, :n, :h, :w], alone.soft[0, :n])
        assert (batched.score[i, n:] < 0).all()
        image_hw = image_hws[i]
        own = images[i:i + 1, :, :image_hw[0], :image_hw[1]].clone()  # the image alone, unpadded
        alone_slots, alone_maps = kept_maps(alone, [(h, w)], [image_hw], cfg, refine_cfg, own,
                                            segments and segments[i:i + 1])
        refined = refine != "none"
        kb, mb, bb = image_masks(batched_maps[i], (h, w), image_hw, image_hw, cfg, refined=refined)
        ka, ma, ba = image_masks(alone_maps[0], (h, w), image_hw, image_hw, cfg, refined=refined)
        assert torch.equal(batched_slots[i][kb], alone_slots[0][ka]) and torch.equal(mb, ma) and torch.equal(bb, ba)
        assert mb.any((1, 2)).sum() >= 2


def naive_saliency(f, pools):
    """Eq. 3-4 one seed at a time, the way the paper states it."""
    d, h, w = f.shape
    unit = f / f.norm(dim=0, keepdim=True)
    maps = []
    for pool in pools:
        for y in range(h // pool):
            for x in range(w // pool):
                s = unit[:, y * pool:(y + 1) * pool, x * pool:(x + 1) * pool].mean((1, 2))
                s = s / s.norm()
                m = (s[:, None, None] * unit).sum(0)
                m = m - m.min()
                maps.append(m / m.max())
    return torch.stack(maps)


def test_saliency_maps_equal_per_seed_loop():
    f = scene_features(9, 11)
    soft, seed_valid, _, _ = saliency_maps(f[None], torch.ones(1, 9, 11, dtype=torch.bool))
    torch.testing.assert_close(soft[0][seed_valid[0]], naive_saliency(f, (1, 2, 4)), atol=1e-5, rtol=1e-5)
    assert seed_valid[0].sum() == 9 * 11 + 4 * 5 + 2 * 2


def test_mask_iou_and_matrix_nms_equal_loops():
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(1, 12, 40, generator=g) > 0.5).float()
    masks[0, 5] = 0  # an empty mask has IoU 0 with everything
    scores = torch.sort(torch.rand(1, 12, generator=g), descending=True).values
    iou = mask_iou(masks)
    for i in range(12):
        for j in range(12):
            a, b = masks[0, i].bool(), masks[0, j].bool()
            union = (a | b).sum().item()
            assert iou[0, i, j].item() == pytest.approx((a & b).sum().item() / union if union else 0.0)
    decayed = matrix_nms(iou, scores, sigma=2.0)
    for j in range(12):
        factor = 1.0
        for i in range(j):
            comp = max([iou[0, k, i].item() for k in range(i)], default=0.0)
            factor = min(factor, math.exp(-2.0 * (iou[0, i, j].item() ** 2 - comp**2)))
        assert decayed[0, j].item() == pytest.approx(scores[0, j].item() * factor, rel=1e-5)


def test_greedy_nms_equals_loop():
    g = torch.Generator().manual_seed(4)
    masks = (torch.rand(1, 30, 25, generator=g) > 0.4).float()
    iou = mask_iou(masks)
    valid = torch.rand(1, 30, generator=g) > 0.2
    keep = greedy_nms(iou, valid, 0.45, max_keep=8)
    kept = []
    for k in range(30):
        if valid[0, k] and all(iou[0, k, j] <= 0.45 for j in kept) and len(kept) < 8:
            kept.append(k)
    assert torch.nonzero(keep[0]).flatten().tolist() == kept


def test_upsample_matches_plain_interpolation_when_sizes_align():
    soft = torch.rand(4, 3, 5)
    up = upsample_to_image(soft, (3, 5), (96, 160), (96, 160))
    ref = F.interpolate(soft[None], size=(96, 160), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(up, ref, atol=1e-5, rtol=1e-5)
    # a padded grid: only the valid cells are sampled
    padded = torch.zeros(4, 6, 7)
    padded[:, :3, :5] = soft
    torch.testing.assert_close(upsample_to_image(padded, (3, 5), (96, 160), (96, 160)), ref, atol=1e-5, rtol=1e-5)


def test_mask_boxes_match_numpy():
    g = torch.Generator().manual_seed(5)
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 4:9, 7:8] = True
    masks[1] = torch.rand(20, 30, generator=g) > 0.97
    boxes = mask_boxes(masks)
    for m, box in zip(masks[:2].numpy(), boxes[:2]):
        ys, xs = np.nonzero(m)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert boxes[2].tolist() == [0, 0, 0, 0]


def test_filters_drop_top_band_and_full_width_masks():
    cfg = SaliencyConfig(min_score=0.5)
    soft = torch.zeros(1, 3, 10, 10)
    soft[0, 0, 5:8, 3:6] = 1  # an ordinary object: kept
    soft[0, 1, 0:1, 2:5] = 1  # centred in the top 20 %: dropped
    soft[0, 2, 4:7, :] = 1  # spans the whole width: dropped
    cand = type("C", (), {})()
    cand.soft, cand.score = soft, torch.tensor([[0.9, 0.9, 0.9]])
    slots, maps = kept_maps(cand, [(10, 10)], [(320, 320)], cfg)
    keep, masks, boxes = image_masks(maps[0], (10, 10), (320, 320), (320, 320), cfg)
    assert slots[0][keep].tolist() == [0]
    assert boxes[0].tolist() == [96, 160, 192, 256]
    low = SaliencyConfig(min_score=0.95)
    assert kept_maps(cand, [(10, 10)], [(320, 320)], low)[0][0].numel() == 0


def test_kept_seed_features_are_their_window_means():
    f = scene_features(8, 8)
    cand = select_candidates(f[None], torch.ones(1, 8, 8, dtype=torch.bool), SaliencyConfig(max_masks=6))
    unit = f / f.norm(dim=0, keepdim=True)
    assert (cand.score[0] >= 0).sum() >= 3
    for k in torch.nonzero(cand.score[0] >= 0).flatten().tolist():
        y, x, pool = cand.seed[0, k].tolist()
        mean = unit[:, y * pool:(y + 1) * pool, x * pool:(x + 1) * pool].mean((1, 2))
        torch.testing.assert_close(cand.seed_feature[0, k], mean / mean.norm())
        # the kept map is this seed's similarity map
        sim = (mean / mean.norm())[:, None, None].mul(unit).sum(0)
        torch.testing.assert_close(cand.soft[0, k], (sim - sim.min()) / (sim.max() - sim.min()), atol=1e-5, rtol=0)
