"""Mask2Former's pixel decoder: deformable sampling against a hand loop, the encoder's batch independence, its
initialisation and float32 under autocast."""
from __future__ import annotations

import math

import pytest
import torch

from models.pixel_decoder import EncoderLayer, MSDeformAttn, PixelDecoder, cell_centres, deformable_sample


def _bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value (D, h, w) at the normalised point (x, y), cell (i, j) centred at ((j + .5) / w, (i + .5) / h);
    outside the map counts as zeros. Plain Python loops."""
    d, h, w = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=torch.float64)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * value[:, yy, xx].double()
    return out


def test_deformable_sampling_equals_a_per_point_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    b, m, d, q, p = 2, 2, 3, 5, 3
    value = torch.randn(b, sum(h * w for h, w in shapes), m, d, generator=g)
    locations = torch.rand(b, q, m, len(shapes), p, 2, generator=g) * 1.4 - 0.2  # some points outside
    weights = torch.rand(b, q, m, len(shapes), p, generator=g)
    got = deformable_sample(value, shapes, locations, weights)
    assert got.shape == (b, q, m * d)
    levels = value.split([h * w for h, w in shapes], dim=1)
    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                want = torch.zeros(d, dtype=torch.float64)
                for li, (h, w) in enumerate(shapes):
                    grid = levels[li][bi, :, mi].T.reshape(d, h, w)
                    for pi in range(p):
                        x, y = locations[bi, qi, mi, li, pi].tolist()
                        want += weights[bi, qi, mi, li, pi].item() * _bilinear(grid, x, y)
                torch.testing.assert_close(got[bi, qi, mi * d:(mi + 1) * d].double(), want, rtol=1e-5, atol=1e-5)


def test_reference_points_read_their_own_cell():
    """At the encoder's reference points (cell centres) with zero offsets, a sample is that cell's value."""
    shapes = [(2, 3), (1, 2)]
    value = torch.arange(8.0).view(1, 8, 1, 1)
    centres = cell_centres(shapes)
    for level in range(2):
        locations = centres[None, :, None, None, None, :].expand(1, 8, 1, 2, 1, 2).clone()
        weights = torch.zeros(1, 8, 1, 2, 1)
        weights[..., level, 0] = 1
        start, end = (0, 6) if level == 0 else (6, 8)
        out = deformable_sample(value, shapes, locations, weights)[0, start:end, 0]
        torch.testing.assert_close(out, torch.arange(float(start), float(end)))


def test_initial_offsets_point_each_head_its_own_way():
    attn = MSDeformAttn(channels=16, num_levels=3, num_heads=4, num_points=2)
    offsets = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    directions = torch.nn.functional.normalize(offsets[:, 0, 0], dim=-1)
    assert torch.allclose(offsets[:, :, 1], 2 * offsets[:, :, 0])  # point k at distance k
    assert (directions @ directions.T - 2 * torch.eye(4)).max() < 0.99  # four distinct directions
    assert torch.equal(attn.attention_weights.weight, torch.zeros_like(attn.attention_weights.weight))


def test_encoder_outputs_and_batch_independence():
    torch.manual_seed(0)
    channels = {"c2": 8, "c3": 16, "c4": 24, "c5": 32}
    decoder = PixelDecoder(channels, channels=32, num_layers=2, num_heads=4, num_points=2, ffn_dim=64).eval()
    feats = {lvl: torch.randn(3, c, 64 // s, 96 // s) for (lvl, c), s in zip(channels.items(), (4, 8, 16, 32))}
    mask_features, encoded = decoder(feats)
    assert mask_features.shape == (3, 32, 16, 24)
    assert [tuple(x.shape) for x in encoded] == [(3, 32, 2, 3), (3, 32, 4, 6), (3, 32, 8, 12)]
    for b in range(3):
        one_masks, one_encoded = decoder({k: v[b:b + 1] for k, v in feats.items()})
        torch.testing.assert_close(mask_features[b:b + 1], one_masks, rtol=1e-4, atol=1e-4)
        for x, y in zip(encoded, one_encoded):
            torch.testing.assert_close(x[b:b + 1], y, rtol=1e-4, atol=1e-4)
    # the encoder mixes levels: changing only C5 changes the stride-8 output
    changed = decoder({**feats, "c5": torch.randn_like(feats["c5"])})[1][2]
    assert not torch.allclose(changed, encoded[2], atol=1e-3)


def test_encoder_matrices_are_xavier_uniform_as_the_reference():
    """The reference xavier-fills every matrix of its encoder and then gives the deformable attention its own
    init: FFN and value / output projections are uniform in +-sqrt(6 / (fan_in + fan_out)); the offset and
    attention-weight matrices are zero. nn.Linear's default would give linear2 less than half that spread."""
    torch.manual_seed(0)
    layer = EncoderLayer(channels=256, num_levels=3, num_heads=8, num_points=4, ffn_dim=1024)  # the paper's sizes
    for weight in (layer.ffn[0].weight, layer.ffn[2].weight, layer.attention.value_proj.weight,
                   layer.attention.output_proj.weight):
        bound = math.sqrt(6 / sum(weight.shape))
        assert weight.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # uniform's std
    assert not layer.attention.sampling_offsets.weight.any() and not layer.attention.attention_weights.weight.any()


def test_the_pixel_decoder_computes_in_float32_under_autocast():
    """Under autocast (bfloat16 backbone features, as in CUDA training) the pixel decoder gives exactly its
    float32 result on those features, as the reference, which turns autocast off there."""
    torch.manual_seed(0)
    channels = {"c2": 8, "c3": 16, "c4": 24, "c5": 32}
    decoder = PixelDecoder(channels, channels=32, num_layers=2, num_heads=4, num_points=2, ffn_dim=64).eval()
    feats = {lvl: torch.randn(1, c, 64 // s, 64 // s).bfloat16()
             for (lvl, c), s in zip(channels.items(), (4, 8, 16, 32))}
    with torch.no_grad():
        want_masks, want_encoded = decoder({k: v.float() for k, v in feats.items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_masks, got_encoded = decoder(feats)
    for got, want in zip([got_masks, *got_encoded], [want_masks, *want_encoded]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
