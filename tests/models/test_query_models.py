"""The query-model contract (models/query_model.py), checked for every model of models.build.QUERY_MODELS: a
model added there is held to the same behaviour that pre-training, fine-tuning and evaluation rely on."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from models.build import QUERY_MODELS, build_query_model, model_kind, query_model_config, query_model_spec


@pytest.fixture(scope="module", params=list(QUERY_MODELS))
def model(request):
    """The small model with its default number of queries (16). Thresholded masks (K-Net's mask pooling,
    Mask2Former's attention masks) make batched == per-image hold only while no mask logit sits within float
    noise of 0: with 8 K-Net kernels and this seed one does, and one pixel flips at the last stage."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return build_query_model(query_model_config(request.param, small=True, backbone="resnet18",
                                                    num_classes=3)).eval()


def test_config_factory_and_kind(model):
    kind = model_kind(model.cfg)
    assert isinstance(model.cfg, query_model_spec(kind).config)
    assert model.cfg.backbone == "resnet18" and model.cfg.num_classes == 3
    cfg = query_model_config(kind, small=False, backbone="resnet34", num_queries=7, num_classes=5)
    assert getattr(cfg, query_model_spec(kind).num_queries_field) == 7 and cfg.backbone == "resnet34"
    assert cfg.channels == 256 and model_kind(cfg) == kind
    with pytest.raises(ValueError, match="unknown query-based model 'detr'"):
        query_model_spec("detr")


# QueryInst's boxes are in pixels, decoded from regressed deltas: float32 noise of the batched matrix products
# moves a corner of the second stage's boxes by up to 7e-4 px beyond rtol (image seeds 0-99 of this test, one
# thread), ~1e-3 on some CPUs; its masks are RoI-aligned inside those boxes and inherit the noise (up to 2.5e-4
# in logits). Leaking across images errs by far more. Every other output (K-Net's, Mask2Former's, QueryInst's
# class logits and queries) holds 1e-4.
QUERYINST_ATOL = {"boxes": 2e-3, "masks": 1e-3}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_forward_equals_per_image_forward(model, seed):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    atol = QUERYINST_ATOL if model_kind(model.cfg) == "queryinst" else {}
    with torch.no_grad():
        batched, _ = model(images)
        for b in range(3):
            single, _ = model(images[b:b + 1])
            for s_b, s_1 in zip(batched, single):
                for key, value in s_1.items():  # masks, logits, queries and the model's own (QueryInst: boxes)
                    if value is not None:
                        torch.testing.assert_close(s_b[key][b:b + 1], value, rtol=1e-4, atol=atol.get(key, 1e-4),
                                                   msg=key)


def test_prompt_fn_is_called_once_on_the_initial_queries_with_p5(model):
    images = torch.randn(2, 3, 64, 96)
    calls = []

    def prompt_fn(queries, feats):
        calls.append((tuple(queries.shape), tuple(feats["p5"].shape)))
        return queries + 1.0

    with torch.no_grad():
        plain, feats = model(images)
        prompted, _ = model(images, prompt_fn=prompt_fn)
    n, c = 16, model.cfg.channels
    assert calls == [((2, n, c), (2, c, 2, 3))]
    assert feats["p5"].shape == (2, c, 2, 3)
    supervised = [s for s in prompted if s["queries"] is not None]
    assert supervised and all(s["queries"].shape == (2, n, c) for s in supervised)
    assert not torch.allclose(prompted[-1]["masks"], plain[-1]["masks"], atol=1e-4)


def test_losses_are_named_weighted_scalars_with_the_pairs_of_every_stage(model):
    images = torch.randn(2, 3, 64, 64)
    full = torch.zeros(2, 64, 64, dtype=torch.bool)
    full[0, 8:40, 8:40], full[1, 36:60, 20:60] = True, True
    targets = [dict(masks=(F.avg_pool2d(full[None].float(), 4)[0] > 0.5).float(), full_masks=full,
                    boxes=torch.tensor([[8.0, 8, 40, 40], [20, 36, 60, 60]]), labels=torch.tensor([0, 2])),
               dict(masks=torch.zeros(0, 16, 16), full_masks=torch.zeros(0, 64, 64, dtype=torch.bool),
                    boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]  # an image without objects
    model.train()
    try:
        stages, _ = model(images)
        losses, assignments = model.losses(stages, targets)
    finally:
        model.eval()
    assert losses and all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert len(assignments) == len(stages)
    for per_image in assignments:
        (p0, g0), (p1, g1) = per_image
        assert p0.dtype == g0.dtype == torch.long and p0.device.type == "cpu"
        assert len(p0) == 2 and sorted(g0.tolist()) == [0, 1] and len(set(p0.tolist())) == 2
        assert len(p1) == len(g1) == 0
    model.zero_grad(set_to_none=True)


def test_predict_of_a_batch_equals_predict_of_each_image(model):
    images = torch.randn(2, 3, 64, 64)
    sizes, orig = [(64, 64), (48, 40)], [(64, 64), (96, 80)]
    both = model.predict(images, sizes, orig)
    for b in range(2):
        (one,) = model.predict(images[b:b + 1], sizes[b:b + 1], orig[b:b + 1])
        assert len(one["scores"]) <= model.cfg.max_per_image and one["labels"].max() < 3
        assert torch.all(one["scores"][:-1] >= one["scores"][1:]) and one["boxes"].shape == (len(one["scores"]), 4)
        torch.testing.assert_close(both[b]["scores"], one["scores"], rtol=1e-4, atol=1e-4)
        assert both[b]["masks"].shape == (one["masks"].shape[0], *orig[b])
        # masks may only differ where a probability sits within float noise of the threshold
        assert (both[b]["masks"] != one["masks"]).float().mean() < 1e-3


def test_maps_at_image_size_resizes_each_distinct_map_once_with_the_same_result():
    from models.query_model import maps_at_image_size

    torch.manual_seed(0)
    maps, index = torch.randn(5, 12, 16), torch.tensor([3, 1, 3, 3, 0, 1])
    distinct, inverse = maps_at_image_size(maps, index, (48, 64), (40, 52), (95, 130))
    assert distinct.shape == (3, 95, 130)
    for k, n in enumerate(index):  # what predict did before: every selected map on its own
        one = F.interpolate(maps[n][None, None], size=(48, 64), mode="bilinear", align_corners=False)
        one = F.interpolate(one[..., :40, :52], size=(95, 130), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(distinct[inverse[k]], one, rtol=0, atol=1e-6)


def old_instances(last: dict, b: int, padded_hw, valid_hw, orig_hw, cfg, kind: str) -> dict:
    """K-Net's and Mask2Former's `predict` for image b, each as it was written before they shared
    `models.query_model.query_instances` (the order of sigmoid and resizing differs between them)."""
    from models.query_model import maps_at_image_size, mask_quality
    from models.saliency import mask_boxes

    if kind == "knet":
        scores = last["logits"][b].sigmoid().flatten()
        num_classes = last["logits"].shape[-1]
    else:
        class_scores = last["logits"][b].float().softmax(-1)[:, :-1]
        num_classes, scores = class_scores.shape[1], class_scores.flatten()
    k = min(cfg.max_per_image, scores.numel())
    scores, idx = scores.topk(k)
    labels, query = idx % num_classes, idx // num_classes
    maps = last["masks"][b].sigmoid() if kind == "knet" else last["masks"][b]
    probs, inverse = maps_at_image_size(maps, query, padded_hw, valid_hw, orig_hw)
    probs = probs if kind == "knet" else probs.sigmoid()
    masks = probs > cfg.mask_threshold_test
    order = torch.arange(k)
    if kind == "mask2former" or cfg.mask_quality_score:
        scores, order = (scores * mask_quality(probs, masks)[inverse]).sort(descending=True)
    chosen = inverse[order]
    return dict(scores=scores, labels=labels[order], masks=masks[chosen], boxes=mask_boxes(masks)[chosen])


@pytest.mark.parametrize("kind, quality", [("knet", False), ("knet", True), ("mask2former", True)])
def test_predict_gives_what_each_model_gave_before_the_shared_inference(kind, quality):
    torch.manual_seed(0)
    cfg = query_model_config(kind, small=True, backbone="resnet18", num_classes=3)
    if kind == "knet":
        cfg = dataclasses.replace(cfg, mask_quality_score=quality)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        model = build_query_model(cfg).eval()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    sizes, orig = [(64, 96), (48, 70)], [(64, 96), (100, 130)]
    got = model.predict(images, sizes, orig)
    with torch.no_grad():
        last = model(images)[0][-1]
    for b in range(2):
        want = old_instances(last, b, images.shape[-2:], sizes[b], orig[b], cfg, kind)
        assert len(want["scores"]) == 48 and want["masks"].any()  # 16 queries x 3 classes, some mask pixels
        for key in want:
            assert torch.equal(got[b][key], want[key]), key
