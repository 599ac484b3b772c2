"""Models from checkpoints, and predictions over an image folder, for `sp evaluate`, `sp predict` and the
evaluation inside fine-tuning. The query models (``models.build``) and the Mask R-CNN baseline return the same
per-image dict:
scores (K,), labels (K,) contiguous, masks (K, H, W) bool at original size, boxes (K, 4) xyxy."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from models.backbone import unnormalise
from models.build import build_query_model, query_model_spec
from models.maskrcnn import MaskRCNNConfig, build_maskrcnn_adapter
from stages.image_data import ImageFolder, batch_loader
from stages.training import read_checkpoint


def build_model(kind: str, config: dict) -> nn.Module:
    """The model a checkpoint holds, without its weights (the caller loads them next, so the backbone's
    random-weights warning is silenced). kind 'maskrcnn' or a query model's name; config: the dataclass fields
    saved in the checkpoint's 'model_config'."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        logging.getLogger("models.backbone").disabled = True
        try:
            if kind == "maskrcnn":
                return build_maskrcnn_adapter(MaskRCNNConfig(**config))
            return build_query_model(query_model_spec(kind).config(**config))
        finally:
            logging.getLogger("models.backbone").disabled = False


def load_checkpoint_model(path: Path, device: str, pretrained_ok: bool = False, mask_threshold: float | None = None,
                          mask_quality_score: bool = False) -> tuple[nn.Module, dict]:
    """The model of a `sp finetune` checkpoint, in eval mode, and the checkpoint dict (categories, args, ...).
    pretrained_ok: also the K-Net of a `sp pretrain` checkpoint (its prompt module is not loaded);
    mask_threshold: the test-time mask threshold instead of the one the model was trained with;
    mask_quality_score: K-Net ranks by class score x mask quality (Mask2Former's rule)."""
    state = read_checkpoint(path, "checkpoint")
    if pretrained_ok and state.get("kind") == "sp-pretrain":
        state = {"model_kind": "knet", **state}
    elif state.get("kind") != "sp-finetune":
        raise ValueError(f"{path} is not a `sp finetune` checkpoint (kind {state.get('kind')!r}); " +
                         ("nor a `sp pretrain` one" if pretrained_ok else
                          "a pre-training checkpoint is used through `sp finetune --init`"))
    config = dict(state.get("model_config", {}))
    if mask_threshold is not None:
        config["mask_threshold" if state.get("model_kind") == "maskrcnn" else "mask_threshold_test"] = mask_threshold
    if mask_quality_score:
        if state.get("model_kind") != "knet":
            raise ValueError(f"{path}: mask-quality scoring is a K-Net test-time option (Mask2Former always "
                             f"scores so; this is a {state.get('model_kind')} checkpoint)")
        config["mask_quality_score"] = True
    try:
        model = build_model(state["model_kind"], config)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:  # written by another version of sp, or edited
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: its model cannot be rebuilt ({type(e).__name__}: {reason})") from None
    return model.to(device).eval(), state


def unnormalise_batch(images: torch.Tensor, sizes) -> list[torch.Tensor]:
    """Padded normalised batch → list of 0-1 RGB crops (Mask R-CNN normalises and resizes by itself)."""
    return [unnormalise(image, h, w) for image, (h, w) in zip(images, sizes)]


@torch.no_grad()
def predict_images(model: nn.Module, kind: str, images_dir: Path, file_names: list[str], image_size: int,
                   max_size: int, device: str, batch_size: int = 2, workers: int = 2):
    """Yields (index into file_names, prediction dict) for every readable image, in order."""
    model.eval()
    loader = batch_loader(ImageFolder(images_dir, file_names, image_size, max_size), batch_size, workers)
    for batch in loader:
        if not batch.index:
            continue
        images = batch.images.to(device)
        if kind == "maskrcnn":
            predictions = model.predict(unnormalise_batch(images, batch.resized_hw), batch.image_hw)
        else:
            predictions = model.predict(images, batch.resized_hw, batch.image_hw)
        for index, prediction in zip(batch.index, predictions):
            yield index, {k: v.cpu() for k, v in prediction.items()}
