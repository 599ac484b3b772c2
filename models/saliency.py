"""Seed-convolution saliency masks (paper §3.2), batched over images.

Every step works on a padded batch of stride-32 feature maps plus a per-image valid region, and is written
so that padding never changes a result: the output for an image equals the output for that image alone.

Shapes: B images, D channels, (h, w) the padded C5 grid, P = h * w positions, S seeds per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.mask_refinement import refine_maps
from models.settings import RefineConfig, SaliencyConfig


@dataclass
class Candidates:
    """The top candidates of each image, at C5 resolution, before upsampling.

    soft: (B, K, h, w) normalised similarity maps (0 outside the valid region); score: (B, K) score after
    NMS, -1 for empty slots; seed_feature: (B, K, D) unit seed vectors; seed: (B, K, 3) int (y, x, pool) of
    the seed on its pooled grid.
    """

    soft: torch.Tensor
    score: torch.Tensor
    seed_feature: torch.Tensor
    seed: torch.Tensor


def seed_grid(valid: torch.Tensor, pools: tuple[int, ...]):
    """The seeds: every cell of C5 average-pooled by each factor in `pools`.

    valid: (B, h, w) bool. Returns seed_valid (B, S) bool (pooling window fully inside the image, as
    per-image floor-mode pooling would give) and seed_pos (S, 3) int64 (y, x, pool). Seeds are ordered by
    (pool, y, x), so the valid seeds of an image keep the same relative order whatever the padding: this
    makes tie-breaking in the sorts below padding-independent.
    """
    flags, positions = [], []
    for pool in pools:
        full = F.avg_pool2d(valid[:, None].float(), pool)[:, 0] if pool > 1 else valid.float()
        flags.append(full.flatten(1) > 0.999)
        ys, xs = torch.meshgrid(torch.arange(full.shape[1]), torch.arange(full.shape[2]), indexing="ij")
        positions.append(torch.stack([ys.flatten(), xs.flatten(), torch.full_like(ys.flatten(), pool)], 1))
    return torch.cat(flags, 1), torch.cat(positions, 0).to(valid.device)


def seed_features(unit: torch.Tensor, seed_pos: torch.Tensor) -> torch.Tensor:
    """Unit seed vectors: L2-normalised mean of the unit features in each seed's window.

    unit: (B, D, h, w); seed_pos: (B, K, 3) (y, x, pool). Returns (B, K, D). Only the kept seeds need
    their vectors, so this gathers a handful of windows instead of pooling all of C5 at every scale."""
    out = unit.new_zeros(seed_pos.shape[0], seed_pos.shape[1], unit.shape[1])
    for b, k in torch.nonzero(seed_pos[..., 2] > 0).tolist():
        y, x, pool = seed_pos[b, k].tolist()
        out[b, k] = unit[b, :, y * pool:(y + 1) * pool, x * pool:(x + 1) * pool].mean((1, 2))
    return F.normalize(out, dim=-1)


def saliency_maps(features: torch.Tensor, valid: torch.Tensor, pools: tuple[int, ...] = (1, 2, 4)):
    """Similarity of every seed with every position (Eq. 3), min-max normalised per map (Eq. 4).

    features: (B, D, h, w) raw C5; valid: (B, h, w) bool.
    Returns soft (B, S, h, w) in [0, 1] (zero outside the valid region), seed_valid (B, S), seed_pos (S, 3)
    and the unit features (B, D, h, w).

    All scales come from one Gram matrix G = XᵀX of the unit features (one batched matmul, P x P instead of
    S x D x P): a pooled seed's similarity with x is the window mean of G[x, ·], and its squared norm is
    the window mean of G over the window's pairs.
    """
    b, _, h, w = features.shape
    unit = F.normalize(features.float(), dim=1)
    flat = unit.flatten(2)
    gram = torch.bmm(flat.transpose(1, 2), flat).view(b, h * w, h, w)  # [x, seed position]
    seed_valid, seed_pos = seed_grid(valid, pools)
    sims = []
    for pool in pools:
        pooled = F.avg_pool2d(gram, pool) if pool > 1 else gram  # (B, P, hs, ws): x · mean window
        hs, ws = pooled.shape[-2:]
        sim = pooled.flatten(2).transpose(1, 2)  # (B, S_pool, P)
        window = F.avg_pool2d(sim.reshape(b, hs * ws, h, w), pool) if pool > 1 else sim.view(b, -1, h, w)
        norm_sq = torch.diagonal(window.flatten(2), dim1=1, dim2=2)  # (B, S_pool): |mean window|^2
        sims.append(sim / norm_sq.clamp_min(1e-12).sqrt()[:, :, None])
    sim = torch.cat(sims, 1)
    inside = valid.flatten(1)[:, None, :]
    low = sim.masked_fill(~inside, float("inf")).amin(-1, keepdim=True)
    high = sim.masked_fill(~inside, float("-inf")).amax(-1, keepdim=True)
    soft = ((sim - low) / (high - low).clamp_min(1e-6)).masked_fill(~inside, 0.0)
    return soft.view(b, -1, h, w), seed_valid, seed_pos, unit


def mask_iou(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of binary masks by one matmul. masks: (B, K, P) float {0, 1} → (B, K, K)."""
    inter = torch.bmm(masks, masks.transpose(1, 2))
    area = masks.sum(-1)
    union = area[:, :, None] + area[:, None, :] - inter
    return inter / union.clamp_min(1.0)


def matrix_nms(iou: torch.Tensor, scores: torch.Tensor, sigma: float) -> torch.Tensor:
    """SOLOv2 Matrix NMS with a Gaussian kernel on candidates sorted by descending score.

    iou: (B, K, K); scores: (B, K). Returns decayed scores (B, K): each score times
    min over higher-ranked i of exp(-sigma * (iou_ij^2 - comp_i^2)), comp_i the max IoU of i with any
    mask ranked above it.
    """
    upper = iou.triu(1)
    comp = upper.amax(1)  # (B, K): for each i, its max IoU with higher-ranked masks
    decay = torch.exp(-sigma * (upper**2 - comp[:, :, None] ** 2))
    return scores * decay.amin(1).clamp(max=1.0)


def greedy_nms(iou: torch.Tensor, order_valid: torch.Tensor, threshold: float, max_keep: int) -> torch.Tensor:
    """Hard NMS on sorted candidates: keep a candidate if its IoU with every kept one is ≤ threshold.

    iou: (B, K, K); order_valid: (B, K) bool. Returns keep (B, K) bool. The scan is sequential by nature;
    it runs on the CPU on the small boolean overlap matrix and stops once max_keep are kept.
    """
    overlap = (iou > threshold).cpu()
    valid = order_valid.cpu()
    keep = torch.zeros_like(valid)
    for b in range(iou.shape[0]):
        suppressed = torch.zeros(iou.shape[1], dtype=torch.bool)
        kept = 0
        for k in range(iou.shape[1]):
            if not valid[b, k] or suppressed[k]:
                continue
            keep[b, k] = True
            kept += 1
            if kept == max_keep:
                break
            suppressed |= overlap[b, k]
    return keep.to(iou.device)


def _stable_desc(values: torch.Tensor) -> torch.Tensor:
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def select_candidates(features: torch.Tensor, valid: torch.Tensor, cfg: SaliencyConfig) -> Candidates:
    """Saliency maps → binary candidates → maskness → NMS → top `max_masks` per image.

    features: (B, D, h, w) C5; valid: (B, h, w) bool. The size and position filters need the image-size
    masks and are applied by the caller after upsampling (see `stages.gen_masks`).
    """
    soft, seed_valid, seed_pos, unit = saliency_maps(features, valid, cfg.seed_pools)
    b, s, h, w = soft.shape
    binary = (soft > cfg.threshold).flatten(2).float()  # (B, S, P)
    area = binary.sum(-1)
    maskness = (soft.flatten(2) * binary).sum(-1) / area.clamp_min(1.0)
    usable = seed_valid & (area >= cfg.min_cells)
    # Unusable candidates get score -1: they sort last and, ranked below every usable one, cannot decay it.
    maskness = maskness.masked_fill(~usable, -1.0)
    order = _stable_desc(maskness)
    sorted_score = maskness.gather(1, order)
    sorted_valid = usable.gather(1, order)
    # Only the usable candidates (sorted first) have masks, the others' IoU is 0: the IoU matmul runs on those
    # alone, about half the work where padding adds seeds (portrait and landscape images in one batch).
    u = int(sorted_valid.sum(1).max())  # the most usable candidates of an image
    sorted_binary = binary.gather(1, order[:, :u, None].expand(-1, -1, h * w)) * sorted_valid[:, :u, None]
    iou = binary.new_zeros(b, s, s)
    iou[:, :u, :u] = mask_iou(sorted_binary)
    if cfg.nms == "matrix":
        score = matrix_nms(iou, sorted_score, cfg.matrix_sigma).masked_fill(~sorted_valid, -1.0)
    elif cfg.nms == "greedy":
        keep = greedy_nms(iou, sorted_valid, cfg.iou_threshold, cfg.max_masks)
        score = sorted_score.masked_fill(~keep, -1.0)
    else:
        raise ValueError(f"unknown nms {cfg.nms!r}: expected 'matrix' or 'greedy'")
    best = _stable_desc(score)[:, : min(cfg.max_masks, s)]
    top = order.gather(1, best)  # seed indices of the best candidates after NMS
    top_score = score.gather(1, best)
    seed = seed_pos[top]
    return Candidates(
        soft=soft.gather(1, top[:, :, None, None].expand(-1, -1, h, w)),
        score=top_score,
        seed_feature=seed_features(unit, seed.masked_fill((top_score < 0)[:, :, None], 0)),
        seed=seed,
    )


def upsample_to_image(soft: torch.Tensor, grid_hw: tuple[int, int], resized_hw: tuple[int, int],
                      image_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of C5 maps of one image straight to its original size, in one sampling step.

    soft: (K, h, w) maps on the padded grid; grid_hw: the image's valid C5 cells; resized_hw: the size the
    backbone saw; image_hw: the original size. C5 cell (i, j) covers resized pixels [32i, 32i + 32), so the
    centre of original pixel y lies at C5 coordinate (y + 0.5) * Hr / H / 32 - 0.5. Returns (K, H, W).
    """
    (gh, gw), (rh, rw), (height, width) = grid_hw, resized_hw, image_hw
    maps = soft[:, :gh, :gw][None]
    dev = soft.device
    # grid_sample (align_corners=False) expects x_norm = 2 * (coord + 0.5) / size - 1, coord in cells.
    ys = (torch.arange(height, device=dev) + 0.5) * (rh / height) / 32.0 * (2.0 / gh) - 1.0
    xs = (torch.arange(width, device=dev) + 0.5) * (rw / width) / 32.0 * (2.0 / gw) - 1.0
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1)[None]
    return F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)[0]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of binary masks. masks: (K, H, W) bool → (K, 4) float32 xyxy, x2/y2 exclusive (so that
    x2 - x1 is the COCO width); empty masks give zeros."""
    rows, cols = (masks.view(torch.uint8).amax(dim).bool() for dim in (2, 1))  # on CPU many times faster than any()
    h, w = masks.shape[1:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, h).amin(1)
    y2 = torch.where(rows, ar_h + 1, 0).amax(1)
    x1 = torch.where(cols, ar_w, w).amin(1)
    x2 = torch.where(cols, ar_w + 1, 0).amax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return boxes * rows.any(1, keepdim=True)


def kept_maps(cand: Candidates, grid_hw: list[tuple[int, int]], resized_hw: list[tuple[int, int]],
              cfg: SaliencyConfig, refine: RefineConfig = RefineConfig(), images: torch.Tensor | None = None,
              segments: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The candidates of each image of a batch that pass the score filter, as soft maps for `image_masks`:
    the batched device part of the final masks, before the per-image part at the original size.

    grid_hw, resized_hw: per image, its valid C5 cells and the size the backbone saw; images: (B, 3, Hp, Wp)
    the normalised batch (guided refinement); segments: per image, its `superpixels` labels (superpixel).
    Returns per image the kept slots (K,) long and their maps: (K, h, w) on the padded C5 grid, or, refined,
    (K, h', w') on `refine.work_size` of the image.
    """
    slots = [torch.nonzero(score >= cfg.min_score).flatten() for score in cand.score]
    maps = [soft[kept] for soft, kept in zip(cand.soft, slots)]
    if refine.method != "none":
        work = [upsample_to_image(m, g, r, refine.work_size(r)) for m, g, r in zip(maps, grid_hw, resized_hw)]
        maps = refine_maps(work, refine, images, resized_hw, segments)
    return slots, maps


def image_masks(soft: torch.Tensor, grid_hw: tuple[int, int], resized_hw: tuple[int, int],
                image_hw: tuple[int, int], cfg: SaliencyConfig, mask_threshold: float = 0.5, refined: bool = False):
    """Final masks of one image: resample its kept soft maps (`kept_maps`) to the original size, from the C5
    grid or, if `refined`, bilinearly from the refinement's working grid; binarise; apply the filters.

    soft: (K, h, w). Returns keep (K',) long indices into soft's maps, masks (K', H, W) bool and boxes (K', 4)
    xyxy.
    """
    if refined:
        soft = F.interpolate(soft[:, None], size=image_hw, mode="bilinear", align_corners=False)[:, 0]
    else:
        soft = upsample_to_image(soft, grid_hw, resized_hw, image_hw)
    masks = soft > mask_threshold
    boxes = mask_boxes(masks)
    height, width = image_hw
    rows = masks.sum(2, dtype=torch.float32)  # (K, H) row projection: its centre of mass is the mask's centre
    area = rows.sum(1)
    centre_y = (rows * (torch.arange(height, device=rows.device) + 0.5)).sum(1) / area.clamp_min(1.0)
    keep = torch.nonzero((area > 0) & (boxes[:, 2] - boxes[:, 0] < cfg.max_width_frac * width) & (
        centre_y > cfg.min_center_y_frac * height)).flatten()
    return keep, masks[keep], boxes[keep]
