"""K-Net for instance segmentation (Zhang et al. 2021), with an optional hook for Saliency Prompts.

ResNet -> FPN -> semantic fusion at stride 8 -> an RPN-like stage whose N learned 1x1 kernels give
initial masks and image-conditioned kernels -> S kernel-update stages, each refining the kernels from the
features under the previous masks and predicting classes and new masks (reference-facts.md §5).

Shapes: B images of (H, W) (multiples of 32), N kernels, C channels, K classes; masks are predicted at
stride 8, (H/8, W/8), and returned upsampled x2 to stride 4, (H/4, W/4), where the losses are computed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone import build_backbone
from models.fpn import FPN, ConvGNReLU, SemanticFusion
from models.losses import knet_losses
from models.query_model import PromptFn, query_instances
from models.settings import KNetConfig


def _upsample2(masks: Tensor) -> Tensor:
    return F.interpolate(masks, scale_factor=2, mode="bilinear", align_corners=False)


def mask_sum_pool(mask_logits: Tensor, feats: Tensor) -> Tensor:
    """Sum of ``feats`` over the pixels where sigmoid(mask) > 0.5 -> (B, N, C).

    mask_logits: (B, N, h', w') (resized to the features first); feats: (B, C, h, w). The hard mask passes
    no gradient to the masks and the pool is a sum, not a mean, as in the reference.
    """
    if mask_logits.shape[-2:] != feats.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=feats.shape[-2:], mode="bilinear", align_corners=False)
    hard = (mask_logits.sigmoid() > 0.5).to(feats.dtype)
    return torch.einsum("bnhw,bchw->bnc", hard, feats)


class RPNStage(nn.Module):
    """Initial masks and kernels from N learned 1x1 kernels, and the semantic head (K-Net's ConvKernelHead)."""

    def __init__(self, channels: int, num_kernels: int, num_classes: int) -> None:
        super().__init__()
        self.loc_conv = ConvGNReLU(channels, channels, 1)
        self.sem_conv = ConvGNReLU(channels, channels, 1)
        self.init_kernels = nn.Conv2d(channels, num_kernels, 1, bias=False)
        # std 1 (not the usual 0.01): the initial masks must already split pixels at the 0.5 threshold
        nn.init.normal_(self.init_kernels.weight, 0.0, 1.0)
        # per-pixel class scores on the semantic features; its focal loss is a dense foreground signal into the
        # features every update stage pools from (prior 0.01, as the classifiers)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.constant_(self.conv_seg.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, loc: Tensor, sem: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """loc, sem: (B, C, h, w) -> masks (B, N, h, w) logits, kernels (B, N, C), x_feats (B, C, h, w) and
        semantic logits (B, K, h, w)."""
        loc = self.loc_conv(loc)
        sem = self.sem_conv(sem)
        x = sem + loc
        masks = self.init_kernels(loc)
        kernels = self.init_kernels.weight.flatten(1)[None] + mask_sum_pool(masks, x)
        return masks, kernels, x, self.conv_seg(sem)


class KernelUpdator(nn.Module):
    """Gated fusion of the mask-pooled group features f into the kernels K (reference-facts §5 step 3)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.from_feats = nn.Linear(c, 2 * c)  # -> (f_in, f_out)
        self.from_kernels = nn.Linear(c, 2 * c)  # -> (k_in, k_out)
        self.kernel_gate = nn.Linear(c, c)
        self.feat_gate = nn.Linear(c, c)
        self.kernel_gate_norm, self.feat_gate_norm = nn.LayerNorm(c), nn.LayerNorm(c)
        self.kernel_out_norm, self.feat_out_norm = nn.LayerNorm(c), nn.LayerNorm(c)
        self.out = nn.Sequential(nn.Linear(c, c), nn.LayerNorm(c), nn.ReLU(inplace=True))

    def forward(self, feats: Tensor, kernels: Tensor) -> Tensor:
        """feats, kernels: (B, N, C) -> updated kernels (B, N, C)."""
        f_in, f_out = self.from_feats(feats).chunk(2, dim=-1)
        k_in, k_out = self.from_kernels(kernels).chunk(2, dim=-1)
        g = f_in * k_in
        gate_k = self.kernel_gate_norm(self.kernel_gate(g)).sigmoid()
        gate_f = self.feat_gate_norm(self.feat_gate(g)).sigmoid()
        return self.out(gate_f * self.feat_out_norm(f_out) + gate_k * self.kernel_out_norm(k_out))


class KernelUpdateHead(nn.Module):
    """One update stage: pool features under the masks, update the kernels, predict classes and masks."""

    def __init__(self, channels: int, num_classes: int, ffn_dim: int, num_heads: int) -> None:
        super().__init__()
        c = channels
        self.feat_transform = nn.Conv2d(c, c, 1)
        self.updator = KernelUpdator(c)
        self.attention = nn.MultiheadAttention(c, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(c)
        self.ffn = nn.Sequential(nn.Linear(c, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, c))
        self.ffn_norm = nn.LayerNorm(c)
        self.cls_branch = nn.Sequential(nn.Linear(c, c, bias=False), nn.LayerNorm(c), nn.ReLU(inplace=True))
        self.fc_cls = nn.Linear(c, num_classes)
        self.mask_branch = nn.Sequential(nn.Linear(c, c), nn.LayerNorm(c), nn.ReLU(inplace=True))
        self.fc_mask = nn.Linear(c, c)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # sigmoid scores start near 0.01 so the many background kernels do not swamp the focal loss
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, x: Tensor, kernels: Tensor, mask_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, C, h, w) stride-8 features; kernels: (B, N, C); mask_logits: (B, N, h, w) of the last stage.

        Returns new kernels (B, N, C), class logits (B, N, K) and mask logits (B, N, h, w).
        """
        x = self.feat_transform(x)
        k = self.updator(mask_sum_pool(mask_logits, x), kernels)
        k = self.attention_norm(k + self.attention(k, k, k, need_weights=False)[0])
        k = self.ffn_norm(k + self.ffn(k))
        logits = self.fc_cls(self.cls_branch(k))
        dynamic = self.fc_mask(self.mask_branch(k))  # one 1x1 conv filter per kernel
        masks = torch.einsum("bnc,bchw->bnhw", dynamic, x)
        return k, logits, masks


class KNet(nn.Module):
    """Backbone + FPN + fusion + RPN stage + ``num_stages`` unshared update stages, following the
    query-model contract of ``models.query_model`` (its queries are the kernels)."""

    def __init__(self, cfg: KNetConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.fpn = FPN(backbone.channels, cfg.channels)
        self.fusion = SemanticFusion(cfg.channels)
        self.rpn = RPNStage(cfg.channels, cfg.num_kernels, cfg.num_classes)
        self.stages = nn.ModuleList(
            KernelUpdateHead(cfg.channels, cfg.num_classes, cfg.ffn_dim, cfg.num_heads)
            for _ in range(cfg.num_stages))

    def forward(self, images: Tensor, prompt_fn: PromptFn | None = None
                ) -> tuple[list[dict[str, Tensor | None]], dict[str, Tensor]]:
        """images: (B, 3, H, W) normalised, H and W multiples of 32.

        prompt_fn(kernels (B, N, C), feats) -> (B, N, C) is applied once to the RPN-stage kernels before
        the first update stage (the Saliency Prompt injection point); the RPN stage's own outputs, and
        the masks the first update stage pools with, stay unprompted.

        Returns:
            stages: 1 + num_stages dicts (RPN stage first) with 'masks' (B, N, H/4, W/4) logits,
                'logits' (B, N, K) and 'queries' (B, N, C), the stage's output kernels (both None for the
                RPN stage: it has no classes, and kernel supervision runs on the update stages only); the RPN
                stage's dict also has 'seg' (B, K, H/4, W/4), the semantic head's per-pixel class logits.
            feats: {'p2'..'p5'} FPN maps, (B, C, H/s, W/s) for s = 4..32.
        """
        pyramid = self.fpn(self.backbone(images))
        masks, kernels, x, seg = self.rpn(*self.fusion(pyramid))
        stages: list[dict[str, Tensor | None]] = [
            dict(masks=_upsample2(masks), logits=None, queries=None, seg=_upsample2(seg))]
        if prompt_fn is not None:
            kernels = prompt_fn(kernels, pyramid)
        for head in self.stages:
            kernels, logits, masks = head(x, kernels, masks)
            stages.append(dict(masks=_upsample2(masks), logits=logits, queries=kernels))
        return stages, pyramid

    def losses(self, stages: list[dict], targets: list[dict]) -> tuple[dict[str, Tensor], list]:
        """``models.losses.knet_losses`` (focal / Dice / BCE per stage, the semantic focal loss, K-Net's
        matching)."""
        return knet_losses(stages, targets)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: Sequence[tuple[int, int]],
                orig_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Instances of each image from the last stage (top-k over kernels x classes, no NMS; with
        ``mask_quality_score``, each score times its mask's quality and re-sorted).

        images: (B, 3, H, W) padded batch; image_sizes[b] = (h, w) valid region of image b in it;
        orig_sizes[b] = (h0, w0) size to return masks at.
        Returns per image dict(scores (k,), labels (k,) long, masks (k, h0, w0) bool, boxes (k, 4) xyxy
        float with exclusive x2/y2), k = min(max_per_image, N * K), sorted by decreasing score.
        """
        last = self(images)[0][-1]
        return [query_instances(last["logits"][b].sigmoid(), last["masks"][b].sigmoid(), images.shape[-2:], valid,
                                orig, self.cfg.max_per_image, self.cfg.mask_threshold_test, maps_are_logits=False,
                                quality_score=self.cfg.mask_quality_score)
                for b, (valid, orig) in enumerate(zip(image_sizes, orig_sizes))]


def build_knet(cfg: KNetConfig, backbone_weights: Path | None = None) -> KNet:
    """K-Net with a ResNet backbone from a local checkpoint (``None``: random, with a loud warning)."""
    backbone = build_backbone(cfg.backbone, backbone_weights, out_levels=("c2", "c3", "c4", "c5"),
                              frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval)
    return KNet(cfg, backbone)
