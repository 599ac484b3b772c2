"""Stage 2a, `sp pretrain`: K-Net pre-trained on the pseudo-label store with Saliency Prompts (paper §3.3-3.4,
§4.1). Reads masks, boxes and seed features from the store; never recomputes saliency.

One step: K-Net forward with prompts injected into the RPN-stage kernels → Hungarian matching per stage →
focal/dice/BCE losses (+ kernel supervision) → AdamW step with warm-up and step decay, gradient clipping.
A checkpoint (torchvision-style dict) is written every epoch, every `checkpoint_every` steps and at the end;
`resume` continues from the last one exactly: the data order, flips and prompt dropout depend only on the
seed, the epoch and the step.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.knet import KNetConfig, build_knet
from models.losses import knet_losses
from models.saliency_prompt import PromptConfig, SaliencyPrompt
from stages.pseudo_label_data import EpochSampler, PseudoLabelDataset, collate_training
from stages.training import (MetricsLog, Schedule, check_finite, init_distributed, save_checkpoint,
                             seed_everything, set_lr)

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    store: Path
    images: Path
    out: Path
    model: KNetConfig = field(default_factory=lambda: KNetConfig(num_classes=1, frozen_stages=4))
    backbone_weights: Path | None = None
    epochs: int = 12
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    schedule: Schedule = field(default_factory=Schedule)
    clip_norm: float = 1.0
    prompt: PromptConfig = field(default_factory=PromptConfig)
    kernel_loss_weight: float = 1.0
    image_size: int = 800
    max_size: int = 1333
    flip_prob: float = 0.5
    workers: int = 2
    device: str = "cpu"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    resume: bool = False

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def training_step(model, prompt: SaliencyPrompt, batch: dict, cfg: PretrainConfig, step: int, device: str):
    """Losses of one batch (dict of named scalars, weights applied)."""
    images = batch["images"].to(device, non_blocking=True)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # prompt dropout / random order
    prompt_fn = None if cfg.prompt.mode == "none" else prompt.prompt_fn([t["boxes"] for t in targets], generator)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        stages, _ = model(images, prompt_fn=prompt_fn)
    stages = [{k: (v.float() if v is not None else None) for k, v in s.items()} for s in stages]
    losses, assignments = knet_losses(stages, targets)
    if cfg.kernel_loss_weight > 0:
        losses["kernel"] = cfg.kernel_loss_weight * prompt.kernel_loss(
            [s["kernels"] for s in stages[1:]], assignments[1:], [t["seed_features"] for t in targets])
    return losses


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pre-training; returns the path of the final checkpoint."""
    dist = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    dataset = PseudoLabelDataset(cfg.store, cfg.images, cfg.image_size, cfg.max_size, cfg.flip_prob, cfg.seed)
    if len(dataset) == 0:
        raise ValueError(f"{cfg.store} has no usable images")
    model = build_knet(cfg.model, cfg.backbone_weights).to(dist.device)
    prompt = SaliencyPrompt(dataset.feature_dim, cfg.model.channels, cfg.prompt).to(dist.device)
    params = [p for p in list(model.parameters()) + list(prompt.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    sampler = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
    epoch, step, start_batch = 0, 0, 0
    last = cfg.out / "last.pth"
    if cfg.resume and last.exists():
        state = torch.load(last, map_location=dist.device, weights_only=False)
        if state["store_settings_hash"] != dataset.settings_hash:
            raise ValueError(f"{last} was trained on a store with settings {state['store_settings_hash']}, "
                             f"{cfg.store} has {dataset.settings_hash}")
        model.load_state_dict(state["model"])
        prompt.load_state_dict(state["prompt"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, start_batch = state["epoch"], state["step"], state["batch_in_epoch"]
        log.info("resumed from %s at epoch %d, step %d", last, epoch, step)
    elif cfg.resume:
        log.warning("--resume: no %s yet, starting from scratch", last)
    train_model = model
    if dist.world_size > 1:
        train_model = DistributedDataParallel(model, find_unused_parameters=True)
    metrics = MetricsLog(cfg.out, enabled=dist.main)
    metrics.truncate_after(step)

    def checkpoint(epoch_: int, batch_in_epoch: int, name: str | None = None):
        if not dist.main:
            return
        state = {"model": model.state_dict(), "prompt": prompt.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch_, "step": step, "batch_in_epoch": batch_in_epoch, "args": cfg.to_dict(),
                 "model_config": dataclasses.asdict(cfg.model), "store_settings_hash": dataset.settings_hash,
                 "kind": "sp-pretrain"}
        save_checkpoint(last, state)
        if name:
            save_checkpoint(cfg.out / name, state)

    per_epoch = sampler.batches_per_epoch()
    bar = tqdm(total=cfg.epochs * per_epoch, initial=step, unit="step", desc="pretrain", disable=not dist.main)
    while epoch < cfg.epochs:
        sampler.set_epoch(epoch, start_batch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                            collate_fn=collate_training, persistent_workers=False)
        model.train()
        prompt.train()
        tick = time.perf_counter()
        for batch_in_epoch, batch in enumerate(loader, start=start_batch):
            set_lr(optimizer, cfg.schedule.factor(step, epoch))
            losses = training_step(train_model, prompt, batch, cfg, step, dist.device)
            check_finite(losses, step)
            loss = sum(losses.values())
            value = float(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            optimizer.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or batch_in_epoch + 1 == per_epoch:
                rate = cfg.batch_size * dist.world_size * (batch_in_epoch + 1 - start_batch) / (time.perf_counter() - tick)
                record = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "loss": value,
                          "grad_norm": float(grad_norm), "img_per_s": rate, **{k: float(v.detach()) for k, v in losses.items()}}
                metrics.write(record)
                bar.set_postfix(loss=f"{value:.3f}", img_s=f"{rate:.2f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(epoch, batch_in_epoch + 1)
        epoch, start_batch = epoch + 1, 0
        checkpoint(epoch, 0, f"epoch_{epoch:03d}.pth")
    bar.close()
    final = cfg.out / "final.pth"
    if dist.main:
        save_checkpoint(final, torch.load(last, map_location="cpu", weights_only=False))
        log.info("pre-training done: %s", final)
    return final
