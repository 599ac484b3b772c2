"""Mask2Former: output structure, batch independence, masked attention against a per-query loop, the scale
cycle, prompt injection, and instance post-processing."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from models.mask2former import Mask2FormerConfig, MaskedCrossAttention, attention_block_mask, build_mask2former
from models.saliency_prompt import box_prompts, inject_prompts, pad_prompts


def _build(**overrides):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        return build_mask2former(Mask2FormerConfig.small(backbone="resnet18", **overrides))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _build(num_classes=3).eval()


def test_forward_structure(model):
    cfg = model.cfg
    with torch.no_grad():
        stages, feats = model(torch.randn(2, 3, 64, 96))
    n, c = cfg.num_queries, cfg.channels
    assert len(stages) == 1 + cfg.decoder_layers
    assert stages[0]["queries"] is None  # the initial queries are not image-conditioned: no kernel supervision
    for s in stages:
        assert s["logits"].shape == (2, n, 4)  # 3 classes + no-object
        assert s["masks"].shape == (2, n, 16, 24)
        assert s["queries"] is None or s["queries"].shape == (2, n, c)
    assert feats["p5"].shape == (2, c, 2, 3) and feats["mask_features"].shape == (2, c, 16, 24)
    assert not torch.allclose(stages[1]["masks"], stages[2]["masks"])


def _attention_loop(layer: MaskedCrossAttention, q, q_pos, mem, mem_pos, blocked):
    """The cross-attention of each (image, query, head) on its allowed positions only, one at a time."""
    attn = layer.attention
    c, heads = q.shape[-1], attn.num_heads
    d = c // heads
    w_q, w_k, w_v = attn.in_proj_weight.split(c)
    b_q, b_k, b_v = attn.in_proj_bias.split(c)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        keys = (mem[b] + mem_pos[b]) @ w_k.T + b_k
        values = mem[b] @ w_v.T + b_v
        for n in range(q.shape[1]):
            query = (q[b, n] + q_pos[b, n]) @ w_q.T + b_q
            per_head = []
            for h in range(heads):
                allowed = ~blocked[b * heads + h, n]
                k, v = keys[allowed, h * d:(h + 1) * d], values[allowed, h * d:(h + 1) * d]
                weights = (k @ query[h * d:(h + 1) * d] / d ** 0.5).softmax(0)
                per_head.append(weights @ v)
            out[b, n] = torch.cat(per_head) @ attn.out_proj.weight.T + attn.out_proj.bias
    return layer.norm(q + out)


def test_masked_attention_equals_a_per_query_loop_and_empty_masks_see_everything():
    torch.manual_seed(0)
    heads, n, c = 4, 5, 16
    layer = MaskedCrossAttention(c, heads).eval()
    mask_logits = torch.randn(2, n, 8, 12) * 3
    mask_logits[0, 1] = -5.0  # an empty mask: this query must attend to every position
    mask_logits[1, 3] = -5.0
    mask_logits[1, 3, :2, :2] = 5.0  # a mask covering a corner only
    blocked = attention_block_mask(mask_logits, (4, 6), heads)
    assert blocked.shape == (2 * heads, n, 24)
    assert not blocked[:heads, 1].any()  # the empty mask blocks nothing
    corner = torch.zeros(4, 6, dtype=torch.bool)
    corner[0, 0] = True  # the 2 x 2 corner at stride 8 is cell (0, 0) at stride 16
    assert torch.equal(~blocked[heads * 1 + 2, 3], corner.flatten())
    q, q_pos = torch.randn(2, n, c), torch.randn(2, n, c)
    mem, mem_pos = torch.randn(2, 24, c), torch.randn(2, 24, c)
    with torch.no_grad():
        got = layer(q, q_pos, mem, mem_pos, blocked)
        torch.testing.assert_close(got, _attention_loop(layer, q, q_pos, mem, mem_pos, blocked), rtol=1e-4, atol=1e-5)
        unmasked = layer(q, q_pos, mem, mem_pos, None)
    torch.testing.assert_close(got[0, 1], unmasked[0, 1])  # the empty-mask query: same as no mask at all
    assert not torch.allclose(got[1, 3], unmasked[1, 3], atol=1e-4)


def test_decoder_layers_cycle_over_strides_32_16_8(model):
    seen = []
    hooks = [layer.cross.register_forward_hook(lambda m, args, out: seen.append(args[2].shape[1]))
             for layer in model.layers]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    for h in hooks:
        h.remove()
    assert seen == [2 * 3, 4 * 6, 8 * 12] * (model.cfg.decoder_layers // 3)


def test_prompts_change_exactly_the_matched_content_queries(model):
    """Prompts (P5 in each box, Eq. 5) added to chosen queries (Eq. 8) change those queries' initial
    predictions and no other's; the function receives the learned content queries and the stride-32 map."""
    images = torch.randn(2, 3, 64, 64)
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 48.0], [16.0, 16.0, 64.0, 64.0]]), torch.tensor([[8.0, 8.0, 40.0, 40.0]])]
    idx = torch.full((2, model.cfg.num_queries), -1)
    idx[0, [1, 4]], idx[0, 7], idx[1, 3] = 0, 1, 0
    received = {}

    def prompt_fn(queries, feats):
        received.update(queries=queries.clone(), p5=feats["p5"])
        prompts, _ = pad_prompts(box_prompts(feats["p5"], boxes, stride=32))
        return inject_prompts(queries, prompts, idx, torch.ones_like(idx, dtype=torch.bool))

    with torch.no_grad():
        plain, feats = model(images)
        prompted, _ = model(images, prompt_fn=prompt_fn)
    torch.testing.assert_close(received["queries"], model.query_feat.weight[None].expand(2, -1, -1))
    torch.testing.assert_close(received["p5"], feats["p5"])
    for key in ("logits", "masks"):
        changed = (prompted[0][key] != plain[0][key]).flatten(2).any(-1)
        assert torch.equal(changed, idx >= 0), key
    assert not torch.allclose(prompted[-1]["masks"], plain[-1]["masks"], atol=1e-3)


def test_predict_scores_crop_and_resize(model, monkeypatch):
    """Score = softmax class probability (no-object left out) x mean mask probability inside the mask."""
    n = model.cfg.num_queries
    masks = torch.full((1, n, 16, 16), -10.0)
    masks[0, 0, :9, :9] = 10.0  # the valid 8 x 8 region (and a cell of padding for the bilinear edge)
    masks[0, 1, :4, :8] = 10.0  # top half of the valid region
    masks[0, 2] = 1.0  # everywhere, with probability sigmoid(1)
    logits = torch.full((1, n, 4), -5.0)
    logits[:, :, 3] = 5.0  # no-object everywhere, but:
    logits[0, 0] = torch.tensor([0.0, 0.0, 6.0, 0.0])  # query 0 says class 2
    logits[0, 1] = torch.tensor([0.0, 4.0, 0.0, 0.0])  # query 1 says class 1
    logits[0, 2] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # query 2 says class 0
    monkeypatch.setattr(model, "forward", lambda images: ([dict(logits=logits, masks=masks, queries=None)], {}))
    (res,) = model.predict(torch.zeros(1, 3, 64, 64), [(32, 32)], [(100, 80)])
    k = min(model.cfg.max_per_image, n * 3)
    assert res["scores"].shape == res["labels"].shape == (k,) and res["masks"].shape == (k, 100, 80)
    assert torch.all(res["scores"][:-1] >= res["scores"][1:])
    probs = logits[0].softmax(-1)
    assert res["labels"][:3].tolist() == [2, 1, 0]
    torch.testing.assert_close(res["scores"][0], probs[0, 2] * torch.sigmoid(torch.tensor(10.0)))
    torch.testing.assert_close(res["scores"][2], probs[2, 0] * torch.sigmoid(torch.tensor(1.0)))
    assert res["masks"][0].all() and res["masks"][2].all() and res["boxes"][0].tolist() == [0.0, 0.0, 80.0, 100.0]
    rows = res["masks"][1].any(1).nonzero().flatten()
    assert rows.min() == 0 and abs(rows.max().item() + 1 - 50) <= 2
    empty = ~res["masks"].flatten(1).any(1)
    assert torch.equal(empty, res["scores"] == 0) and empty.sum() == (n - 3) * 3  # empty masks score 0


def test_losses_name_each_layer_and_return_its_assignment(model):
    stages, _ = model(torch.randn(1, 3, 64, 64))
    full = torch.zeros(2, 64, 64, dtype=torch.bool)
    full[0, 8:40, 8:40], full[1, 40:60, 20:60] = True, True
    target = dict(labels=torch.tensor([0, 2]), full_masks=full, masks=F.avg_pool2d(full[None].float(), 4)[0].round(),
                  boxes=torch.tensor([[8.0, 8, 40, 40], [20, 40, 60, 60]]))
    losses, assignments = model.losses(stages, [target])
    assert set(losses) == {f"d{s}_{t}" for s in range(len(stages)) for t in ("cls", "mask", "dice")}
    assert len(assignments) == len(stages) and all(len(a[0][0]) == 2 for a in assignments)
    assert all(torch.isfinite(v) for v in losses.values())
