"""Stage 2b, `sp finetune`: a query-based model (K-Net, Mask2Former, QueryInst) or the torchvision Mask R-CNN
baseline, optionally from a `sp pretrain` checkpoint of the same model, on a small labeled COCO set, evaluated
every `eval_every` epochs (paper §4.1, Figures 3-4).

Writes into the run folder: last.pth / final.pth (epoch_NNN.pth with keep_every), best.pth (highest mask AP on --val-ann:
report on another split, or report last.pth), metrics.jsonl with the AP curve, and curve.png.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.backbone_weights import weights_record
from models.build import build_query_model, query_model_config
from models.maskrcnn import MaskRCNNConfig, build_maskrcnn_adapter, maskrcnn_optimizer
from stages.plots import line_chart
from stages.coco_check import EVALUATION, TRAINING, checked_data, load_checked_coco, same_categories, write_skipped
from stages.coco_data import CocoInstances, one_class
from stages.code_version import code_version
from stages.evaluate import coco_evaluate, predictions_to_results
from stages.inference import predict_images, unnormalise_batch
from stages.pseudo_label_data import collate_training
from stages.settings import FinetuneConfig
from stages.training import (config_dict, forward_losses, init_distributed, link_checkpoint, prepare_run_folder,
                             read_checkpoint, seed_everything, train_loop)

log = logging.getLogger(__name__)
PRETRAIN_ONLY = ("prompt",)  # checkpoint entries that fine-tuning never loads


def transfer_weights(model: nn.Module, state: dict[str, torch.Tensor], reset: tuple[str, ...] = ()
                     ) -> dict[str, list[str]]:
    """Copy every tensor whose name and shape match, except those under a `reset` prefix; report what was loaded,
    what kept its fresh initialisation (shape differs, e.g. a classifier for other classes, absent from the
    checkpoint, or reset), and what the checkpoint had that the model does not use."""
    own = model.state_dict()
    for prefix in reset:
        if not any(k.startswith(prefix) for k in own):
            parent = prefix.rpartition(".")[0]  # the tensors beside the misspelt name
            near = [k for k in own if k.startswith(parent)]
            raise ValueError(f"--init-reset {prefix} names no tensor of this model (its tensors under "
                             f"{parent or 'the root'}: {', '.join(near[:12])}{', ...' if len(near) > 12 else ''})")
    is_reset = lambda k: k.startswith(tuple(reset))
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape and not is_reset(k)]
    reinitialised = sorted([k for k, v in state.items() if k in own and (own[k].shape != v.shape or is_reset(k))] +
                           [k for k in own if k not in state])
    ignored = sorted(k for k in state if k not in own)
    model.load_state_dict({**own, **{k: state[k] for k in loaded}})
    return {"loaded": loaded, "reinitialised": reinitialised, "ignored": ignored}


# Model settings that may differ between pre-training and fine-tuning (classes, freezing, image size, test-time
# and loss settings); any other difference is another architecture, whose tensors would silently stay random.
FREE_MODEL_SETTINGS = {"num_classes", "frozen_stages", "norm_eval", "mask_threshold_test", "max_per_image",
                       "mask_quality_score", "num_points", "oversample_ratio", "importance_sample_ratio",
                       "min_size", "max_size", "mask_threshold"}  # the last three: Mask R-CNN's


def load_pretrained(model: nn.Module, path: Path, kind: str, reset: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Initialise `model` (of model kind `kind`) from a `sp pretrain` checkpoint of the same kind of model; the
    tensors under a `reset` name prefix keep their fresh initialisation."""
    state = read_checkpoint(path, "--init")
    if state.get("kind") != "sp-pretrain":
        raise ValueError(f"--init {path} is not a `sp pretrain` checkpoint (kind {state.get('kind')!r})")
    trained = state.get("model_kind", "knet")  # checkpoints from before other models existed are K-Net's
    if trained != kind:
        raise ValueError(f"--init {path} pre-trained a {trained} model; it cannot initialise --model {kind}")
    saved, built = state.get("model_config"), getattr(model, "cfg", None)
    if isinstance(saved, dict) and dataclasses.is_dataclass(built):
        built = dataclasses.asdict(built)
        differ = sorted(k for k in saved.keys() | built.keys() if k not in FREE_MODEL_SETTINGS
                        and saved.get(k) != built.get(k))
        if differ:
            raise ValueError(f"--init {path} is another architecture than this model ("
                             + ", ".join(f"{k}: checkpoint={saved.get(k)!r} now={built.get(k)!r}" for k in differ)
                             + "); fine-tune with the pre-training's model settings (e.g. --small, --backbone)")
    report = transfer_weights(model, state["model"], reset)
    report["ignored"] += [f"{name}.*" for name in PRETRAIN_ONLY if name in state]
    log.info("--init %s: loaded %d tensors, re-initialised %d (%s), ignored %d (%s)", path, len(report["loaded"]),
             len(report["reinitialised"]), ", ".join(report["reinitialised"][:6]) or "-", len(report["ignored"]),
             ", ".join(report["ignored"][:6]) or "-")
    return report


def build(cfg: FinetuneConfig, num_classes: int):
    """(model, model_config dict, optimizer) for cfg.model."""
    if cfg.model == "maskrcnn":
        mc = (MaskRCNNConfig.small if cfg.small else MaskRCNNConfig)(
            backbone=cfg.backbone, num_classes=num_classes, min_size=cfg.image_size, max_size=cfg.max_size,
            frozen_stages=cfg.frozen_stages)
        model = build_maskrcnn_adapter(mc, cfg.backbone_weights)
        if cfg.init is not None:
            load_pretrained(model, cfg.init, cfg.model, cfg.init_reset)
        optimizer = maskrcnn_optimizer(model, lr=cfg.lr or 0.02,
                                       weight_decay=1e-4 if cfg.weight_decay is None else cfg.weight_decay)
        return model, mc, optimizer
    threshold = {} if cfg.mask_threshold is None else {"mask_threshold_test": cfg.mask_threshold}
    mc = query_model_config(cfg.model, small=cfg.small, backbone=cfg.backbone, num_classes=num_classes,
                            frozen_stages=cfg.frozen_stages, max_per_image=cfg.max_per_image, **threshold)
    model = build_query_model(mc, cfg.backbone_weights)
    if cfg.init is not None:
        load_pretrained(model, cfg.init, cfg.model, cfg.init_reset)
    lr = cfg.lr or 1e-4
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": backbone, "lr": lr * cfg.backbone_lr_mult}],
                                  weight_decay=0.05 if cfg.weight_decay is None else cfg.weight_decay)
    return model, mc, optimizer


def maskrcnn_losses(model: nn.Module, batch: dict, device: str) -> dict[str, torch.Tensor]:
    """Mask R-CNN's losses on a `collate_training` batch (labeled photos or pseudo masks): the images as 0-1 RGB
    crops of their valid region (it normalises and resizes them itself), each object's full-resolution mask,
    box and label. `model`: a MaskRCNNAdapter, or one wrapped in DistributedDataParallel."""
    images = unnormalise_batch(batch["images"].to(device), batch["image_hw"])
    targets = [{"masks": t["full_masks"][:, :h, :w].to(device), "boxes": t["boxes"].to(device),
                "labels": t["labels"].to(device)} for t, (h, w) in zip(batch["targets"], batch["image_hw"])]
    return model(images, targets)


def loss_function(model: nn.Module, kind: str, device: str):
    def query_model_loss(batch, step):
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        return forward_losses(model, batch["images"].to(device), targets, device)[1]

    def maskrcnn_loss(batch, step):
        return maskrcnn_losses(model, batch, device)

    return maskrcnn_loss if kind == "maskrcnn" else query_model_loss


def evaluate_model(model: nn.Module, kind: str, ann: Path | dict, images: Path, image_size: int, max_size: int,
                   device: str, batch_size: int = 1, workers: int = 2,
                   categories: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """COCO segm and bbox AP of a model on a labeled set (a COCO file, checked here, or a dataset dict already
    checked with `EVALUATION`), and the COCO results list. categories: the model's (label l ↔ the l-th id in
    sorted order); the set's must be the same. Default: the set's own.

    batch_size 1 by default: in a padded batch, K-Net's mask pooling and the GroupNorm statistics of its
    necks see the padding, so an image's predictions would depend on the image it is batched with. With one
    category (class-agnostic evaluation) every prediction counts as that category, whatever the model's class."""
    data = checked_data(ann, images, EVALUATION)
    if categories is not None:
        same_categories(categories, data["categories"], "the model's categories and the evaluation set's")
    category_ids = sorted(c["id"] for c in (categories or data["categories"]))
    images_sorted = sorted(data["images"], key=lambda img: img["id"])
    names = [img["file_name"] for img in images_sorted]
    results = []
    for index, prediction in predict_images(model, kind, images, names, image_size, max_size, device,
                                            batch_size, workers):
        if len(category_ids) == 1:
            prediction["labels"] = torch.zeros_like(prediction["labels"])
        # RLE at once: the full-size masks of a whole evaluation set would not fit in memory
        results += predictions_to_results([prediction], [images_sorted[index]["id"]], category_ids)
    return coco_evaluate(data, results), results


def evaluation_record(metrics: dict, checkpoint: dict) -> dict:
    """What `sp finetune` writes to eval.json and `sp evaluate --out` to its file: the metrics, the code version
    the checkpoint was trained with ('code_version'; None for checkpoints from before it was recorded) and the
    one evaluating it ('eval_code_version'), so that `sp table` knows which code a seed ran from the file alone."""
    return {**metrics, "code_version": checkpoint.get("code_version"), "eval_code_version": code_version()}


def finetune(cfg: FinetuneConfig) -> Path:
    """Run (or resume) fine-tuning; returns the final checkpoint."""
    if cfg.init_reset and cfg.init is None:
        raise ValueError(f"--init-reset {', '.join(cfg.init_reset)} needs --init (a pre-trained model to reset)")
    dist = init_distributed(cfg.device)
    # Every input is checked before anything is written: labels and images, --init, then the run folder.
    train = load_checked_coco(cfg.train_ann, cfg.train_images, TRAINING, cfg.skip_bad, cfg.decode_images)
    val = load_checked_coco(cfg.val_ann, cfg.val_images, EVALUATION, cfg.skip_bad, cfg.decode_images)
    same_categories(train.data["categories"], val.data["categories"], f"{cfg.train_ann} and {cfg.val_ann}")
    train_data, val_data = (one_class(train.data), one_class(val.data)) if cfg.class_agnostic else (train.data, val.data)
    seed_everything(cfg.seed)
    dataset = CocoInstances(train_data, cfg.train_images, cfg.image_size, cfg.max_size, cfg.flip_prob,
                            cfg.rotate_deg, cfg.seed, cfg.repeat)
    model, model_config, optimizer = build(cfg, len(dataset.categories))
    prepare_run_folder(cfg, "sp-finetune", config_dict(cfg), dist.main)
    if dist.main:
        write_skipped({"train": train.skipped, "val": val.skipped}, cfg.out / "skipped.json")
    model = model.to(dist.device)
    train_model = DistributedDataParallel(model) if dist.world_size > 1 else model
    previous = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()] \
        if cfg.resume and (cfg.out / "metrics.jsonl").exists() else []
    best = {"AP": max((r["segm_AP"] for r in previous if "segm_AP" in r), default=float("-inf"))}
    extra = {"args": config_dict(cfg), "model_kind": cfg.model, "model_config": dataclasses.asdict(model_config),
             "categories": dataset.categories, "kind": "sp-finetune", **weights_record(cfg.backbone_weights)}

    def on_epoch_end(epoch: int) -> dict:
        due = epoch in cfg.eval_at if cfg.eval_at else epoch % cfg.eval_every == 0
        if not dist.main or not (due or epoch == cfg.epochs):
            return {}
        metrics, _ = evaluate_model(model, cfg.model, val_data, cfg.val_images, cfg.image_size, cfg.max_size,
                                    dist.device, workers=cfg.workers, categories=dataset.categories)
        record = {f"{t}_{k}": v for t in ("segm", "bbox") for k, v in metrics[t].items()}
        log.info("epoch %d: mask AP %.1f, box AP %.1f", epoch, record["segm_AP"], record["bbox_AP"])
        if record["segm_AP"] > best["AP"]:
            best["AP"] = record["segm_AP"]
            link_checkpoint(cfg.out / "last.pth", cfg.out / "best.pth")
        plot_curve(cfg.out)
        if epoch == cfg.epochs:  # the run's result, as `sp evaluate --out` writes it (last.pth: maybe another process's)
            trained = read_checkpoint(cfg.out / "last.pth", "--resume", mmap=True)
            (cfg.out / "eval.json").write_text(json.dumps(evaluation_record(metrics, trained), indent=2))
        return record

    return train_loop(cfg, dist, {"model": model}, optimizer, dataset, collate_training,
                      loss_function(train_model, cfg.model, dist.device), extra, on_epoch_end=on_epoch_end)


def plot_curve(run: Path) -> Path:
    """curve.png: mask and box AP against epochs, from metrics.jsonl (the paper's Figures 3-4)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "segm_AP" in r]
    series = {"mask AP": [[(r["epoch"], r["segm_AP"]) for r in evals]],
              "box AP": [[(r["epoch"], r["bbox_AP"]) for r in evals]]}
    return line_chart(series, run / "curve.png", title=f"{run.parent.name}/{run.name}: AP on the validation set",
                      xlabel="epoch", ylabel="AP (%)")
