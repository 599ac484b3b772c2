import pytest
import torch
import torch.nn.functional as F

from models.saliency_prompt import (PromptConfig, SaliencyPrompt, assign_prompts, box_prompts, inject_prompts,
                                    pad_prompts)


def test_cosine_assignment_equals_per_kernel_loop():
    g = torch.Generator().manual_seed(0)
    kernels = torch.randn(3, 10, 8, generator=g)
    prompts = [torch.randn(4, 8, generator=g), torch.randn(1, 8, generator=g), torch.zeros(0, 8)]
    padded, real = pad_prompts(prompts)
    idx = assign_prompts(kernels, padded, real, "cosine")
    for b, p in enumerate(prompts):
        for n in range(10):
            if len(p) == 0:
                assert idx[b, n] == -1  # L = 0: no prompt
                continue
            sims = [F.cosine_similarity(kernels[b, n], p[l], dim=0) for l in range(len(p))]
            assert idx[b, n] == int(torch.stack(sims).argmax())


def test_sequential_and_random_assignments_cover_prompts_in_blocks():
    kernels = torch.zeros(1, 12, 4)
    padded, real = pad_prompts([torch.randn(3, 4)])
    seq = assign_prompts(kernels, padded, real, "sequential")
    assert seq[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    rnd = assign_prompts(kernels, padded, real, "random", torch.Generator().manual_seed(1))
    assert sorted(rnd[0].tolist()) == seq[0].tolist() and rnd[0].tolist() != seq[0].tolist()
    assert (assign_prompts(kernels, padded, real, "none") == -1).all()
    with pytest.raises(ValueError, match="unknown prompt mode"):
        assign_prompts(kernels, padded, real, "nearest")


def test_injection_changes_exactly_the_matched_kernels():
    g = torch.Generator().manual_seed(2)
    kernels = torch.randn(2, 6, 5, generator=g)
    padded, _ = pad_prompts([torch.randn(2, 5, generator=g), torch.randn(3, 5, generator=g)])
    idx = torch.tensor([[0, -1, 1, 1, -1, 0], [2, 2, -1, 0, 1, -1]])
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 0] = False  # a dropped prompt
    out = inject_prompts(kernels, padded, idx, keep)
    for b in range(2):
        for n in range(6):
            if idx[b, n] >= 0 and keep[b, n]:
                torch.testing.assert_close(out[b, n], kernels[b, n] + padded[b, idx[b, n]])
            else:
                assert torch.equal(out[b, n], kernels[b, n])


def test_box_prompt_is_the_mean_feature_inside_the_box():
    # RoIAlign interpolates bilinearly, so half a cell around the box counts too: keep that constant.
    p5 = torch.zeros(1, 3, 8, 8)
    p5[0, :, 1:5, 3:8] = torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    prompts = box_prompts(p5, [torch.tensor([[128.0, 64.0, 224.0, 128.0], [0.0, 0.0, 32.0, 32.0]])], stride=32)
    torch.testing.assert_close(prompts[0][0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(prompts[0][1], torch.zeros(3))
    assert not prompts[0].requires_grad
    empty = box_prompts(p5, [torch.zeros(0, 4)], stride=32)
    assert empty[0].shape == (0, 3)


def test_kernel_loss_is_zero_when_aligned_and_two_when_opposite():
    sp = SaliencyPrompt(seed_dim=4, channels=4)
    with torch.no_grad():
        sp.seed_proj.weight.copy_(torch.eye(4))
        sp.seed_proj.bias.zero_()
    seeds = [torch.eye(4)[:3]]
    kernels = torch.zeros(1, 5, 4)
    # pseudo mask 0 ↔ kernel 4, 1 ↔ kernel 0, 2 ↔ kernel 2: a non-monotonic pairing (bug P5 of the reference)
    pairs = [[(torch.tensor([4, 0, 2]), torch.tensor([0, 1, 2]))]]
    kernels[0, 4], kernels[0, 0], kernels[0, 2] = seeds[0][0], seeds[0][1], seeds[0][2]
    assert sp.kernel_loss([kernels], pairs, seeds).item() == pytest.approx(0.0, abs=1e-6)
    assert sp.kernel_loss([-kernels], pairs, seeds).item() == pytest.approx(2.0)
    # summed over stages
    assert sp.kernel_loss([kernels, -kernels], pairs * 2, seeds).item() == pytest.approx(2.0)
    # pairing by sorted kernel index instead would not be aligned
    wrong = [[(torch.tensor([0, 2, 4]), torch.tensor([0, 1, 2]))]]
    assert sp.kernel_loss([kernels], wrong, seeds).item() > 0.5


def test_kernel_loss_with_no_pseudo_masks_is_zero_and_differentiable():
    sp = SaliencyPrompt(seed_dim=6, channels=4)
    kernels = torch.randn(2, 5, 4, requires_grad=True)
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    loss = sp.kernel_loss([kernels], [[empty, empty]], [torch.zeros(0, 6), torch.zeros(0, 6)])
    assert loss.item() == 0.0


def test_prompt_fn_drops_prompts_only_in_training():
    sp = SaliencyPrompt(seed_dim=4, channels=3, cfg=PromptConfig(drop_prob=0.5))
    p5 = torch.rand(1, 3, 4, 4)
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    kernels = torch.zeros(1, 200, 3)
    g = torch.Generator().manual_seed(0)
    out = sp.train().prompt_fn(boxes, g)(kernels, {"p5": p5})
    changed = (out != 0).any(-1)[0]
    assert 60 < changed.sum() < 140  # about half dropped
    out = sp.eval().prompt_fn(boxes, g)(kernels, {"p5": p5})
    assert (out != 0).any(-1).all()
