"""Stage 2a, `sp pretrain`: a query-based model (K-Net, Mask2Former, ...) pre-trained on the pseudo-label store
with Saliency Prompts (paper §3.3-3.4, §4.1). Reads masks, boxes and seed features from the store; never
recomputes saliency.

One step, the same for every model (the interface of ``models.query_model``): forward with prompts injected
into the initial queries → the model's own matching and losses → kernel supervision on the query features
its matcher paired with each pseudo mask → AdamW step with warm-up and step decay, gradient clipping.
A checkpoint (torchvision-style dict) is written every epoch (`last.pth`; `epoch_NNN.pth` kept every
`keep_every` epochs), every `checkpoint_every` steps and at the end;
`resume` continues from the last one exactly: the data order, flips and prompt dropout depend only on the
seed, the epoch and the step.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from models.backbone_weights import weights_record
from models.build import build_query_model, model_kind
from models.knet import KNetConfig
from models.saliency_prompt import PromptConfig, SaliencyPrompt
from stages.pseudo_label_data import PseudoLabelDataset, collate_training
from stages.training import (LoopConfig, config_dict, forward_losses, init_distributed, prepare_run_folder,
                             seed_everything, train_loop)

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PretrainConfig(LoopConfig):
    """`sp pretrain`'s settings: the training loop's (epochs, batch size, schedule, checkpoints, ...) and these."""
    store: Path
    images: Path
    model: object = field(default_factory=lambda: KNetConfig(num_classes=1, frozen_stages=4))  # any model's config
    backbone_weights: Path | None = None
    lr: float = 1e-4
    weight_decay: float = 0.05
    prompt: PromptConfig = field(default_factory=PromptConfig)
    kernel_loss_weight: float = 1.0
    image_size: int = 800
    max_size: int = 1333
    flip_prob: float = 0.5
    device: str = "cpu"
    keep_every: int = 1  # keep epoch_NNN.pth every N epochs (0: last and final only)


def training_step(model, prompt: SaliencyPrompt, batch: dict, cfg: PretrainConfig, step: int, device: str):
    """Losses of one batch (dict of named scalars, weights applied)."""
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
    if dataset.backbone not in (None, cfg.model.backbone):
        log.warning("%s was generated with backbone %s, pre-training uses %s: the stored seed features (kernel "
                    "supervision) come from another network", cfg.store, dataset.backbone, cfg.model.backbone)
    model = build_query_model(cfg.model, cfg.backbone_weights).to(dist.device)
    prompt = SaliencyPrompt(dataset.feature_dim, cfg.model.channels, cfg.prompt).to(dist.device)
    params = [p for p in list(model.parameters()) + list(prompt.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_model = DistributedDataParallel(model) if dist.world_size > 1 else model
    prepare_run_folder(cfg, "sp-pretrain", config_dict(cfg), dist.main)

    kind = model_kind(cfg.model)

    def check_resume(state):
        if state.get("model_kind", "knet") != kind:
            raise ValueError(f"{cfg.out / 'last.pth'} is a {state.get('model_kind', 'knet')} run; "
                             f"cannot resume it as {kind}")
        if state["store_settings_hash"] != dataset.settings_hash:
            raise ValueError(f"{cfg.out / 'last.pth'} was trained on a store with settings "
                             f"{state['store_settings_hash']}, {cfg.store} has {dataset.settings_hash}")

    extra = {"args": config_dict(cfg), "model_kind": kind, "model_config": dataclasses.asdict(cfg.model),
             "store_settings_hash": dataset.settings_hash, "kind": "sp-pretrain", **weights_record(cfg.backbone_weights)}
    return train_loop(cfg, dist, {"model": model, "prompt": prompt}, optimizer, dataset, collate_training,
                      lambda batch, step: training_step(train_model, prompt, batch, cfg, step, dist.device),
                      extra, check_resume=check_resume, manual_sync=[prompt])
