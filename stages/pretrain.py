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

import dataclasses
import logging
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from models.backbone_weights import weights_record
from models.build import build_query_model, model_kind
from models.maskrcnn import MaskRCNNConfig, build_maskrcnn_adapter, maskrcnn_optimizer
from models.saliency_prompt import SaliencyPrompt
from stages.finetune import maskrcnn_losses
from stages.pseudo_label_data import PseudoLabelDataset, collate_training
from stages.settings import MASKRCNN_DEFAULTS, QUERY_MODEL_DEFAULTS, PretrainConfig  # noqa: F401 (the defaults too)
from stages.training import (config_dict, forward_losses, init_distributed, prepare_run_folder, seed_everything,
                             train_loop)

log = logging.getLogger(__name__)


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
    dataset = PseudoLabelDataset(cfg.store, cfg.images, cfg.image_size, cfg.max_size, cfg.flip_prob, cfg.seed,
                                 cfg.min_mask_area)
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
