"""Mask2Former for instance segmentation (Cheng et al. 2022), in plain PyTorch, with the Saliency Prompt hook.

backbone -> pixel decoder (deformable encoder over strides 32/16/8 + stride-4 mask features,
``models.pixel_decoder``) -> transformer decoder: N learnable query features and positional embeddings,
then layers cycling over the three scales (32, 16, 8, 32, ...), each masked cross-attention (a query sees
only where its previous mask is above 0.5; a query whose mask is empty sees everything), self-attention
and FFN (post-norm, no dropout). Class and mask predictions come from the initial queries and after every
layer (deep supervision); the losses are in ``models.mask2former_losses``.

Shapes: B images of (H, W) (multiples of 32), N queries, C channels, K classes (the classifier has K + 1
outputs, the last one no-object); masks are predicted at stride 4, (H/4, W/4).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone import build_backbone
from models.fpn import sine_position_encoding
from models.mask2former_losses import mask2former_losses
from models.pixel_decoder import PixelDecoder
from models.query_model import PromptFn, query_instances
from models.settings import Mask2FormerConfig


class MaskedCrossAttention(nn.Module):
    """Queries attend to one level's pixels, each only where ``blocked`` is False; residual + LayerNorm."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(channels)

    def forward(self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                blocked: Tensor | None) -> Tensor:
        """queries, query_pos: (B, N, C); memory, memory_pos: (B, S, C); blocked: (B * heads, N, S) bool."""
        out = self.attention(queries + query_pos, memory + memory_pos, memory, attn_mask=blocked, need_weights=False)[0]
        return self.norm(queries + out)


class DecoderLayer(nn.Module):
    """Masked cross-attention, then self-attention, then FFN (Mask2Former's order), all post-norm."""

    def __init__(self, channels: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross = MaskedCrossAttention(channels, num_heads)
        self.self_attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.self_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, channels))
        self.ffn_norm = nn.LayerNorm(channels)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                blocked: Tensor | None) -> Tensor:
        q = self.cross(queries, query_pos, memory, memory_pos, blocked)
        k = q + query_pos
        q = self.self_norm(q + self.self_attention(k, k, q, need_weights=False)[0])
        return self.ffn_norm(q + self.ffn(q))


def attention_block_mask(mask_logits: Tensor, size: tuple[int, int], num_heads: int) -> Tensor:
    """Where each query may not look: (B * heads, N, h * w) bool, True outside its mask (sigmoid < 0.5) at
    the attended level's size; a query whose mask is empty there may look everywhere. No gradient."""
    resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    blocked = resized.flatten(2).sigmoid() < 0.5
    blocked &= ~blocked.all(-1, keepdim=True)
    return blocked.repeat_interleave(num_heads, dim=0)


class Mask2Former(nn.Module):
    """Backbone + pixel decoder + masked-attention transformer decoder, following the query-model contract
    of ``models.query_model``."""

    def __init__(self, cfg: Mask2FormerConfig, backbone: nn.Module) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.backbone = backbone
        self.pixel_decoder = PixelDecoder(backbone.channels, c, cfg.encoder_layers, cfg.num_heads,
                                          cfg.encoder_points, cfg.encoder_ffn_dim)
        self.query_feat = nn.Embedding(cfg.num_queries, c)  # content queries: where prompts are added
        self.query_embed = nn.Embedding(cfg.num_queries, c)  # positional embeddings of the queries
        self.level_embed = nn.Embedding(3, c)
        self.layers = nn.ModuleList(DecoderLayer(c, cfg.num_heads, cfg.decoder_ffn_dim)
                                    for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c)
        self.class_embed = nn.Linear(c, cfg.num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, c),
                                        nn.ReLU(inplace=True), nn.Linear(c, c))

    def heads(self, queries: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits (B, N, K + 1) and mask logits (B, N, H/4, W/4) of queries (B, N, C)."""
        q = self.decoder_norm(queries)
        return self.class_embed(q), torch.einsum("bnc,bchw->bnhw", self.mask_embed(q), mask_features)

    def forward(self, images: Tensor, prompt_fn: PromptFn | None = None
                ) -> tuple[list[dict[str, Tensor | None]], dict[str, Tensor]]:
        """images: (B, 3, H, W) normalised, H and W multiples of 32.

        prompt_fn(queries (B, N, C), feats) -> (B, N, C) is applied once to the content query features
        before the initial prediction (so the first attention masks see the prompts, as in the authors'
        variant) and the first decoder layer; the positional embeddings are never prompted.

        Returns:
            stages: 1 + decoder_layers dicts (initial queries first) with 'logits' (B, N, K + 1), 'masks'
                (B, N, H/4, W/4) logits and 'queries' (B, N, C), the query features after that layer (None
                for the initial step, whose queries are the learned embeddings: kernel supervision is on
                decoder layers only).
            feats: 'p5' (B, C, H/32, W/32), the encoder's stride-32 output (prompts are pooled from it);
                'mask_features' (B, C, H/4, W/4).
        """
        mask_features, encoded = self.pixel_decoder(self.backbone(images))
        b, c = mask_features.shape[:2]
        sizes = [tuple(x.shape[-2:]) for x in encoded]
        memories = [x.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, x in enumerate(encoded)]
        positions = [sine_position_encoding(b, c, h, w, device=images.device).flatten(2).transpose(1, 2).to(x.dtype)
                     for (h, w), x in zip(sizes, memories)]
        feats = {"p5": encoded[0], "mask_features": mask_features}
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        queries = self.query_feat.weight[None].expand(b, -1, -1)
        if prompt_fn is not None:
            queries = prompt_fn(queries, feats)
        logits, masks = self.heads(queries, mask_features)
        stages: list[dict[str, Tensor | None]] = [dict(logits=logits, masks=masks, queries=None)]
        for i, layer in enumerate(self.layers):
            level = i % len(encoded)
            blocked = attention_block_mask(masks, sizes[level], self.cfg.num_heads)
            queries = layer(queries, query_pos, memories[level], positions[level], blocked)
            logits, masks = self.heads(queries, mask_features)
            stages.append(dict(logits=logits, masks=masks, queries=queries))
        return stages, feats

    def losses(self, stages: list[dict], targets: list[dict]) -> tuple[dict[str, Tensor], list]:
        """``models.mask2former_losses.mask2former_losses`` with this model's point-sampling settings."""
        return mask2former_losses(stages, targets, self.cfg.num_points, self.cfg.oversample_ratio,
                                  self.cfg.importance_sample_ratio)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: Sequence[tuple[int, int]],
                orig_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Mask2Former's instance inference on the last layer: softmax class scores without no-object, top-k
        over queries x classes, score = class score x mean mask probability inside the binary mask.

        images: (B, 3, H, W) padded batch; image_sizes[b] = (h, w) valid region of image b; orig_sizes[b] =
        (h0, w0) size to return masks at. Returns per image dict(scores (k,), labels (k,) long, masks
        (k, h0, w0) bool, boxes (k, 4) xyxy with exclusive x2/y2), k = min(max_per_image, N * K), sorted by
        decreasing score.
        """
        last = self(images)[0][-1]
        return [query_instances(last["logits"][b].float().softmax(-1)[:, :-1], last["masks"][b], images.shape[-2:],
                                valid, orig, self.cfg.max_per_image, self.cfg.mask_threshold_test,
                                maps_are_logits=True, quality_score=True)
                for b, (valid, orig) in enumerate(zip(image_sizes, orig_sizes))]


def build_mask2former(cfg: Mask2FormerConfig, backbone_weights: Path | None = None) -> Mask2Former:
    """Mask2Former on a backbone from a local checkpoint (``None``: random, with a loud warning)."""
    backbone = build_backbone(cfg.backbone, backbone_weights, out_levels=("c2", "c3", "c4", "c5"),
                              frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval)
    return Mask2Former(cfg, backbone)
