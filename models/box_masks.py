"""Masks that live in boxes (an M x M grid stretched over each box): crop full-image masks into their boxes
(the mask-head targets) and paste box masks back into an image (inference), as mmdet's BitmapMasks
``crop_and_resize`` and ``_do_paste_mask`` do.

Both use the same continuous convention: box (x1, y1, x2, y2) in pixels with exclusive x2/y2, mask cell
(i, j) covers [x1 + j (x2-x1)/M, x1 + (j+1) (x2-x1)/M) x the same in y, pixels are sampled at their centres.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align


def crop_masks_to_boxes(masks: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Binary targets (K, size, size) float: masks[k] (K, H, W) RoIAligned into boxes[k] (K, 4) xyxy pixels,
    averaged over adaptive sample points and thresholded at 0.5.

    A box reaching beyond the masks is not clipped first (mmdet's mask_target clips it): the predicted mask
    covers the whole box, in its RoI features and when pasted, so its target does too (empty outside)."""
    if len(masks) == 0:
        return masks.new_zeros(0, size, size, dtype=torch.float32)
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    soft = roi_align(masks[:, None].float(), rois.float(), size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (soft[:, 0] >= 0.5).float()


def _interpolation_weights(lo: Tensor, hi: Tensor, cells: int, pixels: int) -> Tensor:
    """(K, pixels, cells) bilinear weights along one axis: pixel p (centre p + 0.5) samples the box grid at
    cell coordinate (p + 0.5 - lo) / (hi - lo) * cells - 0.5; cells outside the grid count as 0."""
    centres = torch.arange(pixels, device=lo.device, dtype=lo.dtype) + 0.5
    pos = (centres[None, :] - lo[:, None]) / (hi - lo).clamp_min(1e-6)[:, None] * cells - 0.5
    grid = torch.arange(cells, device=lo.device, dtype=lo.dtype)
    return (1 - (pos[:, :, None] - grid).abs()).clamp_min(0)


def paste_masks_in_boxes(probs: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Box masks (K, M, M) pasted into an image of ``size`` (h, w) at boxes (K, 4) xyxy -> (K, h, w).

    Bilinear sampling with zero padding (``grid_sample(align_corners=False)`` of the reference) is separable,
    so it is computed as W_y @ mask @ W_x^T: memory O(K (h + w) M) instead of a (K, h, w, 2) sampling grid.
    """
    m = probs.shape[-1]
    probs, boxes = probs.float(), boxes.float()
    wy = _interpolation_weights(boxes[:, 1], boxes[:, 3], m, size[0])
    wx = _interpolation_weights(boxes[:, 0], boxes[:, 2], m, size[1])
    return wy @ probs @ wx.transpose(1, 2)
