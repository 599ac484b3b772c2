"""Stage 2a, `sp pretrain`: a query-based model (K-Net, Mask2Former, ...) pre-trained on the pseudo-label store
with Saliency Prompts (paper §3.3-3.4, §4.1), or Mask R-CNN pre-trained on the same pseudo masks as CutLER
pre-trains its detector (one class-agnostic class, DropLoss; docs/maskrcnn_pretraining.md). Reads masks, boxes
and seed features from the store; never recomputes saliency.

One step of a query model, the same for every one (the interface of ``models.query_model``): forward with
prompts injected into the initial queries → the model's own matching and losses → kernel supervision on the
query features its matcher paired with each pseudo mask → AdamW step with warm-up and step decay, gradient
clipping. One step of Mask R-CNN: its losses on the pseudo masks and boxes (no prompts: it has no queries) →
SGD step with the same schedule and clipping.
A checkpoint (torchvision-style dict) is written every epoch (`last.pth`; `epoch_NNN.pth` kept every
`keep_every` epochs), every `checkpoint_every` steps and at the end;
`resume` continues from the last one exactly: the data order, flips and prompt dropout depend only on the
seed, the epoch and the step.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from models.backbone_weights import weights_record
from models.build import build_query_model, model_kind
from models.knet import KNetConfig
from models.maskrcnn import MaskRCNNConfig, build_maskrcnn_adapter, maskrcnn_optimizer
from models.saliency_prompt import PromptConfig, SaliencyPrompt
from stages.finetune import maskrcnn_losses
from stages.gen_masks import GenerationSettings
from stages.pseudo_label_data import PseudoLabelDataset, collate_training
from stages.training import (LoopConfig, config_dict, forward_losses, init_distributed, prepare_run_folder,
                             seed_everything, train_loop)

log = logging.getLogger(__name__)


# The settings whose default depends on the model (None in PretrainConfig: the model's). Query models: the
# paper's AdamW, cosine prompts and kernel supervision. Mask R-CNN: SGD (momentum 0.9) as CutLER pre-trains and
# as this project fine-tunes it, at the fine-tuning's rate for 4 images per step (lr 0.01: CutLER's base rate, and
# the one chosen for Mask R-CNN on held-apart photos), CutLER's weight decay and DropLoss IoU threshold; no
# prompts and no kernel supervision (it has no queries). docs/maskrcnn_pretraining.md explains each choice.
QUERY_MODEL_DEFAULTS = dict(lr=1e-4, weight_decay=0.05, prompt=PromptConfig(), kernel_loss_weight=1.0)
MASKRCNN_DEFAULTS = dict(lr=0.01, weight_decay=5e-5, prompt=PromptConfig(mode="none"), kernel_loss_weight=0.0,
                         drop_loss=True, drop_loss_iou=0.01)


@dataclass(kw_only=True)
class PretrainConfig(LoopConfig):
    """`sp pretrain`'s settings: the training loop's (epochs, batch size, schedule, checkpoints, ...) and these.
    A None below is the model's default (QUERY_MODEL_DEFAULTS or MASKRCNN_DEFAULTS), set on construction."""
    store: Path
    images: Path
    # any model's config; by default K-Net on the pseudo masks' backbone (the stored seed features are its)
    model: object = field(default_factory=lambda: KNetConfig(backbone=GenerationSettings.backbone, num_classes=1,
                                                             frozen_stages=4))
    backbone_weights: Path | None = None
    lr: float | None = None
    weight_decay: float | None = None
    prompt: PromptConfig | None = None  # query models only (Mask R-CNN: mode none)
    kernel_loss_weight: float | None = None  # query models only (Mask R-CNN: 0)
    drop_loss: bool | None = None  # Mask R-CNN only: CutLER's DropLoss on the RoI classifier
    drop_loss_iou: float | None = None  # Mask R-CNN only: DropLoss's IoU threshold
    image_size: int = 800
    max_size: int = 1333
    flip_prob: float = 0.5
    device: str = "cpu"
    keep_every: int = 1  # keep epoch_NNN.pth every N epochs (0: last and final only)

    def __post_init__(self) -> None:
        mask_rcnn = isinstance(self.model, MaskRCNNConfig)
        for name, default in (MASKRCNN_DEFAULTS if mask_rcnn else QUERY_MODEL_DEFAULTS).items():
            if getattr(self, name) is None:
                setattr(self, name, copy.copy(default))  # a PromptConfig of its own
        if mask_rcnn and (self.prompt.mode != "none" or self.kernel_loss_weight != 0):
            raise ValueError(f"Mask R-CNN has no queries to prompt or supervise (got prompts {self.prompt}, kernel "
                             f"loss weight {self.kernel_loss_weight:g}): prompts and kernel supervision are for the "
                             "query models (knet, mask2former, queryinst); leave --prompt, --prompt-drop and "
                             "--kernel-loss-weight out, or pass --prompt none --kernel-loss-weight 0")
        if not mask_rcnn and (self.drop_loss is not None or self.drop_loss_iou is not None):
            raise ValueError("--drop-loss / --drop-loss-iou are Mask R-CNN's (DropLoss weights its RoI "
                             f"classifier's loss); {model_kind(self.model)} has no RoI classifier")
        if mask_rcnn and not self.drop_loss and self.drop_loss_iou != MASKRCNN_DEFAULTS["drop_loss_iou"]:
            raise ValueError(f"--drop-loss-iou {self.drop_loss_iou:g} is DropLoss's threshold, and --no-drop-loss "
                             "turns DropLoss off: give one of them")


def training_step(model, prompt: SaliencyPrompt | None, batch: dict, cfg: PretrainConfig, step: int, device: str):
    """Losses of one batch (dict of named scalars, weights applied). Mask R-CNN has no prompt module (None)."""
    if isinstance(cfg.model, MaskRCNNConfig):
        return maskrcnn_losses(model, batch, device)
    images = batch["images"].to(device, non_blocking=True)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # prompt dropout / random order
    prompt_fn = None if cfg.prompt.mode == "none" else prompt.prompt_fn([t["boxes"] for t in targets], generator)
    stages, losses, assignments = forward_losses(model, images, targets, device, prompt_fn)
    if cfg.kernel_loss_weight > 0:
        supervised = [(s["queries"], a) for s, a in zip(stages, assignments) if s["queries"] is not None]
        losses["kernel"] = cfg.kernel_loss_weight * prompt.kernel_loss(
            [q for q, _ in supervised], [a for _, a in supervised], [t["seed_features"] for t in targets])
    return losses


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pre-training; returns the path of the final checkpoint."""
    dist = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    dataset = PseudoLabelDataset(cfg.store, cfg.images, cfg.image_size, cfg.max_size, cfg.flip_prob, cfg.seed)
    if len(dataset) == 0:
        raise ValueError(f"{cfg.store} has no usable images")
    if isinstance(cfg.model, MaskRCNNConfig):
        kind, prompt = "maskrcnn", None
        model = build_maskrcnn_adapter(cfg.model, cfg.backbone_weights,
                                       drop_loss_iou=cfg.drop_loss_iou if cfg.drop_loss else None).to(dist.device)
        optimizer = maskrcnn_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        if dataset.backbone not in (None, cfg.model.backbone):
            log.warning("%s was generated with backbone %s, pre-training uses %s: the stored seed features (kernel "
                        "supervision) come from another network", cfg.store, dataset.backbone, cfg.model.backbone)
        kind = model_kind(cfg.model)
        model = build_query_model(cfg.model, cfg.backbone_weights).to(dist.device)
        prompt = SaliencyPrompt(dataset.feature_dim, cfg.model.channels, cfg.prompt).to(dist.device)
        params = [p for p in list(model.parameters()) + list(prompt.parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    modules = {"model": model} if prompt is None else {"model": model, "prompt": prompt}
    train_model = DistributedDataParallel(model) if dist.world_size > 1 else model
    prepare_run_folder(cfg, "sp-pretrain", config_dict(cfg), dist.main)

    def check_resume(state):
        if state.get("model_kind", "knet") != kind:
            raise ValueError(f"{cfg.out / 'last.pth'} is a {state.get('model_kind', 'knet')} run; "
                             f"cannot resume it as {kind}")
        if state["store_settings_hash"] != dataset.settings_hash:
            raise ValueError(f"{cfg.out / 'last.pth'} was trained on a store with settings "
                             f"{state['store_settings_hash']}, {cfg.store} has {dataset.settings_hash}")

    extra = {"args": config_dict(cfg), "model_kind": kind, "model_config": dataclasses.asdict(cfg.model),
             "store_settings_hash": dataset.settings_hash, "kind": "sp-pretrain", **weights_record(cfg.backbone_weights)}
    return train_loop(cfg, dist, modules, optimizer, dataset, collate_training,
                      lambda batch, step: training_step(train_model, prompt, batch, cfg, step, dist.device),
                      extra, check_resume=check_resume, manual_sync=[] if prompt is None else [prompt])
