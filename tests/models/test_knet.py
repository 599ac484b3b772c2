"""K-Net: output structure, batch independence, the prompt hook, post-processing, and that it learns."""
from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from models.fpn import gn_groups
from models.knet import KNetConfig, build_knet
from models.losses import knet_losses
from models.matcher import hungarian_match


def _build(**overrides):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return build_knet(KNetConfig.small(**overrides))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _build(num_classes=3).eval()


def test_forward_structure(model):
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        stages, feats = model(images)
    n, c = model.cfg.num_kernels, model.cfg.channels
    assert len(stages) == 1 + model.cfg.num_stages
    assert stages[0]["logits"] is None and stages[0]["queries"] is None  # no kernel supervision on the RPN stage
    for s in stages:
        assert s["masks"].shape == (2, n, 16, 24)
        assert s["queries"] is None or s["queries"].shape == (2, n, c)
        assert s["logits"] is None or s["logits"].shape == (2, n, 3)
    assert all(s["queries"] is not None for s in stages[1:])
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "p2": (2, c, 16, 24), "p3": (2, c, 8, 12), "p4": (2, c, 4, 6), "p5": (2, c, 2, 3)}
    # the random init must not collapse: RPN masks split pixels, stages differ from each other
    rpn_fg = (stages[0]["masks"] > 0).float().mean().item()
    assert 0.05 < rpn_fg < 0.95
    assert not torch.allclose(stages[1]["masks"], stages[2]["masks"])


def test_prompt_fn_changes_update_stages_only(model):
    images = torch.randn(2, 3, 64, 64)
    calls = []

    def prompt_fn(kernels, feats):
        calls.append((kernels.clone(), sorted(feats)))
        return kernels + 5.0 * feats["p5"].mean((2, 3))[:, None, :]

    with torch.no_grad():
        plain, pyramid = model(images)
        prompted, _ = model(images, prompt_fn=prompt_fn)
        _, rpn_kernels, _, _ = model.rpn(*model.fusion(pyramid))
    assert len(calls) == 1
    received, feat_names = calls[0]
    assert received.shape == (2, model.cfg.num_kernels, model.cfg.channels)
    assert feat_names == ["p2", "p3", "p4", "p5"]
    torch.testing.assert_close(received, rpn_kernels)  # called on the RPN-stage kernels
    torch.testing.assert_close(prompted[0]["masks"], plain[0]["masks"])
    for s in range(1, len(plain)):
        assert not torch.allclose(prompted[s]["masks"], plain[s]["masks"], atol=1e-3)
        assert not torch.allclose(prompted[s]["logits"], plain[s]["logits"], atol=1e-3)


def test_predict_crops_the_valid_region_and_resizes(model, monkeypatch):
    """A padded 64x64 input whose valid region is the top-left 32x32, shown at 100x80 originally."""
    n, num_classes = model.cfg.num_kernels, 3
    masks = torch.full((1, n, 16, 16), -10.0)
    # the valid region (8x8 cells) and one cell of padding, so that bilinear blur at the crop edge stays
    # above 0.5; without the crop this mask would cover only 9/16 of the output
    masks[0, 0, :9, :9] = 10.0
    masks[0, 1, :4, :8] = 10.0  # top half of the valid region
    logits = torch.full((1, n, num_classes), -6.0)
    logits[0, :2] = -9.0  # the other classes of kernels 0 and 1 rank last
    logits[0, 0, 2] = 3.0  # best: kernel 0, class 2
    logits[0, 1, 1] = 2.0  # second: kernel 1, class 1
    fake = [dict(masks=masks, logits=logits, queries=None)]
    monkeypatch.setattr(model, "forward", lambda images: (fake, {}))
    monkeypatch.setattr(model, "cfg", replace(model.cfg, mask_threshold_test=0.5))  # the edges below are at 0.5
    (res,) = model.predict(torch.zeros(1, 3, 64, 64), [(32, 32)], [(100, 80)])
    k = min(model.cfg.max_per_image, n * num_classes)
    assert res["scores"].shape == res["labels"].shape == (k,)
    assert res["masks"].shape == (k, 100, 80) and res["masks"].dtype == torch.bool
    assert torch.all(res["scores"][:-1] >= res["scores"][1:])
    torch.testing.assert_close(res["scores"][:2], torch.sigmoid(torch.tensor([3.0, 2.0])))
    assert res["labels"][:2].tolist() == [2, 1]
    assert res["masks"][0].all()
    rows = res["masks"][1].any(1).nonzero().flatten()
    assert rows.min() == 0 and abs(rows.max().item() + 1 - 50) <= 2  # top half of 100 rows
    assert res["boxes"][0].tolist() == [0.0, 0.0, 80.0, 100.0]
    assert res["boxes"][1, 2].item() == 80.0 and abs(res["boxes"][1, 3].item() - 50) <= 2
    assert not res["masks"][2:-4].any() and (res["boxes"][2:-4] == 0).all()
    assert res["masks"][-4:].flatten(1).any(1).all()


def test_group_norm_groups_fit_small_widths():
    assert [gn_groups(c) for c in (256, 64, 48, 20)] == [32, 32, 24, 20]
    model = _build(channels=48, num_heads=4, num_kernels=4, num_stages=1).eval()
    with torch.no_grad():
        stages, _ = model(torch.randn(1, 3, 64, 64))
    assert stages[-1]["masks"].shape == (1, 4, 16, 16)


def _synthetic_images(num_images: int, size: int = 64, seed: int = 1):
    """Flat-colour images with 1-3 rectangles / ellipses; targets at stride 4 (a cell is fg if > half covered)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, targets = [], []
    for _ in range(num_images):
        img = torch.rand(3, 1, 1, generator=g).expand(3, size, size).clone()
        shapes = []
        for j in range(int(torch.randint(1, 4, (1,), generator=g))):
            h, w = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=g))
            y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            if j % 2 == 0:
                m = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            else:
                m = ((yy - y0 - h / 2) / (h / 2)) ** 2 + ((xx - x0 - w / 2) / (w / 2)) ** 2 <= 1
            shapes = [s & ~m for s in shapes] + [m]  # later shapes occlude earlier ones
            img[:, m] = torch.rand(3, 1, generator=g)
        t = (F.avg_pool2d(torch.stack(shapes).float()[None], 4)[0] > 0.5).float()
        t = t[t.flatten(1).sum(1) > 0]
        images.append((img - 0.45) / 0.25)
        targets.append(dict(masks=t, labels=torch.zeros(len(t), dtype=torch.long)))
    return torch.stack(images), targets


def _matched_mean_iou(model, images, targets) -> float:
    model.eval()
    with torch.no_grad():
        last = model(images)[0][-1]
    model.train()
    ious = []
    for b, t in enumerate(targets):
        p, g = hungarian_match(last["masks"][b], last["logits"][b], t["masks"], t["labels"])
        pred, gt = last["masks"][b, p] > 0, t["masks"][g] > 0.5
        ious += ((pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1).clamp(min=1)).tolist()
    return sum(ious) / len(ious)


def test_small_knet_overfits_a_few_synthetic_images():
    """Matched-mask IoU goes from chance (~0.1) to >= 0.75 within 150 Adam steps.

    Objects are 16-32 px, i.e. 4-8 cells at stride 4; a mask off by one stride-8 cell (2 such cells)
    in either direction already drops below ~0.6 IoU, so 0.75 needs masks that follow the shapes.
    Measured with one thread: reached at step 50-80 for four seeds, 0.1-0.2 s a step. One thread because
    two threads on two shared, busy cores ran 3-10x slower (and thread count changes float summation order,
    hence the trajectory).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = _build(num_classes=1, frozen_stages=0).train()
        images, targets = _synthetic_images(3)
        start = _matched_mean_iou(model, images, targets)
        assert start < 0.3
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        best = start
        for step in range(1, 151):
            losses, _ = knet_losses(model(images)[0], targets)
            loss = sum(losses.values())
            assert torch.isfinite(loss), {k: v.item() for k, v in losses.items()}
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 10 == 0:
                best = max(best, _matched_mean_iou(model, images, targets))
                if best >= 0.75:
                    break
    finally:
        torch.set_num_threads(threads)
    assert best >= 0.75, f"matched mask IoU {start:.2f} -> {best:.2f} after {step} steps"


def test_semantic_head_loss_reaches_the_fusion_fpn_and_backbone():
    """The semantic focal term alone trains more than its own 1x1 head: its gradient flows through the features
    every update stage pools from into the fusion neck, the FPN and the (unfrozen) backbone."""
    torch.manual_seed(0)
    model = _build(num_classes=2, frozen_stages=0).train()
    images = torch.randn(2, 3, 64, 64)
    gt = torch.zeros(1, 16, 16)
    gt[0, 4:12, 2:10] = 1.0
    targets = [dict(masks=gt, labels=torch.tensor([1]))] * 2
    stages, _ = model(images)
    assert stages[0]["seg"].shape == (2, 2, 16, 16)
    losses, _ = knet_losses(stages, targets)
    assert losses["s0_seg"].item() > 0
    model.zero_grad()
    losses["s0_seg"].backward()
    for name in ("rpn.conv_seg.weight", "rpn.sem_conv.0.weight", "fusion.sem.0.weight", "fusion.p3.0.weight",
                 "fpn.output.0.weight", "fpn.lateral.3.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    backbone = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in backbone)
    # it is a semantic signal: the kernels' own masks do not get it (no gradient into init_kernels)
    assert model.rpn.init_kernels.weight.grad is None or model.rpn.init_kernels.weight.grad.abs().sum() == 0


def test_mask_quality_score_ranks_confident_masks_first(model, monkeypatch):
    """With mask_quality_score a detection's score is its class score times the mean probability inside its mask
    (Mask2Former's rule): a slightly better-classified but blurry mask drops below a sharp one; off (K-Net's
    rule, the default), the class score alone ranks."""
    n, num_classes = model.cfg.num_kernels, 3
    masks = torch.full((1, n, 16, 16), -10.0)
    masks[0, 0, :8, :8] = 0.3  # kernel 0: barely above 0.5 everywhere it is on (probability 0.57)
    masks[0, 1, 8:, 8:] = 8.0  # kernel 1: confident (probability ~1)
    logits = torch.full((1, n, num_classes), -9.0)
    logits[0, 0, 0], logits[0, 1, 0] = 2.0, 1.5
    fake = [dict(masks=masks, logits=logits, queries=None)]
    monkeypatch.setattr(model, "forward", lambda images: (fake, {}))
    monkeypatch.setattr(model, "cfg", replace(model.cfg, mask_threshold_test=0.5))
    (plain,) = model.predict(torch.zeros(1, 3, 64, 64), [(64, 64)], [(64, 64)])
    monkeypatch.setattr(model, "cfg", replace(model.cfg, mask_threshold_test=0.5, mask_quality_score=True))
    (rescored,) = model.predict(torch.zeros(1, 3, 64, 64), [(64, 64)], [(64, 64)])
    assert plain["masks"][0, 4:28, 4:28].all() and plain["masks"][1, 36:, 36:].all()  # kernel 0 first, then 1
    assert torch.equal(rescored["masks"][0], plain["masks"][1]) and torch.equal(rescored["masks"][1], plain["masks"][0])
    probs = F.interpolate(masks[0, :2][None].sigmoid(), size=(64, 64), mode="bilinear", align_corners=False)[0]
    binary = probs > 0.5
    quality = (probs * binary).flatten(1).sum(1) / binary.flatten(1).sum(1)  # ~0.55 and ~1
    want = torch.sigmoid(torch.tensor([1.5, 2.0])) * quality[[1, 0]]
    torch.testing.assert_close(rescored["scores"][:2], want, rtol=1e-4, atol=1e-4)
    assert torch.all(rescored["scores"][:-1] >= rescored["scores"][1:])
    assert torch.equal(rescored["boxes"][0], plain["boxes"][1]) and rescored["labels"][:2].tolist() == [0, 0]
