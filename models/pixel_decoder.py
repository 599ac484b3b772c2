"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder over strides 8/16/32 plus an FPN
lateral at stride 4 for the per-pixel mask features (Cheng et al. 2022, ``MSDeformAttnPixelDecoder``).

Deformable attention (Zhu et al. 2021) is the PyTorch reference form built on ``grid_sample``, not the
custom CUDA op: each query samples ``num_points`` bilinear points per head and level around its reference
point and sums them with softmax weights. As in the reference, padding is not masked (every position is
valid), so the encoder sees an image's zero padding like any other pixels.

Shapes: B images of (H, W), multiples of 32; C channels; S = sum of h_l * w_l over the three levels.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.fpn import gn_groups, sine_position_encoding

ENCODER_LEVELS = ("c5", "c4", "c3")  # strides 32, 16, 8: the order of the encoder's levels and outputs


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """detectron2's init for the FPN-style convs of the reference: kaiming-uniform with a = 1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def deformable_sample(value: Tensor, shapes: Sequence[tuple[int, int]], locations: Tensor,
                      weights: Tensor) -> Tensor:
    """Weighted sum of bilinear samples of every level (``ms_deform_attn_core_pytorch``).

    value: (B, S, M, D) per-head values of the flattened levels; shapes: (h_l, w_l) per level;
    locations: (B, Q, M, L, P, 2) sampling points as (x, y) in [0, 1] of each level (outside: zeros);
    weights: (B, Q, M, L, P). Returns (B, Q, M * D).
    """
    b, _, m, d = value.shape
    _, q, _, num_levels, p, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample's [-1, 1], pixel centres at (i + 0.5) / n (align_corners=False)
    sampled = []
    for level, (value_l, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        value_l = value_l.flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*M, Q, P, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(b * m, 1, q, num_levels * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*M, D, Q)
    return out.view(b, m * d, q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the reference's initialisation: zero offset weights, offset
    biases pointing each head in its own direction at distances 1..P, uniform attention weights."""

    def __init__(self, channels: int, num_levels: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(channels, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(channels, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(num_heads, dtype=torch.float32) * (2 * math.pi / num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(num_heads, 1, 1, 2)
        grid = grid.repeat(1, num_levels, num_points, 1)
        grid *= torch.arange(1, num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor,
                shapes: Sequence[tuple[int, int]]) -> Tensor:
        """query: (B, Q, C); reference_points: (B, Q, L, 2) as (x, y) in [0, 1]; value: (B, S, C) the
        flattened levels of ``shapes``. Returns (B, Q, C)."""
        b, q, c = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(b, value.shape[1], m, c // m)
        offsets = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
        size = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)  # offsets in cells
        locations = reference_points[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
        return self.output_proj(deformable_sample(v, shapes, locations, weights))


def cell_centres(shapes: Sequence[tuple[int, int]], device=None) -> Tensor:
    """(S, 2) centres (x, y) of every cell of every level, normalised to [0, 1]: the encoder's reference
    points (the reference's valid ratios are all 1 since nothing is masked)."""
    centres = []
    for h, w in shapes:
        y, x = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w,
                              indexing="ij")
        centres.append(torch.stack([x.flatten(), y.flatten()], -1))
    return torch.cat(centres)


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN; post-norm, no dropout (the reference's 0.0)."""

    def __init__(self, channels: int, num_levels: int, num_heads: int, num_points: int, ffn_dim: int) -> None:
        super().__init__()
        self.attention = MSDeformAttn(channels, num_levels, num_heads, num_points)
        self.attention_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, channels))
        self.ffn_norm = nn.LayerNorm(channels)
        # the reference xavier-fills every matrix of its encoder (then redoes the deformable attention's own
        # init), so the FFN weights are xavier too; their biases keep nn.Linear's default, as there
        for linear in (self.ffn[0], self.ffn[2]):
            nn.init.xavier_uniform_(linear.weight)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        """src, pos: (B, S, C); reference_points: (B, S, L, 2). Returns (B, S, C)."""
        src = self.attention_norm(src + self.attention(src + pos, reference_points, src, shapes))
        return self.ffn_norm(src + self.ffn(src))


def conv_gn(in_ch: int, out_ch: int, kernel_size: int, relu: bool = False) -> nn.Sequential:
    """Conv (no bias) + GroupNorm (+ ReLU), c2_xavier_fill: the reference's lateral and output convs."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
    c2_xavier_fill(conv)
    return nn.Sequential(conv, nn.GroupNorm(gn_groups(out_ch), out_ch), *([nn.ReLU(inplace=True)] if relu else []))


class PixelDecoder(nn.Module):
    """C2..C5 -> mask features (B, C, H/4, W/4) and the encoder's outputs at strides 32, 16, 8."""

    def __init__(self, in_channels: Mapping[str, int], channels: int = 256, num_layers: int = 6, num_heads: int = 8,
                 num_points: int = 4, ffn_dim: int = 1024) -> None:
        super().__init__()
        num_levels = len(ENCODER_LEVELS)
        self.input_proj = nn.ModuleList()
        for level in ENCODER_LEVELS:
            conv = nn.Conv2d(in_channels[level], channels, 1)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(gn_groups(channels), channels)))
        self.level_embed = nn.Parameter(torch.empty(num_levels, channels).normal_())
        self.layers = nn.ModuleList(EncoderLayer(channels, num_levels, num_heads, num_points, ffn_dim)
                                    for _ in range(num_layers))
        self.lateral = conv_gn(in_channels["c2"], channels, 1)
        self.output = conv_gn(channels, channels, 3, relu=True)
        self.mask_features = nn.Conv2d(channels, channels, 1)
        c2_xavier_fill(self.mask_features)

    def forward(self, feats: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """feats: {'c2'..'c5'} backbone maps. Returns mask features (B, C, H/4, W/4) and the encoded maps
        [(B, C, H/32, W/32), (B, C, H/16, W/16), (B, C, H/8, W/8)], all float32 even under autocast."""
        # The reference runs the whole pixel decoder in float32 with autocast off (its deformable CUDA op has
        # no half version); .float() alone would not do: autocast recasts every Linear and Conv input.
        with torch.autocast(feats["c5"].device.type, enabled=False):
            maps = [proj(feats[level].float()) for proj, level in zip(self.input_proj, ENCODER_LEVELS)]
            b, c = maps[0].shape[:2]
            shapes = [tuple(x.shape[-2:]) for x in maps]
            src = torch.cat([x.flatten(2).transpose(1, 2) for x in maps], 1)
            pos = torch.cat([sine_position_encoding(b, c, h, w, device=src.device).flatten(2).transpose(1, 2)
                             + self.level_embed[i] for i, (h, w) in enumerate(shapes)], 1)
            reference_points = cell_centres(shapes, src.device)[None, :, None].expand(b, -1, len(shapes), -1)
            for layer in self.layers:
                src = layer(src, pos, reference_points, shapes)
            encoded = [x.transpose(1, 2).reshape(b, c, h, w)
                       for x, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)]
            lateral = self.lateral(feats["c2"].float())
            y = lateral + F.interpolate(encoded[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            return self.mask_features(self.output(y)), encoded
