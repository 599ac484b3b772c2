"""The interface every query-based model (K-Net, Mask2Former, QueryInst) implements, so that Saliency Prompt
pre-training, fine-tuning, evaluation and prediction never fork per model (``models.build`` is the one place
that names the models).

A model's config is a dataclass with at least backbone, num_classes, channels (C), its number of queries,
frozen_stages, norm_eval, mask_threshold_test and max_per_image, and a ``small(**overrides)`` classmethod
giving a CPU-sized model (never forcing a backbone). Each model module has ``build_<model>(cfg,
backbone_weights)``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from models.saliency import mask_boxes

PromptFn = Callable[[Tensor, Mapping[str, Tensor]], Tensor]
Assignments = list[list[tuple[Tensor, Tensor]]]


class QueryModel(Protocol):
    cfg: object

    def __call__(self, images: Tensor, prompt_fn: PromptFn | None = None
                 ) -> tuple[list[dict[str, Tensor | None]], dict[str, Tensor]]:
        """images: (B, 3, H, W) ImageNet-normalised, H and W multiples of 32 (zero padding).

        prompt_fn(queries (B, N, C), feats) -> (B, N, C) is called exactly once, on the initial query
        features, before the first decoder layer / dynamic stage / kernel-update stage (paper Eq. 8).
        Returns stages, one dict per supervised prediction step with at least 'logits' (B, N, K) or (for a
        softmax classifier with a no-object column) (B, N, K + 1), or None for a step without classes, and
        'queries' (B, N, C), the query features after that step or None where kernel supervision (Eq. 9)
        must not apply; and feats with at least 'p5' (B, C, H/32, W/32), where prompts are pooled from.
        """

    def losses(self, stages: list[dict], targets: list[dict]) -> tuple[dict[str, Tensor], Assignments]:
        """targets: per image dict(masks (L, H/4, W/4) float in {0, 1}, full_masks (L, H, W) bool, boxes
        (L, 4) xyxy input pixels (exclusive x2/y2), labels (L,) long); L may be 0.
        Returns (named scalars already weighted, whose sum is the training loss; assignments[s][b] =
        (pred_idx, gt_idx), int64 CPU tensors: the Hungarian pairs stage s of image b was supervised with)."""

    def predict(self, images: Tensor, image_sizes: Sequence[tuple[int, int]],
                orig_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per image dict(scores (k,), labels (k,) long in 0..K-1, masks (k, h0, w0) bool, boxes (k, 4) xyxy
        exclusive x2/y2) sorted by decreasing score, k <= cfg.max_per_image; masks at orig_sizes[b] of the
        valid region image_sizes[b] of the padded batch."""


def maps_at_image_size(maps: Tensor, index: Tensor, padded_hw: Sequence[int], valid_hw: Sequence[int],
                       orig_hw: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The maps that `index` selects, as the original image sees them: resized (bilinear) to the padded input,
    cropped to the image's valid region, resized to its original size.

    maps: (N, h', w') per-query maps; index: (k,) queries chosen by a top-k over queries x classes, which
    repeats a query once per class it scores in. Each distinct query is resized once: returns (distinct maps
    (U, h0, w0), inverse (k,)) with maps[index] at image size == distinct[inverse].
    """
    distinct, inverse = index.unique(return_inverse=True)
    resized = F.interpolate(maps[distinct][None].float(), size=tuple(padded_hw), mode="bilinear", align_corners=False)
    h, w = valid_hw
    resized = F.interpolate(resized[..., :h, :w], size=tuple(orig_hw), mode="bilinear", align_corners=False)[0]
    return resized, inverse


def mask_quality(probs: Tensor, masks: Tensor) -> Tensor:
    """Mean probability inside each binary mask, (U, h, w) probabilities and masks -> (U,): Mask2Former's
    mask score, which multiplies the class score so that confident, well-delimited masks rank first."""
    return (probs * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)


def query_instances(class_scores: Tensor, maps: Tensor, padded_hw: Sequence[int], valid_hw: Sequence[int],
                    orig_hw: Sequence[int], max_per_image: int, mask_threshold: float, maps_are_logits: bool,
                    quality_score: bool) -> dict[str, Tensor]:
    """One image's instances from its queries' class scores and mask maps (the last stage of K-Net or
    Mask2Former): top-k over queries x classes (no NMS), masks at the original image size thresholded at
    `mask_threshold`, and with `quality_score` each score times its mask's quality (`mask_quality`), re-sorted.

    class_scores: (N, K) probabilities (K-Net: sigmoid; Mask2Former: softmax without the no-object column);
    maps: (N, h', w') mask probabilities, or logits when `maps_are_logits` (the sigmoid then follows the
    resizing, Mask2Former's order; K-Net resizes probabilities). Returns dict(scores (k,), labels (k,) long,
    masks (k, h0, w0) bool, boxes (k, 4) xyxy exclusive x2/y2), k = min(max_per_image, N * K), sorted by
    decreasing score.
    """
    num_classes = class_scores.shape[-1]
    k = min(max_per_image, class_scores.numel())
    scores, idx = class_scores.flatten().topk(k)
    labels, query = idx % num_classes, idx // num_classes
    probs, inverse = maps_at_image_size(maps, query, padded_hw, valid_hw, orig_hw)
    if maps_are_logits:
        probs = probs.sigmoid()
    masks = probs > mask_threshold  # one per distinct query
    order = torch.arange(k, device=scores.device)
    if quality_score:
        scores, order = (scores * mask_quality(probs, masks)[inverse]).sort(descending=True)
    chosen = inverse[order]
    return dict(scores=scores, labels=labels[order], masks=masks[chosen], boxes=mask_boxes(masks)[chosen])
