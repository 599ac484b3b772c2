"""Feature pyramid (P2..P5) and K-Net's semantic-FPN fusion neck at stride 8.

The FPN is the standard one (1x1 laterals, nearest top-down add, 3x3 outputs, no norm). The fusion neck
brings every level to stride 8, sums them, and splits the sum into the localisation features (from which
the RPN-stage kernels predict masks) and the semantic features (added to them for kernel updates).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = ("c2", "c3", "c4", "c5")


def gn_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups: 32 as in the reference, or the largest divisor of ``channels`` below it.

    GroupNorm needs ``channels % groups == 0``; the small CPU configs use e.g. 64 or 48 channels, and
    this keeps the reference's 32 groups whenever they fit instead of failing or silently changing it.
    """
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


class ConvGNReLU(nn.Sequential):
    """k x k conv (no bias, GN follows) + GroupNorm + ReLU, conv weights normal(0, 0.01)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1) -> None:
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False)
        nn.init.normal_(conv.weight, 0.0, 0.01)
        super().__init__(conv, nn.GroupNorm(gn_groups(out_ch), out_ch), nn.ReLU(inplace=True))


class FPN(nn.Module):
    """C2..C5 -> P2..P5, each with ``channels`` channels at strides 4..32.

    Convs use xavier-uniform weights and zero biases (the mmdet FPN default the reference inherits).
    """

    def __init__(self, in_channels: Mapping[str, int], channels: int = 256) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(in_channels[lvl], channels, 1) for lvl in LEVELS)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in LEVELS)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """feats: {'c2'..'c5': (B, C_l, H/s, W/s)} -> {'p2'..'p5': (B, channels, H/s, W/s)}."""
        lat = [conv(feats[lvl]) for conv, lvl in zip(self.lateral, LEVELS)]
        for i in range(len(lat) - 1, 0, -1):
            # size= rather than scale_factor=2: odd input sizes give levels that are not exact halves.
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return {f"p{i + 2}": conv(x) for i, (conv, x) in enumerate(zip(self.output, lat))}


def sine_position_encoding(batch: int, channels: int, height: int, width: int, device=None,
                           temperature: float = 10000.0) -> Tensor:
    """2-D sine/cosine encoding, (batch, channels, height, width); half the channels per axis.

    Coordinates are the cumulative cell counts normalised to (0, 2*pi] (DETR's ``normalize=True``). The
    reference uses an all-valid mask here, so the encoding depends only on the map size, never on padding.
    """
    if channels % 4:
        raise ValueError(f"sine position encoding needs channels divisible by 4, got {channels}")
    num_feats = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_y, pos_x = y[:, None] / dim_t, x[:, None] / dim_t  # (H, F), (W, F)
    # interleave sin on even and cos on odd features, as DETR does
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat((pos_y[:, None, :].expand(height, width, num_feats),
                     pos_x[None, :, :].expand(height, width, num_feats)), dim=2)
    return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)


class _Upsample2x(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class SemanticFusion(nn.Module):
    """P2..P5 -> (loc_feats, sem_feats), both (B, C, H/8, W/8), via a semantic-FPN style fusion.

    P2: stride-2 conv; P3: conv; P4: conv, x2, conv; P5 + sine position encoding: conv, x2, conv, x2, conv.
    All 3x3 GN+ReLU. The sum feeds two 1x1 GN+ReLU convs. Each branch's output is resized to P3's size
    before summing so that inputs whose sides are not multiples of 32 still line up.
    """

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        c = channels
        up = _Upsample2x
        self.p2 = ConvGNReLU(c, c, 3, stride=2)
        self.p3 = ConvGNReLU(c, c)
        self.p4 = nn.Sequential(ConvGNReLU(c, c), up(), ConvGNReLU(c, c))
        self.p5 = nn.Sequential(ConvGNReLU(c, c), up(), ConvGNReLU(c, c), up(), ConvGNReLU(c, c))
        self.loc = ConvGNReLU(c, c, 1)
        self.sem = ConvGNReLU(c, c, 1)

    def forward(self, pyramid: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """pyramid: {'p2'..'p5'} from :class:`FPN` -> (loc_feats, sem_feats), (B, C, H/8, W/8) each."""
        p5 = pyramid["p5"]
        b, c, h, w = p5.shape
        p5 = p5 + sine_position_encoding(b, c, h, w, device=p5.device).to(p5.dtype)
        size = pyramid["p3"].shape[-2:]
        fused = self.p3(pyramid["p3"])
        for branch, x in ((self.p2, pyramid["p2"]), (self.p4, pyramid["p4"]), (self.p5, p5)):
            y = branch(x)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            fused = fused + y
        return self.loc(fused), self.sem(fused)
