"""Labeled COCO instance data for fine-tuning: category ids ↔ contiguous labels, flips and the optional
rotation of §4.1, crowd regions left out of the targets. Items have the same form as the pre-training
dataset's, so both share `collate_training`.

Records are pickled into one numpy byte buffer with offsets (as detectron2 does), so DataLoader workers do
not copy thousands of Python objects on read.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from models.saliency import mask_boxes
from stages.coco_check import checked_data
from stages.image_data import load_image, network_input, resize_masks
from stages.import_coco import annotation_mask
from store.export import FG_CATEGORY


def one_class(data: dict) -> dict:
    """The class-agnostic form of a COCO dataset dict: every annotation in the one category 'fg' (id 1) that
    pseudo masks have too, so that training and AP measure localisation and shape alone. The dict passed in
    is not changed."""
    return {**data, "categories": [dict(FG_CATEGORY)],
            "annotations": [{**a, "category_id": FG_CATEGORY["id"]} for a in data["annotations"]]}


class CocoInstances(Dataset):
    """Item: dict(image (3, Hr, Wr), masks (L, Hr, Wr) bool, boxes (L, 4), labels (L,) long, index).

    ann: a COCO file (checked here, with its images, by `stages.coco_check`) or a dataset dict already checked.
    categories: the dataset's categories sorted by id; label l ↔ categories[l]['id'].
    repeat: the images appear this many times (item k is image k % number of images, with augmentation drawn for
    k), as the reference's RepeatDataset.
    """

    def __init__(self, ann: Path | dict, images_dir: Path, image_size: int, max_size: int, flip_prob: float = 0.5,
                 rotate_deg: float = 0.0, seed: int = 0, repeat: int = 1):
        data = checked_data(ann, images_dir)
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        label_of = {c["id"]: i for i, c in enumerate(self.categories)}
        per_image: dict[int, list] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                per_image[ann["image_id"]].append((ann["segmentation"], label_of[ann["category_id"]]))
        images = sorted(data["images"], key=lambda img: img["id"])
        blobs = [pickle.dumps((img["file_name"], img["height"], img["width"], img["id"], per_image[img["id"]]))
                 for img in images]
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self.offsets = np.cumsum([0] + [len(b) for b in blobs])
        self.image_ids = np.array([img["id"] for img in images], dtype=np.int64)
        self.file_names = [img["file_name"] for img in images]
        self.images_dir, self.image_size, self.max_size = Path(images_dir), image_size, max_size
        self.flip_prob, self.rotate_deg, self.seed, self.epoch = flip_prob, rotate_deg, seed, 0
        self.repeat = repeat

    def __len__(self):
        return len(self.image_ids) * self.repeat

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def record(self, k: int):
        return pickle.loads(self.buffer[self.offsets[k]:self.offsets[k + 1]].tobytes())

    def __getitem__(self, k: int) -> dict:
        name, height, width, image_id, anns = self.record(k % len(self.image_ids))
        image = network_input(load_image(self.images_dir / name, (height, width)), self.image_size, self.max_size)
        masks = resize_masks([annotation_mask({"segmentation": s}, height, width) for s, _ in anns], image.shape[1:])
        labels = torch.tensor([label for _, label in anns], dtype=torch.long)
        rng = np.random.default_rng([self.seed, self.epoch, k])
        if rng.random() < self.flip_prob:
            image, masks = image.flip(-1), masks.flip(-1)
        if self.rotate_deg > 0 and rng.random() < 0.5:
            angle = float(rng.uniform(-self.rotate_deg, self.rotate_deg))
            image = TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR)
            masks = TF.rotate(masks[:, None].float(), angle)[:, 0] > 0.5 if len(masks) else masks
            keep = masks.flatten(1).any(1)  # an object rotated out of the image is no target
            masks, labels = masks[keep], labels[keep]
        return {"image": image, "masks": masks, "boxes": mask_boxes(masks), "labels": labels, "index": k}
