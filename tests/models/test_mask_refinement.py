import pytest
import torch

from models.mask_refinement import RefineConfig, refine_maps, segment_means, superpixels
from models.saliency import Candidates, SaliencyConfig, image_masks, kept_maps
from stages.image_data import MEAN, STD

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


def blob_mask(photo, method):
    """The blob's final mask as stage 1 makes it, the photo being the network input (the superpixels made
    from it as the DataLoader workers make them)."""
    cfg, refine, hw = SaliencyConfig(min_score=0.5), RefineConfig(method=method), (SIZE, SIZE)
    image = (photo - MEAN) / STD
    segments = [superpixels(image, refine)] if method == "superpixel" else None
    _, (soft,) = kept_maps(blob_candidates(), [(8, 8)], [hw], cfg, refine, image[None], segments)
    _, (mask,), _ = image_masks(soft, (8, 8), hw, hw, cfg, refined=method != "none")
    return mask


@pytest.mark.parametrize("method", ["superpixel", "guided"])
def test_refinement_moves_a_blob_onto_the_square_under_it(method):
    photo, truth = square_scene()
    plain, refined = blob_mask(photo, "none"), blob_mask(photo, method)
    assert iou(plain, truth) < 0.8  # the unrefined blob is a poor mask of the square
    assert iou(refined, truth) > iou(plain, truth) + 0.1
    if method == "superpixel":
        assert iou(refined, truth) > 0.95  # the square is one segment: the mask is the square


@pytest.mark.parametrize("method", ["superpixel", "guided"])
def test_an_image_with_no_kept_map_beside_one_with_maps_and_masks_at_the_original_size(method):
    """In one batch, an image with three kept maps and one with none: each keeps its count on its working grid,
    and the masks come out at the original size, not the resized one."""
    photo, _ = square_scene()
    cfg = RefineConfig(method=method)
    work = cfg.work_size((SIZE, SIZE))
    assert work == ((SIZE // 2, SIZE // 2) if method == "superpixel" else (SIZE, SIZE))
    image = (photo - MEAN) / STD
    segments = [superpixels(image, cfg)] * 2 if method == "superpixel" else None
    maps = [torch.rand(3, *work), torch.rand(0, *work)]
    refined = refine_maps(maps, cfg, torch.stack([image, image]), [(SIZE, SIZE)] * 2, segments)
    assert [m.shape for m in refined] == [m.shape for m in maps] and not torch.equal(refined[0], maps[0])
    keep_all = SaliencyConfig(min_center_y_frac=0.0, max_width_frac=1.01)
    for soft in refined:
        _, masks, _ = image_masks(soft, (8, 8), (SIZE, SIZE), (300, 310), keep_all, mask_threshold=0.0, refined=True)
        assert masks.shape == (len(soft), 300, 310)


def test_segment_means_equal_a_per_segment_loop_and_each_image_alone():
    """The batched segment mean (one index_add over every map of every image, one image without maps) equals
    the mean of each map over each segment taken one image, map and segment at a time, and it equals each
    image done alone exactly (so batching never changes a store)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 20, 30), (0, 12, 9), (5, 17, 17)]
    maps = [torch.rand(*shape, generator=g) for shape in shapes]
    # labels 0..n-1, every one used, as `superpixels` gives them
    segments = [torch.unique(torch.randint(0, 7, shape[1:], generator=g), return_inverse=True)[1] for shape in shapes]
    batched = segment_means(maps, segments)
    for m, seg, out in zip(maps, segments, batched):
        expected = torch.empty_like(m)
        for k in range(len(m)):
            for label in seg.unique():
                expected[k][seg == label] = m[k][seg == label].mean()
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(out, segment_means([m], [seg])[0])


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
