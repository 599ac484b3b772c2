"""QueryInst's per-stage heads: Sparse R-CNN's dynamic instance interaction (DynamicConv), the box/class head
(DIIHead) and the dynamic mask head, as in mmdet's QueryInst (Fang et al. 2021; Sun et al. 2021).

Shapes: B images, N proposals per image, n = B * N RoIs (image-major), C channels, D the dynamic
(generated 1x1 conv) width, K classes, r the RoI grid (7 for boxes, 14 for masks).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.fpn import ConvGNReLU


def _linear_ln_relu(channels: int, count: int) -> nn.Sequential:
    """``count`` x (Linear without bias, LayerNorm, ReLU): mmdet's cls_fcs / reg_fcs."""
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DynamicConv(nn.Module):
    """Two 1x1 convs whose weights are generated from each proposal feature (Sparse R-CNN §3.4).

    For a proposal feature q (C,) and its RoI features x (r*r, C):
        W_in (C, D), W_out (D, C) = split(Linear(q));  y = ReLU(LN(ReLU(LN(x W_in)) W_out))
    With ``roi_size`` given (the box branch), y is flattened and projected back to one (C,) vector
    (Linear, LN, ReLU); without it (the mask branch), y stays a (C, r, r) map.
    """

    def __init__(self, channels: int, dynamic_dim: int, roi_size: int | None = None) -> None:
        super().__init__()
        self.channels, self.dynamic_dim = channels, dynamic_dim
        self.dynamic_layer = nn.Linear(channels, 2 * channels * dynamic_dim)
        self.norm_in, self.norm_out = nn.LayerNorm(dynamic_dim), nn.LayerNorm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.proj = None
        if roi_size is not None:
            self.proj = nn.Sequential(nn.Linear(channels * roi_size * roi_size, channels), nn.LayerNorm(channels),
                                      nn.ReLU(inplace=True))

    def forward(self, queries: Tensor, roi_feats: Tensor) -> Tensor:
        """queries: (n, C); roi_feats: (n, C, r, r) -> (n, C) with projection, else (n, C, r, r)."""
        n, c, h, w = roi_feats.shape
        params = self.dynamic_layer(queries)
        w_in = params[:, :c * self.dynamic_dim].view(n, c, self.dynamic_dim)
        w_out = params[:, c * self.dynamic_dim:].view(n, self.dynamic_dim, c)
        x = roi_feats.flatten(2).transpose(1, 2)  # (n, r*r, C)
        x = self.relu(self.norm_in(torch.bmm(x, w_in)))
        x = self.relu(self.norm_out(torch.bmm(x, w_out)))
        if self.proj is not None:
            return self.proj(x.flatten(1))
        return x.transpose(1, 2).reshape(n, c, h, w)


class DIIHead(nn.Module):
    """One Sparse R-CNN stage: self-attention over the proposal features of an image, dynamic instance
    interaction with each proposal's 7x7 RoI features, FFN, then class logits and box deltas."""

    def __init__(self, channels: int, num_classes: int, dynamic_dim: int, ffn_dim: int, num_heads: int,
                 roi_size: int = 7, num_cls_fcs: int = 1, num_reg_fcs: int = 3) -> None:
        super().__init__()
        c = channels
        self.attention = nn.MultiheadAttention(c, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(c)
        self.interaction = DynamicConv(c, dynamic_dim, roi_size)
        self.interaction_norm = nn.LayerNorm(c)
        self.ffn = nn.Sequential(nn.Linear(c, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, c))
        self.ffn_norm = nn.LayerNorm(c)
        self.cls_fcs, self.fc_cls = _linear_ln_relu(c, num_cls_fcs), nn.Linear(c, num_classes)
        self.reg_fcs, self.fc_reg = _linear_ln_relu(c, num_reg_fcs), nn.Linear(c, 4)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # sigmoid scores start near 0.01 so the many background proposals do not swamp the focal loss
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - 0.01) / 0.01))
        # no delta shared by every proposal before any training (mmdet's BBoxHead zeroes this bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, queries: Tensor, roi_feats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """queries: (B, N, C) proposal features; roi_feats: (B*N, C, r, r), image-major.

        Returns new proposal features (B, N, C), class logits (B, N, K), box deltas (B, N, 4) and the
        features after self-attention (B, N, C), which the mask head interacts with (as in QueryInst).
        """
        b, n, c = queries.shape
        attended = self.attention_norm(queries + self.attention(queries, queries, queries, need_weights=False)[0])
        x = attended.reshape(b * n, c)
        x = self.interaction_norm(x + self.interaction(x, roi_feats))
        x = self.ffn_norm(x + self.ffn(x))
        logits = self.fc_cls(self.cls_fcs(x)).view(b, n, -1)
        deltas = self.fc_reg(self.reg_fcs(x)).view(b, n, 4)
        return x.view(b, n, c), logits, deltas, attended


class DynamicMaskHead(nn.Module):
    """QueryInst's mask branch: dynamic interaction of the proposal feature with its 14x14 RoI features,
    ``num_convs`` 3x3 convs, a x2 deconvolution -> one class-agnostic 28x28 mask logit map per proposal.

    The reference's convs use BatchNorm; GroupNorm is used here so that a proposal's mask never depends on
    the other proposals or images in the batch (batched == per-image, train and eval alike). The reference
    also predicts one map per class and uses that of the matched (training) or predicted (inference) class;
    here one map serves every class, so a proposal's mask is one (28, 28) map as in the other query models.
    """

    def __init__(self, channels: int, dynamic_dim: int, mask_channels: int, num_convs: int) -> None:
        super().__init__()
        self.interaction = DynamicConv(channels, dynamic_dim)
        self.convs = nn.Sequential(*(ConvGNReLU(channels if i == 0 else mask_channels, mask_channels)
                                     for i in range(num_convs)))
        width = mask_channels if num_convs else channels
        self.upsample = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), nn.ReLU(inplace=True))
        self.logits = nn.Conv2d(width, 1, 1)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.logits.bias)

    def forward(self, queries: Tensor, roi_feats: Tensor) -> Tensor:
        """queries: (n, C); roi_feats: (n, C, r, r) -> mask logits (n, 2r, 2r)."""
        x = self.convs(self.interaction(queries, roi_feats))
        return self.logits(self.upsample(x))[:, 0]
