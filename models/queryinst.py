"""QueryInst for instance segmentation (Fang et al. 2021), on Sparse R-CNN (Sun et al. 2021), with the Saliency
Prompt hook of the query-model contract (issue 11).

ResNet -> FPN P2..P5 -> N learnable proposal boxes (normalised cxcywh, initially the whole image) and N learnable
proposal features (the queries) -> S dynamic stages. Each stage pools 7x7 RoI features of every box from the
FPN level its size selects, lets the proposal features attend to each other, interact with their own RoI
features through generated 1x1 convs (DIIHead), and predicts class logits and box deltas; boxes are refined
and detached between stages, features pass on with gradients. In parallel, the mask head interacts the same
(post-attention) query with 14x14 RoI features of the refined box and predicts a 28x28 mask in it.

Shapes: B images of (H, W) (multiples of 32), N proposals, C channels, K classes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import MultiScaleRoIAlign, box_convert, clip_boxes_to_image

from models.backbone import build_backbone
from models.box_masks import paste_masks_in_boxes
from models.dynamic_heads import DIIHead, DynamicMaskHead
from models.fpn import FPN
from models.queryinst_losses import queryinst_losses
from models.settings import QueryInstConfig

PromptFn = Callable[[Tensor, Mapping[str, Tensor]], Tensor]
LEVELS = ("p2", "p3", "p4", "p5")
BOX_ROI, MASK_ROI = 7, 14  # RoI grids of the box and mask branches; masks come out at 2 * MASK_ROI


class QueryInst(nn.Module):
    """Backbone + FPN + learnable proposals + ``num_stages`` unshared (DIIHead, DynamicMaskHead) stages."""

    def __init__(self, cfg: QueryInstConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.fpn = FPN(backbone.channels, cfg.channels)
        self.proposal_boxes = nn.Embedding(cfg.num_proposals, 4)
        nn.init.constant_(self.proposal_boxes.weight[:, :2], 0.5)  # centred, image-sized (cxcywh / image size)
        nn.init.constant_(self.proposal_boxes.weight[:, 2:], 1.0)
        self.proposal_features = nn.Embedding(cfg.num_proposals, cfg.channels)  # N(0, 1), as the reference
        # mmdet's level rule floor(log2(sqrt(wh) / 56)) is torchvision's floor(4 + log2(sqrt(wh) / 224)) - 2
        self.box_pooler = MultiScaleRoIAlign(list(LEVELS), BOX_ROI, sampling_ratio=2)
        self.mask_pooler = MultiScaleRoIAlign(list(LEVELS), MASK_ROI, sampling_ratio=2)
        self.box_coder = BoxCoder(weights=(2.0, 2.0, 1.0, 1.0))  # mmdet's target_stds (0.5, 0.5, 1, 1)
        self.heads = nn.ModuleList(
            DIIHead(cfg.channels, cfg.num_classes, cfg.dynamic_dim, cfg.ffn_dim, cfg.num_heads, BOX_ROI)
            for _ in range(cfg.num_stages))
        self.mask_heads = nn.ModuleList(
            DynamicMaskHead(cfg.channels, cfg.dynamic_dim, cfg.mask_channels, cfg.mask_convs)
            for _ in range(cfg.num_stages))

    def forward(self, images: Tensor, prompt_fn: PromptFn | None = None
                ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """images: (B, 3, H, W) normalised, H and W multiples of 32.

        prompt_fn(queries (B, N, C), feats) -> (B, N, C) is applied once to the initial proposal features
        (the Saliency Prompt injection point); the proposal boxes are untouched, as in the reference.

        Returns:
            stages: num_stages dicts with 'logits' (B, N, K), 'queries' (B, N, C) proposal features after the
                stage, 'boxes' (B, N, 4) refined xyxy boxes in input pixels (gradient to this stage's deltas
                only) and 'masks' (B, N, 28, 28) mask logits inside each (detached) refined box.
            feats: {'p2'..'p5'} FPN maps, (B, C, H/s, W/s) for s = 4..32.
        """
        pyramid = self.fpn(self.backbone(images))
        b, _, h, w = images.shape
        n, c = self.cfg.num_proposals, self.cfg.channels
        shapes = [(h, w)] * b
        boxes = box_convert(self.proposal_boxes.weight, "cxcywh", "xyxy") * images.new_tensor([w, h, w, h])
        boxes = boxes[None].expand(b, n, 4)
        queries = self.proposal_features.weight[None].expand(b, n, c)
        if prompt_fn is not None:
            queries = prompt_fn(queries, pyramid)
        stages = []
        for head, mask_head in zip(self.heads, self.mask_heads):
            roi_feats = self.box_pooler(pyramid, list(boxes.detach()), shapes)
            queries, logits, deltas, attended = head(queries, roi_feats)
            # the first stage's boxes keep their gradient to the learnable proposal boxes (as the reference)
            # in float32 even under autocast: bfloat16 box corners would be off by pixels at 1000 px
            boxes = self.box_coder.decode_single(deltas.float().reshape(b * n, 4),
                                                 boxes.float().reshape(b * n, 4)).view(b, n, 4)
            roi_feats = self.mask_pooler(pyramid, list(boxes.detach()), shapes)
            masks = mask_head(attended.reshape(b * n, c), roi_feats).view(b, n, 2 * MASK_ROI, 2 * MASK_ROI)
            stages.append(dict(logits=logits, queries=queries, boxes=boxes, masks=masks))
            boxes = boxes.detach()
        return stages, pyramid

    def losses(self, stages: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]
               ) -> tuple[dict[str, Tensor], list[list[tuple[Tensor, Tensor]]]]:
        """Per-stage Hungarian matching and weighted losses, see :func:`models.queryinst_losses.queryinst_losses`."""
        return queryinst_losses(stages, targets)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: Sequence[tuple[int, int]],
                orig_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Instances of each image from the last stage (top-k over proposals x classes, no NMS).

        images: (B, 3, H, W) padded batch; image_sizes[b] = (h, w) valid region of image b in it;
        orig_sizes[b] = (h0, w0) size to return masks and boxes at.
        Returns per image dict(scores (k,), labels (k,) long, masks (k, h0, w0) bool: the 28x28 masks pasted
        into their boxes, boxes (k, 4) xyxy float in original pixels, clipped to the image), k = min(max_per_image,
        N * K), sorted by decreasing score.
        """
        last = self(images)[0][-1]
        num_classes = last["logits"].shape[-1]
        results = []
        for b, ((h, w), (h0, w0)) in enumerate(zip(image_sizes, orig_sizes)):
            scores = last["logits"][b].float().sigmoid().flatten()
            k = min(self.cfg.max_per_image, scores.numel())
            scores, idx = scores.topk(k)
            labels, proposal = idx % num_classes, idx // num_classes
            scale = images.new_tensor([w0 / w, h0 / h, w0 / w, h0 / h])
            boxes = last["boxes"][b, proposal].float() * scale
            probs = paste_masks_in_boxes(last["masks"][b, proposal].float().sigmoid(), boxes, (h0, w0))
            results.append(dict(scores=scores, labels=labels, masks=probs > self.cfg.mask_threshold_test,
                                boxes=clip_boxes_to_image(boxes, (h0, w0))))
        return results


def build_queryinst(cfg: QueryInstConfig, backbone_weights: Path | None = None) -> QueryInst:
    """QueryInst with a backbone from a local checkpoint (``None``: random, with a loud warning)."""
    backbone = build_backbone(cfg.backbone, backbone_weights, out_levels=("c2", "c3", "c4", "c5"),
                              frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval)
    return QueryInst(cfg, backbone)
