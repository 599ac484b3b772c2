"""`sp kernel-maps`: the mean activation map of each K-Net kernel over a folder of images (the paper's Figure 6:
Saliency-Prompt kernels specialise in locations and shapes).

The model runs without prompts. For each image the last stage's mask probabilities (sigmoid of the mask logits,
(N, H/4, W/4) for the padded input) are cropped to the cells that cover the image, so that the padding to a
multiple of 32 is left out, and resized to a fixed canvas (S, S): images of any aspect ratio average in
normalised image coordinates. The map of kernel n is the mean of its canvases over the images.

Images run one at a time: K-Net pools features under each mask over the whole input, padding included, so in
a batch an image's kernels would depend on the sizes of the other images.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.plots import heatmap_grid, save
from stages.image_data import ImageFolder, batch_loader, list_images
from stages.inference import load_checkpoint_model

log = logging.getLogger(__name__)
CANVAS = 64


def image_maps(mask_logits: Tensor, resized_hw: list[tuple[int, int]], input_hw: tuple[int, int],
               canvas: int = CANVAS) -> Tensor:
    """Mask logits (B, N, h, w) of a padded input of input_hw (H, W) → (B, N, canvas, canvas) probabilities:
    image b's cells (those covering its resized_hw[b] pixels) resized to the canvas, bilinear with antialiasing."""
    (height, width), (h, w) = input_hw, mask_logits.shape[-2:]
    maps = []
    for logits, (rh, rw) in zip(mask_logits, resized_hw):
        valid = logits[:, :math.ceil(rh * h / height), :math.ceil(rw * w / width)].sigmoid()
        maps.append(F.interpolate(valid[None], size=(canvas, canvas), mode="bilinear", align_corners=False,
                                  antialias=True)[0])
    return torch.stack(maps)


@torch.no_grad()
def kernel_maps(model: nn.Module, images_dir: Path, file_names: list[str], image_size: int, max_size: int,
                device: str = "cpu", canvas: int = CANVAS, workers: int = 2) -> tuple[np.ndarray, int]:
    """(N, canvas, canvas) float32: each kernel's mean map over the readable images; and how many those were."""
    model.eval()
    total, count = None, 0
    for batch in batch_loader(ImageFolder(images_dir, file_names, image_size, max_size), 1, workers):
        for _, name, reason in batch.failed:
            log.warning("skipped %s: %s", name, reason)
        if not batch.index:
            continue
        images = batch.images.to(device)
        stages, _ = model(images)
        maps = image_maps(stages[-1]["masks"].float(), batch.resized_hw, images.shape[-2:], canvas).sum(0)
        total = maps if total is None else total + maps
        count += len(batch.index)
    if not count:
        raise ValueError(f"no readable image among the {len(file_names)} of {images_dir}")
    return (total / count).cpu().numpy(), count


def file_label(name: str) -> str:
    """A checkpoint's display name as a file-name part: knet_sp/seed0 → knet_sp_seed0."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "checkpoint"


def write_kernel_maps(checkpoints: list[Path], names: list[str], images_dir: Path, out_png: Path,
                      limit: int | None = None, image_size: int | None = None, max_size: int | None = None,
                      device: str = "cpu", canvas: int = CANVAS, columns: int = 0, workers: int = 2) -> list[Path]:
    """For each K-Net checkpoint (`sp pretrain`, or `sp finetune` of a K-Net) its kernels' mean maps over the
    first `limit` images of the folder (all by default), at the checkpoint's training image size unless given:
    OUT_STEM.NAME.npy (N, canvas, canvas) per checkpoint and a PNG grid, one row of N maps per checkpoint.
    Returns the paths written, the PNG last."""
    if len(names) != len(checkpoints):
        raise ValueError(f"{len(names)} names for {len(checkpoints)} checkpoints")
    labels = [file_label(name) for name in names]
    if len(set(labels)) < len(labels):
        raise ValueError(f"names {', '.join(names)} do not give distinct file names")
    files = list_images(images_dir)[:limit]
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    maps, written = {}, []
    for path, name, label in zip(checkpoints, names, labels):
        model, state = load_checkpoint_model(path, device, pretrained_ok=True)
        if state["model_kind"] != "knet":
            raise ValueError(f"{path} is a {state['model_kind']} checkpoint; kernel maps need a K-Net")
        args = state["args"]
        maps[name], count = kernel_maps(model, images_dir, files, image_size or args["image_size"],
                                        max_size or args["max_size"], device, canvas, workers)
        log.info("%s: %d kernel maps over %d images", name, len(maps[name]), count)
        written.append(out_png.with_name(f"{out_png.stem}.{label}.npy"))
        np.save(written[-1], maps[name])
    fig = heatmap_grid(maps, columns)
    fig.suptitle(f"Mean mask probability of each kernel over {count} images of {Path(images_dir)}")
    written.append(save(fig, out_png))
    return written
