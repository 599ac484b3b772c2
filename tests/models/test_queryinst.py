"""QueryInst: the query-model contract (structure, batch independence, prompt hook), box matching, losses,
masks in boxes, post-processing, and that it learns (fine-tuning and a pre-training step)."""
from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from models.box_masks import crop_masks_to_boxes, paste_masks_in_boxes
from models.queryinst import QueryInstConfig, build_queryinst
from models.queryinst_losses import box_match_cost, hungarian_box_match
from models.saliency_prompt import SaliencyPrompt
from stages.coco_data import CocoInstances
from stages.evaluate import coco_evaluate, predictions_to_results
from stages.image_data import ImageFolder, batch_loader
from stages.pseudo_label_data import collate_training


def _build(**overrides):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return build_queryinst(QueryInstConfig.small(**{"backbone": "resnet18", **overrides}))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _build(num_classes=3).eval()


def _target(boxes, labels, size):
    """A target whose full masks are its boxes (input pixels, exclusive x2/y2)."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), *size, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
        m[y1:y2, x1:x2] = True
    return dict(boxes=boxes, labels=torch.tensor(labels, dtype=torch.long), full_masks=masks,
                masks=(F.avg_pool2d(masks[None].float(), 4)[0] > 0.5).float() if len(masks)
                else torch.zeros(0, size[0] // 4, size[1] // 4))


def test_forward_structure(model):
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        stages, feats = model(images)
    n, c = model.cfg.num_proposals, model.cfg.channels
    assert len(stages) == model.cfg.num_stages
    for s in stages:
        assert s["logits"].shape == (2, n, 3)
        assert s["queries"].shape == (2, n, c)
        assert s["boxes"].shape == (2, n, 4) and torch.isfinite(s["boxes"]).all()
        assert (s["boxes"][..., 2:] > s["boxes"][..., :2]).all()
        assert s["masks"].shape == (2, n, 28, 28)
    assert feats["p5"].shape == (2, c, 2, 3)
    # the learnable proposals start as the whole image, so stage 0 refines image-sized boxes
    start = torchvision.ops.box_convert(model.proposal_boxes.weight, "cxcywh", "xyxy") * torch.tensor([96, 64, 96, 64])
    assert torch.equal(start, torch.tensor([[0.0, 0.0, 96.0, 64.0]]).expand(n, 4))
    assert not torch.allclose(stages[0]["boxes"], stages[1]["boxes"])


def test_boxes_stay_float32_under_autocast(model):
    """Box corners in bfloat16 would be off by several pixels at 1000 px: refinement runs in float32."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stages, _ = model(torch.randn(1, 3, 64, 64))
    assert stages[0]["logits"].dtype == torch.bfloat16  # autocast is on
    assert all(s["boxes"].dtype == torch.float32 for s in stages)


def test_boxes_pass_gradient_to_their_own_stage_only(model):
    """Boxes are detached between stages: stage 1's box loss trains stage 1's regressor, not stage 0's."""
    model.train()
    try:
        stages, _ = model(torch.randn(1, 3, 64, 64))
    finally:
        model.eval()
    stages[1]["boxes"].sum().backward()
    assert model.heads[1].fc_reg.weight.grad.abs().sum() > 0
    assert model.heads[0].fc_reg.weight.grad is None
    model.zero_grad(set_to_none=True)


def test_stage_heads_start_from_the_reference_initialisation(model):
    """Scores start near 0.01 (focal prior) and the box regressor without a bias: before training no delta is
    shared by every proposal (mmdet's BBoxHead zeroes it; PyTorch's default would shift all boxes alike)."""
    for head in model.heads:
        torch.testing.assert_close(head.fc_cls.bias, torch.full_like(head.fc_cls.bias, -math.log(99)))
        assert torch.equal(head.fc_reg.bias, torch.zeros(4))


def test_rois_are_pooled_on_mmdets_level_with_the_documented_half_cell_offset(model):
    """Maps whose cells hold the input-pixel coordinates of their own centres (and their level and image): each
    box pools from mmdet's level floor(log2(sqrt(area) / 56)), clamped to P2..P5, and each bin reads its own
    centre in the box shifted by half a cell of that level, down-right (torchvision's unaligned RoIAlign, the
    README's documented departure from mmcv's aligned one)."""
    size, side = 7, 640
    pyramid = {}
    for level, stride in enumerate((4, 8, 16, 32)):
        centres = (torch.arange(side // stride) + 0.5) * stride
        grid = torch.stack([centres[None, :].expand(len(centres), -1), centres[:, None].expand(-1, len(centres)),
                            torch.full((len(centres),) * 2, float(level))])
        pyramid[f"p{level + 2}"] = torch.stack([grid, grid + torch.tensor([0.0, 0.0, 10.0])[:, None, None]])
    boxes = torch.tensor([[100.5, 200.25, 140.5, 250.25],  # sqrt(area) 45: P2
                          [30.0, 40.0, 141.0, 151.0],  # 111: P2
                          [200.0, 100.0, 380.0, 225.0],  # 150: P3
                          [50.0, 300.0, 450.0, 525.0],  # 300: P4
                          [60.0, 70.0, 560.0, 570.0]])  # 500: P5
    boxes = torch.stack([boxes, boxes.flip(0)])  # (2, 5, 4)
    feats = model.box_pooler(pyramid, list(boxes), [(side, side)] * 2).view(2, 5, 3, size, size)
    bins = (torch.arange(size) + 0.5) / size
    for b, n in itertools.product(range(2), range(5)):
        x1, y1, x2, y2 = boxes[b, n].tolist()
        level = sum(math.sqrt((x2 - x1) * (y2 - y1)) >= t for t in (112, 224, 448))
        assert torch.allclose(feats[b, n, 2], torch.tensor(level + 10.0 * b)), (b, n)
        half = 2 ** (level + 2) / 2
        torch.testing.assert_close(feats[b, n, 0], (x1 + half + bins * (x2 - x1))[None, :].expand(size, -1),
                                   atol=1e-3, rtol=0)
        torch.testing.assert_close(feats[b, n, 1], (y1 + half + bins * (y2 - y1))[:, None].expand(-1, size),
                                   atol=1e-3, rtol=0)


def _hand_cost(logits, boxes, labels, gt_boxes, size):
    """Sparse R-CNN's matching cost, one pair at a time in Python floats: 2 focal + 5 L1/size - 2 GIoU."""
    h, w = size
    cost = torch.zeros(len(boxes), len(gt_boxes), dtype=torch.float64)
    for n, l in itertools.product(range(len(boxes)), range(len(gt_boxes))):
        s = 1 / (1 + math.exp(-logits[n, labels[l]].item()))
        focal = -math.log(s) * 0.25 * (1 - s) ** 2 + math.log(1 - s) * 0.75 * s ** 2
        a, g = boxes[n].tolist(), gt_boxes[l].tolist()
        l1 = sum(abs(x - y) / d for x, y, d in zip(a, g, (w, h, w, h)))
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        iw = max(0.0, min(a[2], g[2]) - max(a[0], g[0]))
        ih = max(0.0, min(a[3], g[3]) - max(a[1], g[1]))
        union = area(a) + area(g) - iw * ih
        hull = (max(a[2], g[2]) - min(a[0], g[0])) * (max(a[3], g[3]) - min(a[1], g[1]))
        giou = iw * ih / union - (hull - union) / hull
        cost[n, l] = 2 * focal + 5 * l1 - 2 * giou
    return cost


def _random_boxes(n, size, g):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([size[1], size[0]]) * 0.7
    wh = (torch.rand(n, 2, generator=g) * 0.5 + 0.05) * torch.tensor([size[1], size[0]])
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("n_pred,n_gt,seed", [(5, 3, 0), (4, 4, 1), (6, 2, 2), (5, 5, 3)])
def test_box_matcher_is_the_brute_force_optimum(n_pred, n_gt, seed):
    g = torch.Generator().manual_seed(seed)
    size = (48, 80)
    logits, labels = torch.randn(n_pred, 3, generator=g), torch.randint(0, 3, (n_gt,), generator=g)
    boxes, gt_boxes = _random_boxes(n_pred, size, g), _random_boxes(n_gt, size, g)
    cost = _hand_cost(logits, boxes, labels, gt_boxes, size)
    torch.testing.assert_close(box_match_cost(logits, boxes, labels, gt_boxes, size).double(), cost,
                               rtol=1e-5, atol=1e-5)
    best = min(sum(cost[p, l].item() for l, p in enumerate(perm))
               for perm in itertools.permutations(range(n_pred), n_gt))
    pred_idx, gt_idx = hungarian_box_match(logits, boxes, labels, gt_boxes, size)
    assert pred_idx.dtype == gt_idx.dtype == torch.long
    assert sorted(gt_idx.tolist()) == list(range(n_gt)) and len(set(pred_idx.tolist())) == n_gt
    assert cost[pred_idx, gt_idx].sum().item() == pytest.approx(best, abs=1e-6)


def test_prompt_fn_changes_exactly_the_prompted_queries(model):
    images = torch.randn(2, 3, 64, 64)
    n, c = model.cfg.num_proposals, model.cfg.channels
    stage0_inputs, calls = [], []
    hook = model.heads[0].register_forward_pre_hook(lambda module, args: stage0_inputs.append(args[0].clone()))
    prompted_rows = torch.zeros(2, n, dtype=torch.bool)
    prompted_rows[0, [1, 3]] = prompted_rows[1, 2] = True

    def add_prompts(queries, feats):
        calls.append((queries.clone(), sorted(feats)))
        return queries + 3.0 * prompted_rows[:, :, None] * feats["p5"].mean((2, 3))[:, None, :]

    try:
        with torch.no_grad():
            plain, _ = model(images)
            prompted, _ = model(images, prompt_fn=add_prompts)
            zero, _ = model(images, prompt_fn=lambda queries, feats: queries + 0.0)
    finally:
        hook.remove()
    assert len(calls) == 1
    received, feat_names = calls[0]
    assert received.shape == (2, n, c) and "p5" in feat_names
    torch.testing.assert_close(received, model.proposal_features.weight[None].expand(2, n, c))  # initial queries
    changed = (stage0_inputs[1] != stage0_inputs[0]).any(-1)
    assert torch.equal(changed, prompted_rows)
    for p, s in zip(prompted, plain):
        assert not torch.allclose(p["logits"], s["logits"], atol=1e-4)
    for z, s in zip(zero, plain):
        for key in ("logits", "queries", "boxes", "masks"):
            assert torch.equal(z[key], s[key]), key


def test_losses_without_targets_are_finite_and_train_the_background(model):
    size = (64, 64)
    with torch.no_grad():
        stages, _ = model(torch.randn(2, 3, *size))
    stages = [{k: v.clone().requires_grad_() for k, v in s.items()} for s in stages]
    targets = [_target([], [], size), _target([], [], size)]
    losses, assignments = model.losses(stages, targets)
    assert set(losses) == {f"s{s}_{t}" for s in range(len(stages)) for t in ("cls", "l1", "giou", "dice")}
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[f"s{s}_{t}"].item() == 0 for s in range(len(stages)) for t in ("l1", "giou", "dice"))
    sum(losses.values()).backward()
    assert stages[0]["logits"].grad.abs().sum() > 0  # every score is pushed towards background
    assert all(len(p) == len(g) == 0 for stage in assignments for p, g in stage)


def _stage(n, num_classes, boxes_per_image, size):
    """A hand-made stage: proposal 0 of each image wears its first box and class, the others sit far off."""
    b = len(boxes_per_image)
    logits = torch.full((b, n, num_classes), -4.0)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(b, n, 1)
    masks = torch.full((b, n, 28, 28), -10.0)
    for i, gt in enumerate(boxes_per_image):
        for j, box in enumerate(gt):
            boxes[i, 2 * j + 1] = torch.tensor(box)  # proposal 2j+1 is ground truth j, exactly
            logits[i, 2 * j + 1, j % num_classes] = 4.0
            masks[i, 2 * j + 1] = 10.0
    return dict(logits=logits, boxes=boxes, masks=masks, queries=torch.zeros(b, n, 8))


def test_losses_of_exact_predictions():
    """Exact boxes and masks: zero L1 and GIoU, near-zero Dice, the right pairs; the class term is the
    focal loss of torchvision's implementation divided by the matched count."""
    torch.manual_seed(0)
    size = (64, 80)
    gts = [[[4.0, 8.0, 30.0, 40.0], [40.0, 10.0, 76.0, 60.0]], [[10.0, 20.0, 50.0, 50.0]]]
    stage = _stage(6, 2, gts, size)
    targets = [_target(g, [j % 2 for j in range(len(g))], size) for g in gts]
    model = _build(num_classes=2)
    losses, assignments = model.losses([stage], targets)
    assert [(p.tolist(), g.tolist()) for p, g in assignments[0]] == [([1, 3], [0, 1]), ([1], [0])]
    assert losses["s0_l1"].item() == pytest.approx(0, abs=1e-6)
    assert losses["s0_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["s0_dice"].item() == pytest.approx(0, abs=1e-3)
    onehot = torch.zeros_like(stage["logits"])
    onehot[0, 1, 0] = onehot[0, 3, 1] = onehot[1, 1, 0] = 1
    want = 2 * torchvision.ops.sigmoid_focal_loss(stage["logits"], onehot, reduction="sum") / 3
    torch.testing.assert_close(losses["s0_cls"], want)
    # shifting a predicted box costs 5 * |shift| / width in L1 (mean over the 3 pairs) and some GIoU
    stage["boxes"][0, 1] += torch.tensor([8.0, 0.0, 8.0, 0.0])
    losses, _ = model.losses([stage], targets)
    assert losses["s0_l1"].item() == pytest.approx(5 * 2 * 8 / 80 / 3, rel=1e-5)
    assert losses["s0_giou"].item() > 0.1


def test_mask_targets_are_the_masks_seen_through_the_predicted_boxes():
    size = (64, 64)
    target = _target([[8, 16, 36, 44], [0, 0, 64, 32]], [0, 0], size)
    inside = crop_masks_to_boxes(target["full_masks"], target["boxes"], 28)
    assert inside.shape == (2, 28, 28) and (inside == 1).all()
    # a box twice as wide, extending right: the left half of its grid is the object, the right half empty
    wide = torch.tensor([[8.0, 16.0, 64.0, 44.0]])
    crop = crop_masks_to_boxes(target["full_masks"][:1], wide, 28)[0]
    assert (crop[:, :14] == 1).all() and (crop[:, 14:] == 0).all()
    assert crop_masks_to_boxes(target["full_masks"][:0], wide[:0], 28).shape == (0, 28, 28)


def test_paste_equals_grid_sample_and_inverts_the_crop():
    g = torch.Generator().manual_seed(0)
    size = (40, 56)
    probs = torch.rand(5, 28, 28, generator=g)
    boxes = torch.cat([_random_boxes(4, size, g), torch.tensor([[-10.0, 30.0, 70.0, 52.0]])])  # one beyond the image
    ys = (torch.arange(size[0]) + 0.5)[None, :] - boxes[:, 1:2]
    xs = (torch.arange(size[1]) + 0.5)[None, :] - boxes[:, 0:1]
    gy = ys / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1  # mmdet's _do_paste_mask grid
    gx = xs / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, size[0], -1), gy[:, :, None].expand(-1, -1, size[1])], -1)
    want = F.grid_sample(probs[:, None], grid, align_corners=False)[:, 0]
    torch.testing.assert_close(paste_masks_in_boxes(probs, boxes, size), want, rtol=1e-5, atol=1e-5)
    # a mask cropped into its own box and pasted back is the mask again, up to the 28x28 sampling
    ellipse = torch.zeros(1, 64, 64, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    ellipse[0] = ((yy - 30) / 20) ** 2 + ((xx - 25) / 14) ** 2 <= 1
    box = torch.tensor([[11.0, 10.0, 40.0, 51.0]])
    back = paste_masks_in_boxes(crop_masks_to_boxes(ellipse, box, 28), box, (64, 64)) >= 0.5
    assert (back & ellipse).sum() / (back | ellipse).sum() > 0.95


def test_predict_scales_boxes_and_pastes_masks_at_the_original_size(model, monkeypatch):
    """Padded 64x64 input whose valid region is the top-left 32x48, originally 64x96 (scale 2)."""
    n, k = model.cfg.num_proposals, 3
    logits = torch.full((1, n, k), -6.0)
    logits[0, :2] = -9.0
    logits[0, 0, 2], logits[0, 1, 1] = 3.0, 2.0
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(1, n, 1)
    boxes[0, 0] = torch.tensor([8.0, 4.0, 24.0, 20.0])
    boxes[0, 1] = torch.tensor([30.0, 10.0, 60.0, 40.0])  # reaches beyond the valid region
    masks = torch.full((1, n, 28, 28), -10.0)
    masks[0, 0] = 10.0
    masks[0, 1, :, :14] = 10.0  # left half of its box
    fake = [dict(logits=logits, boxes=boxes, masks=masks, queries=None)]
    monkeypatch.setattr(model, "forward", lambda images: (fake, {}))
    (res,) = model.predict(torch.zeros(1, 3, 64, 64), [(32, 48)], [(64, 96)])
    top = min(model.cfg.max_per_image, n * k)
    assert res["scores"].shape == res["labels"].shape == (top,) and res["boxes"].shape == (top, 4)
    assert res["masks"].shape == (top, 64, 96) and res["masks"].dtype == torch.bool
    assert torch.all(res["scores"][:-1] >= res["scores"][1:])
    torch.testing.assert_close(res["scores"][:2], torch.sigmoid(torch.tensor([3.0, 2.0])))
    assert res["labels"][:2].tolist() == [2, 1]
    assert res["boxes"][0].tolist() == [16.0, 8.0, 48.0, 40.0]
    assert res["boxes"][1].tolist() == [60.0, 20.0, 96.0, 64.0]  # clipped to the image
    expected = torch.zeros(64, 96, dtype=torch.bool)
    expected[8:40, 16:48] = True
    assert torch.equal(res["masks"][0], expected)
    cols = res["masks"][1].any(0).nonzero().flatten()
    assert cols.min() == 60 and cols.max() == 89  # left half of the unclipped 60..120 box
    # the last four are proposals 0 and 1 with their other classes, ranked last: the same masks
    assert not res["masks"][2:-4].any() and res["masks"][-4:].flatten(1).any(1).all()


def test_predict_outputs_on_a_real_forward(model):
    images = torch.randn(2, 3, 64, 96)
    results = model.predict(images, [(64, 96), (50, 70)], [(128, 192), (100, 140)])
    for res, (h0, w0) in zip(results, [(128, 192), (100, 140)]):
        k = min(model.cfg.max_per_image, model.cfg.num_proposals * 3)
        assert res["masks"].shape == (k, h0, w0) and res["masks"].dtype == torch.bool
        assert ((res["scores"] > 0) & (res["scores"] < 1)).all()
        assert ((res["labels"] >= 0) & (res["labels"] < 3)).all() and res["labels"].dtype == torch.long
        assert (res["boxes"] >= 0).all() and (res["boxes"][:, 0::2] <= w0).all() and (res["boxes"][:, 1::2] <= h0).all()


@pytest.fixture(scope="module")
def two_images(demo, tmp_path_factory):
    """The first two labeled demo images as their own COCO file, and their training batch (160 px)."""
    data = json.loads(Path(demo["train_ann"]).read_text())
    images = data["images"][:2]
    ids = {img["id"] for img in images}
    ann = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    path = tmp_path_factory.mktemp("ann") / "two.json"
    path.write_text(json.dumps(ann))
    dataset = CocoInstances(path, demo["train"], 160, 224, flip_prob=0.0)
    return ann, collate_training([dataset[0], dataset[1]])


def _mask_ap(model, ann, images_dir) -> float:
    model.eval()
    images = sorted(ann["images"], key=lambda im: im["id"])
    categories = sorted(c["id"] for c in ann["categories"])
    results = []
    for batch in batch_loader(ImageFolder(images_dir, [im["file_name"] for im in images], 160, 224), 2, 0):
        predictions = model.predict(batch.images, batch.resized_hw, batch.image_hw)
        results += predictions_to_results(predictions, [images[i]["id"] for i in batch.index], categories)
    model.train()
    return coco_evaluate(ann, results)["segm"]["AP"]


def test_queryinst_learns_the_demo_objects(two_images, demo, one_thread):
    """50 AdamW steps on two demo images: the loss falls and mask AP on them rises from ~0.

    The backbone is random and frozen (its training adds time, not signal, in 50 steps). pytest -s prints
    the AP; one-thread runs of this test printed 0.0 -> 22.8."""
    ann, batch = two_images
    torch.manual_seed(0)
    model = _build(num_classes=len(ann["categories"]), frozen_stages=4, max_per_image=20).train()
    before = _mask_ap(model, ann, demo["train"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    losses = []
    for _ in range(50):
        stages, _ = model(batch["images"])
        loss = sum(model.losses(stages, batch["targets"])[0].values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    after = _mask_ap(model, ann, demo["train"])
    print(f"QueryInst mask AP on its two training images: {before:.1f} -> {after:.1f} after 50 steps")
    assert sum(losses[-5:]) / 5 < 0.4 * sum(losses[:5]) / 5
    assert after > before + 5.0


def test_pretraining_step_with_prompts_and_kernel_supervision(two_images):
    """One pre-training step as stages/pretrain.py runs it: prompts from the pseudo-mask boxes, the model's
    own losses and assignments, kernel supervision (Eq. 9) on the stages' queries."""
    _, batch = two_images
    torch.manual_seed(0)
    model = _build(num_classes=1, frozen_stages=4).train()
    targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in batch["targets"]]
    seeds = [torch.randn(len(t["labels"]), 512) for t in targets]
    prompt = SaliencyPrompt(512, model.cfg.channels)
    prompt_fn = prompt.prompt_fn([t["boxes"] for t in targets], torch.Generator().manual_seed(0))
    stages, _ = model(batch["images"], prompt_fn=prompt_fn)
    losses, assignments = model.losses(stages, targets)
    queries = [s["queries"] for s in stages]
    losses["kernel"] = prompt.kernel_loss(queries, assignments, seeds)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["kernel"] > 0
    assert (prompt.last_assignment >= 0).any()  # some queries were prompted
    # the last stage's queries feed only its own kernel term: gradient exactly on the matched queries
    (grad,) = torch.autograd.grad(losses["kernel"], queries[-1], retain_graph=True)
    matched = torch.zeros(grad.shape[:2], dtype=torch.bool)
    for b, (p, _) in enumerate(assignments[-1]):
        matched[b, p] = True
    assert torch.equal(grad.abs().sum(-1) > 0, matched) and matched.sum() == sum(len(s) for s in seeds)
    sum(losses.values()).backward()
    assert model.proposal_features.weight.grad.abs().sum() > 0
    assert prompt.seed_proj.weight.grad.abs().sum() > 0
