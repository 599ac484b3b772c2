"""Refinement of the kept saliency maps with the image itself (issue 20), before they are thresholded.

A saliency map comes from stride-32 C5 cells: upsampled bilinearly and thresholded, it is a blob that spills
over object edges and misses thin parts. Both refinements here pull the soft map toward the image's own edges,
working on one image's unpadded pixels (the resized network input, un-normalised), so batching and padding
never change a result:

- `superpixel`: Felzenszwalb-Huttenlocher graph segmentation of the image (scikit-image), then every segment
  takes the mean of the soft map inside it. Segments follow colour edges, so the thresholded map does too.
- `guided`: He et al.'s fast guided filter (kornia) of the soft map, with the image as the guide.

Shapes: K maps, (h, w) the working grid (see `RefineConfig.work_size`), (H, W) the original image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REFINE_METHODS = ("none", "superpixel", "guided")
# The settings that change each method's masks: only these are recorded, so an unused one cannot make two
# stores differ.
_METHOD_KEYS = {"none": (), "superpixel": ("downsample", "scale", "sigma", "min_size"),
                "guided": ("downsample", "radius", "eps")}


@dataclass(frozen=True)
class RefineConfig:
    """Every setting of the refinement; those of the chosen method are recorded in the store."""

    method: str = "none"  # "none" (the paper's generator), "superpixel" or "guided"
    downsample: int = 2  # superpixel: segment the resized image shrunk by this; guided: the filter's subsampling
    scale: float = 400.0  # superpixel: Felzenszwalb's k, larger gives larger segments
    sigma: float = 0.5  # superpixel: Gaussian pre-smoothing, in working pixels
    min_size: int = 100  # superpixel: smaller segments are merged into a neighbour, in working pixels
    radius: int = 64  # guided: window radius, in resized-image pixels
    eps: float = 0.01  # guided: regulariser on the local colour variance (colours in [0, 1])

    def __post_init__(self):
        if self.method not in REFINE_METHODS:
            raise ValueError(f"unknown refinement {self.method!r}: expected one of {', '.join(REFINE_METHODS)}")
        if self.downsample < 1 or self.radius < 1 or self.min_size < 1 or self.scale <= 0 or self.eps <= 0:
            raise ValueError(f"refinement settings out of range: {self}")

    def to_dict(self) -> dict:
        return {"method": self.method, **{key: getattr(self, key) for key in _METHOD_KEYS[self.method]}}

    def work_size(self, resized_hw: tuple[int, int]) -> tuple[int, int]:
        """The grid the soft maps are refined on: the resized image, shrunk for the segmentation."""
        if self.method == "superpixel":
            return tuple(max(1, round(side / self.downsample)) for side in resized_hw)
        return tuple(resized_hw)


def superpixel_means(maps: torch.Tensor, guide: torch.Tensor, cfg: RefineConfig) -> torch.Tensor:
    """Each Felzenszwalb segment of the guide gets the mean of each map inside it.

    maps: (K, h, w); guide: (3, h, w) in [0, 1]. Returns (K, h, w). The segmentation runs on the CPU
    (scikit-image); the means are one scatter-add for all K maps."""
    from skimage.segmentation import felzenszwalb

    segments = felzenszwalb(guide.permute(1, 2, 0).cpu().numpy(), scale=cfg.scale, sigma=cfg.sigma,
                            min_size=cfg.min_size, channel_axis=-1)
    label = torch.from_numpy(segments).to(maps.device).flatten()
    count = torch.bincount(label).to(maps.dtype)
    sums = maps.new_zeros(maps.shape[0], count.numel()).index_add_(1, label, maps.flatten(1))
    return (sums / count)[:, label].view_as(maps)


def guided_filter(maps: torch.Tensor, guide: torch.Tensor, cfg: RefineConfig) -> torch.Tensor:
    """The fast guided filter of each map with the colour guide. maps: (K, h, w); guide: (3, h, w) → (K, h, w).

    The K maps are filtered as K channels of one input: the guide's window statistics are computed once."""
    from kornia.filters import guided_blur

    return guided_blur(guide[None], maps[None], 2 * cfg.radius + 1, cfg.eps, subsample=cfg.downsample)[0]


REFINERS = {"superpixel": superpixel_means, "guided": guided_filter}


def refine_maps(maps: torch.Tensor, guide: torch.Tensor, image_hw: tuple[int, int], cfg: RefineConfig) -> torch.Tensor:
    """Refined soft maps at the original image size, ready for the mask threshold.

    maps: (K, h, w) soft maps on `cfg.work_size` of the resized image; guide: (3, Hr, Wr) the resized image
    in [0, 1] (`models.backbone.unnormalise` of its batch entry). Returns (K, H, W), bilinearly resampled from
    the working grid."""
    if maps.shape[0] == 0:  # nothing kept: skip the segmentation
        return maps.new_zeros(0, *image_hw)
    if guide.shape[-2:] != maps.shape[-2:]:
        guide = F.interpolate(guide[None], size=maps.shape[-2:], mode="area")[0]
    refined = REFINERS[cfg.method](maps, guide, cfg)
    return F.interpolate(refined[None], size=image_hw, mode="bilinear", align_corners=False)[0]
