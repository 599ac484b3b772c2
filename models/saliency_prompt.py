"""Saliency Prompt (paper §3.3-3.4): prompts from pseudo-mask boxes, prompt-kernel matching, and kernel
supervision. Used only in pre-training; fine-tuning and inference never see it. The same code serves every
query-based model (``models.query_model``): "kernels" here are the models' initial query features (K-Net's
kernels, Mask2Former's content queries, QueryInst's proposal features).

Shapes: B images, N kernels (queries), C channels, L_b pseudo masks (prompts) of image b (L_b may be 0), D the
stored seed-feature size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from models.settings import PromptConfig

PROMPT_MODES = ("cosine", "sequential", "random", "none")


def box_prompts(p5: torch.Tensor, boxes: list[torch.Tensor], stride: int, roi_size: int = 7) -> list[torch.Tensor]:
    """Eq. 5: one prompt per pseudo mask, the P5 feature averaged inside its box (RoIAlign, then mean).

    p5: (B, C, h, w); boxes: per image (L_b, 4) xyxy in input pixels. Returns per image (L_b, C), detached:
    the prompt path carries no gradient (P5 still trains through the main losses)."""
    if sum(len(b) for b in boxes) == 0:
        return [p5.new_zeros(0, p5.shape[1]) for _ in boxes]
    pooled = roi_align(p5.detach().float(), [b.float() for b in boxes], output_size=roi_size,
                       spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True).mean((2, 3))
    return list(pooled.split([len(b) for b in boxes]))


def pad_prompts(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image prompts → (B, Lmax, C) zeros-padded and a (B, Lmax) bool mask of real prompts."""
    lmax = max(1, max(len(p) for p in prompts))
    c = prompts[0].shape[1]
    padded = prompts[0].new_zeros(len(prompts), lmax, c)
    real = torch.zeros(len(prompts), lmax, dtype=torch.bool, device=padded.device)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
        real[b, :len(p)] = True
    return padded, real


def assign_prompts(kernels: torch.Tensor, prompts: torch.Tensor, real: torch.Tensor, mode: str,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Which prompt each kernel receives: (B, N) long, -1 for none.

    cosine (Eq. 6-7): δ(n) = argmax_l cos(K_n, P_l), all images in one batched matmul.
    sequential: kernels split into L consecutive blocks, block l gets prompt l (the reference's order).
    random: the sequential assignment over a random permutation of the kernels (UP-DETR-style shuffle).
    none: no prompts (pre-training on pseudo masks alone).
    """
    b, n, _ = kernels.shape
    counts = real.sum(1)  # (B,)
    if mode == "none":
        return torch.full((b, n), -1, dtype=torch.long, device=kernels.device)
    if mode == "cosine":
        sim = torch.bmm(F.normalize(kernels.float(), dim=-1), F.normalize(prompts.float(), dim=-1).transpose(1, 2))
        idx = sim.masked_fill(~real[:, None, :], float("-inf")).argmax(-1)
    elif mode in ("sequential", "random"):
        slot = torch.arange(n, device=kernels.device)[None, :] * counts[:, None] // n  # (B, N)
        if mode == "random":
            perm = torch.stack([torch.randperm(n, generator=generator) for _ in range(b)]).to(kernels.device)
            slot = slot.gather(1, perm)
        idx = slot
    else:
        raise ValueError(f"unknown prompt mode {mode!r}: expected one of {PROMPT_MODES}")
    return idx.masked_fill((counts == 0)[:, None], -1)


def inject_prompts(kernels: torch.Tensor, prompts: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Eq. 8: K'_n = K_n + P_δ(n) for kernels with a prompt that is kept. keep: (B, N) bool."""
    chosen = prompts.gather(1, idx.clamp_min(0)[:, :, None].expand(-1, -1, prompts.shape[-1]))
    use = (keep & (idx >= 0))[:, :, None]
    return kernels + chosen.to(kernels.dtype) * use


class SaliencyPrompt(nn.Module):
    """The pre-training-only parts: prompt injection (a `prompt_fn` for the model) and the seed projection
    of kernel supervision (Eq. 9)."""

    def __init__(self, seed_dim: int, channels: int, cfg: PromptConfig | None = None, stride: int = 32):
        super().__init__()
        self.cfg = cfg or PromptConfig()
        if self.cfg.mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {self.cfg.mode!r}: expected one of {PROMPT_MODES}")
        self.stride = stride
        self.seed_proj = nn.Linear(seed_dim, channels)

    def prompt_fn(self, boxes: list[torch.Tensor], generator: torch.Generator | None = None):
        """A function (queries (B, N, C), feats) → prompted queries, for any query model's
        `forward(images, prompt_fn=...)`; feats['p5'] is the stride-32 map the prompts are pooled from.
        It records the assignment in `self.last_assignment` (B, N) for inspection and tests."""

        def inject(kernels: torch.Tensor, feats: dict) -> torch.Tensor:
            prompts, real = pad_prompts(box_prompts(feats["p5"], boxes, self.stride, self.cfg.roi_size))
            idx = assign_prompts(kernels.detach(), prompts, real, self.cfg.mode, generator)
            keep = torch.ones_like(idx, dtype=torch.bool)
            if self.training and self.cfg.drop_prob > 0:
                keep = torch.rand(idx.shape, generator=generator).to(idx.device) >= self.cfg.drop_prob
            self.last_assignment = idx
            return inject_prompts(kernels, prompts, idx, keep)

        return inject

    def kernel_loss(self, stage_kernels: list[torch.Tensor], assignments: list[list[tuple]],
                    seed_features: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 9: Σ_stages mean over matched pairs of 1 − cos(Linear(S_l), K_{n_l}).

        stage_kernels: per supervised stage (those whose 'queries' are not None) the (B, N, C) query
        features; assignments: per stage, per image (pred_idx, gt_idx) from the Hungarian matcher — query
        pred_idx[i] is paired with pseudo mask gt_idx[i] (pairing by the matcher's own pairs, not by sorted
        kernel index, fixes the reference's bug P5); seed_features: per image (L_b, D). Returns a scalar (0
        when no image has a pseudo mask)."""
        total = stage_kernels[0].new_zeros(())
        for kernels, pairs in zip(stage_kernels, assignments):
            pred = [kernels[b, p] for b, (p, _) in enumerate(pairs)]
            target = [seed_features[b][g].to(kernels.dtype) for b, (_, g) in enumerate(pairs)]
            pred, target = torch.cat(pred), torch.cat(target)
            if len(pred):
                total = total + (1 - F.cosine_similarity(self.seed_proj(target), pred, dim=-1)).mean()
        return total
