import pytest
import torch

from models.mask_refinement import RefineConfig, refine_maps
from models.saliency import Candidates, SaliencyConfig, image_masks

SIZE = 256  # image side: an 8 x 8 grid of C5 cells
SQUARE = (slice(88, 184), slice(72, 168))  # a sharp-edged object, not aligned with the 32-pixel cells


def square_scene(seed=0):
    """A red square on a grey background, both slightly noisy: (3, SIZE, SIZE) in [0, 1], and its mask."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    truth[SQUARE] = True
    photo = torch.where(truth, torch.tensor([0.8, 0.15, 0.1])[:, None, None], torch.tensor(0.45))
    return (photo + 0.03 * torch.randn(3, SIZE, SIZE, generator=g)).clamp(0, 1), truth


def blob_candidates():
    """One C5 saliency map as the seed similarity gives it: a soft blob roughly over the square (its peak
    off the square's centre), which bilinear upsampling turns into a round mask that spills over the edges."""
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    soft = torch.exp(-((ys - 4.1) ** 2 + (xs - 3.5) ** 2) / 4.0)
    return Candidates(soft=soft[None, None], score=torch.tensor([[0.9]]), seed_feature=torch.zeros(1, 1, 4),
                      seed=torch.zeros(1, 1, 3, dtype=torch.long))


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


@pytest.mark.parametrize("method", ["superpixel", "guided"])
def test_refinement_moves_a_blob_onto_the_square_under_it(method):
    photo, truth = square_scene()
    cfg = SaliencyConfig(min_score=0.5)
    hw = (SIZE, SIZE)
    _, (plain,), _ = image_masks(blob_candidates(), 0, (8, 8), hw, hw, cfg)
    _, (refined,), _ = image_masks(blob_candidates(), 0, (8, 8), hw, hw, cfg, refine=RefineConfig(method=method),
                                   guide=photo)
    assert iou(plain, truth) < 0.8  # the unrefined blob is a poor mask of the square
    assert iou(refined, truth) > iou(plain, truth) + 0.1
    if method == "superpixel":
        assert iou(refined, truth) > 0.95  # the square is one segment: the mask is the square


def test_refined_maps_have_the_original_size_and_survive_an_empty_set():
    photo, _ = square_scene()
    cfg = RefineConfig(method="superpixel")
    maps = torch.rand(3, *cfg.work_size((SIZE, SIZE)))
    assert cfg.work_size((SIZE, SIZE)) == (SIZE // 2, SIZE // 2)
    assert refine_maps(maps, photo, (300, 310), cfg).shape == (3, 300, 310)  # original size, not the resized one
    assert refine_maps(maps[:0], photo, (300, 310), cfg).shape == (0, 300, 310)


def test_only_the_chosen_methods_settings_are_recorded():
    assert RefineConfig().to_dict() == {"method": "none"}
    assert RefineConfig(method="superpixel", radius=3).to_dict() == {
        "method": "superpixel", "downsample": 2, "scale": 400.0, "sigma": 0.5, "min_size": 100}
    assert RefineConfig(method="guided", scale=1.0).to_dict() == {
        "method": "guided", "downsample": 2, "radius": 64, "eps": 0.01}
    with pytest.raises(ValueError, match="unknown refinement 'crf'"):
        RefineConfig(method="crf")
    with pytest.raises(ValueError, match="out of range"):
        RefineConfig(method="superpixel", downsample=0)
