"""Refinement of the kept saliency maps with the image itself (issue 20), before they are thresholded.

A saliency map comes from stride-32 C5 cells: upsampled bilinearly and thresholded, it is a blob that spills
over object edges and misses thin parts. Both refinements here pull the soft map toward the image's own edges,
working on one image's unpadded pixels (the resized network input, un-normalised), so batching and padding
never change a result:

- `superpixel`: Felzenszwalb-Huttenlocher graph segmentation of the image (scikit-image), then every segment
  takes the mean of the soft map inside it. Segments follow colour edges, so the thresholded map does too.
  The segments depend on the image alone: `superpixels` runs in the DataLoader workers with the decoding, and
  the device only takes the means (`segment_means`, batched over the images and maps of a batch).
- `guided`: He et al.'s fast guided filter (kornia) of the soft map, with the image as the guide.

Shapes: K maps, (h, w) the working grid (see `RefineConfig.work_size`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.backbone import unnormalise
from models.settings import RefineConfig


def superpixels(image: torch.Tensor, cfg: RefineConfig) -> torch.Tensor:
    """Felzenszwalb segments of one network input on its working grid: (3, Hr, Wr) ImageNet-normalised →
    (h, w) int64 labels 0..n-1, h, w = `cfg.work_size((Hr, Wr))`. CPU work (scikit-image) that depends on the
    image alone: the DataLoader workers run it (`stages.image_data.ImageFolder`)."""
    from skimage.segmentation import felzenszwalb

    guide = unnormalise(image, *image.shape[-2:])
    work = cfg.work_size(guide.shape[-2:])
    if work != tuple(guide.shape[-2:]):
        guide = F.interpolate(guide[None], size=work, mode="area")[0]
    return torch.from_numpy(felzenszwalb(guide.permute(1, 2, 0).numpy(), scale=cfg.scale, sigma=cfg.sigma,
                                         min_size=cfg.min_size, channel_axis=-1))


def segment_means(maps: list[torch.Tensor], segments: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every map takes, in each segment of its image, its mean inside that segment.

    maps: per image (K, h, w) on its working grid; segments: per image (h, w) int64 labels 0..n-1 (`superpixels`),
    on the maps' device. Returns the maps' shapes. All maps of all images in one index_add: each (image, map,
    segment) has its own slot of the sums, image i's map k segment s at offset_i + k * n_i + s."""
    counts = [torch.bincount(seg.flatten()) for seg in segments]
    slots, offset = [], 0
    for m, seg, count in zip(maps, segments, counts):
        rows = torch.arange(m.shape[0], device=m.device)[:, None] * len(count)
        slots.append((offset + rows + seg.flatten()).flatten())
        offset += m.shape[0] * len(count)
    slot = torch.cat(slots)
    values = torch.cat([m.flatten() for m in maps])
    sums = values.new_zeros(offset).index_add_(0, slot, values)
    sizes = torch.cat([count.repeat(m.shape[0]) for m, count in zip(maps, counts)]).to(values.dtype)
    means = (sums / sizes).index_select(0, slot).split([m.numel() for m in maps])  # faster than [slot] on CPU
    return [mean.view_as(m) for mean, m in zip(means, maps)]


def guided_filter(maps: torch.Tensor, guide: torch.Tensor, cfg: RefineConfig) -> torch.Tensor:
    """The fast guided filter of each map with the colour guide. maps: (K, h, w); guide: (3, h, w) → (K, h, w).

    The K maps are filtered as K channels of one input: the guide's window statistics are computed once."""
    from kornia.filters import guided_blur

    return guided_blur(guide[None], maps[None], 2 * cfg.radius + 1, cfg.eps, subsample=cfg.downsample)[0]


def refine_maps(maps: list[torch.Tensor], cfg: RefineConfig, images: torch.Tensor, resized_hw: list[tuple[int, int]],
                segments: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The refined soft maps of a batch's images, on their working grids (resampled to the original size and
    thresholded by `models.saliency.image_masks`).

    maps: per image (K, h, w) on `cfg.work_size` of its resized image; images: (B, 3, Hp, Wp) the normalised
    padded batch, on the maps' device, and resized_hw each image's own region (guided); segments: per image
    (h, w) labels from `superpixels` (superpixel). Returns the maps' shapes."""
    if cfg.method == "superpixel":
        return segment_means(maps, segments)
    return [guided_filter(m, unnormalise(image, *hw), cfg) if len(m) else m  # kornia refuses 0 channels
            for m, image, hw in zip(maps, images, resized_hw)]
