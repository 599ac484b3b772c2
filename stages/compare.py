"""`sp compare`: predictions of several fine-tuned checkpoints on the same photos, side by side (one column per
checkpoint, optionally the ground truth first; one row per photo), each mask with its class name and score."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from models.saliency import mask_boxes
from stages.plots import image_grid
from stages.coco_check import checked_data
from stages.image_data import list_images, load_image
from stages.import_coco import annotation_mask
from stages.inference import load_checkpoint_model, predict_images
from stages.viz import overlay

log = logging.getLogger(__name__)


def caption_size(image: Image.Image) -> int:
    """Caption font size in pixels that stays readable when the photo is shown about 600 pixels wide."""
    return max(12, round(max(image.size) / 40))


def pick_files(images_dir: Path, files: list[str] | None, limit: int) -> list[str]:
    """The named files (each must be an image in the folder), or the first `limit` of the sorted folder."""
    if not files:
        return list_images(images_dir)[:limit]
    for name in files:
        if not (Path(images_dir) / name).is_file():
            raise ValueError(f"{name} is not a file in {images_dir}")
    return list(files)


def prediction_overlays(checkpoint: Path, images_dir: Path, files: list[str], score_threshold: float,
                        device: str = "cpu", workers: int = 2) -> list[Image.Image | None]:
    """One overlay per file of a `sp finetune` checkpoint's detections scoring at least score_threshold, captioned
    with class name and score, at the checkpoint's training image size; None for an unreadable file."""
    model, state = load_checkpoint_model(checkpoint, device)
    class_names = [c["name"] for c in state["categories"]]
    args, overlays = state["args"], [None] * len(files)
    for index, pred in predict_images(model, state["model_kind"], images_dir, files, args["image_size"],
                                      args["max_size"], device, 1, workers):
        keep = pred["scores"] >= score_threshold
        image = load_image(Path(images_dir) / files[index])
        overlays[index] = overlay(image, list(pred["masks"][keep].numpy()), pred["boxes"][keep].numpy(),
                                  pred["scores"][keep].numpy(),
                                  [class_names[label] for label in pred["labels"][keep].tolist()], caption_size(image))
    return overlays


def ground_truth_overlays(ann: Path, images_dir: Path, files: list[str]) -> list[Image.Image]:
    """One overlay per file of its annotated instances (crowd regions included), captioned with class names."""
    data = checked_data(Path(ann), images_dir)
    by_name = {img["file_name"]: img for img in data["images"]}
    class_name = {c["id"]: c["name"] for c in data["categories"]}
    per_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    overlays = []
    for name in files:
        if name not in by_name:
            raise ValueError(f"{ann} has no image with file_name {name!r}")
        info, image = by_name[name], load_image(Path(images_dir) / name)
        anns = per_image.get(info["id"], [])
        masks = [annotation_mask(a, image.height, image.width) for a in anns]
        boxes = mask_boxes(torch.from_numpy(np.stack(masks)).bool()).numpy() if masks else np.zeros((0, 4))
        overlays.append(overlay(image, masks, boxes, None, [class_name[a["category_id"]] for a in anns],
                                caption_size(image)))
    return overlays


def comparison_figure(checkpoints: list[Path], names: list[str], images_dir: Path, files: list[str] | None = None,
                      limit: int = 4, score_threshold: float = 0.3, ann: Path | None = None, device: str = "cpu",
                      workers: int = 2) -> Figure:
    """A column per checkpoint titled with its name (the ground truth first with ann), a row per photo."""
    if len(names) != len(checkpoints):
        raise ValueError(f"{len(names)} names for {len(checkpoints)} checkpoints")
    files = pick_files(images_dir, files, limit)
    columns = [ground_truth_overlays(ann, images_dir, files)] if ann is not None else []
    for path, name in zip(checkpoints, names):
        columns.append(prediction_overlays(path, images_dir, files, score_threshold, device, workers))
        log.info("%s: predicted %d photos", name, sum(im is not None for im in columns[-1]))
    titles = (["ground truth"] if ann is not None else []) + names
    rows = [list(row) for row in zip(*columns)]
    return image_grid(rows, files, titles)
