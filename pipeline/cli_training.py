"""`sp pretrain`, `sp finetune`, `sp evaluate`, `sp predict`, `sp split` and `sp table`."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from models.settings import MaskRCNNConfig, PromptConfig, model_kind
from pipeline.cli_common import (DEFAULT_BACKBONE_WEIGHTS, Backbone, BackboneWeights, BatchSize, CheckpointEvery,
                                 DecodeImages, Device, FinetuneCheckpoint, ImageSize, LogEvery, MaxSize, Overwrite,
                                 SkipBad, Workers, app, backbone_weights_path, fail, resolve_device,
                                 settings_defaults)
from stages.settings import MASKRCNN_DEFAULTS, QUERY_MODEL_DEFAULTS, FinetuneConfig, PretrainConfig, Schedule

# The options' defaults are the stages' (docs/defaults.md): `sp pretrain` and `sp finetune` with only their paths
# run with the PretrainConfig and FinetuneConfig defaults.
PRE, FT = settings_defaults(PretrainConfig), settings_defaults(FinetuneConfig)


class Model(str, Enum):
    knet = "knet"
    mask2former = "mask2former"
    queryinst = "queryinst"
    maskrcnn = "maskrcnn"


class Prompt(str, Enum):
    cosine = "cosine"
    sequential = "sequential"
    random = "random"
    none = "none"


@app.command("pretrain")
def pretrain_cmd(
    store: Annotated[Path, typer.Option(help="Pseudo-label store from `sp gen-masks` (or import-coco).")],
    images: Annotated[Path, typer.Option(help="The images folder the store was generated from.")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints (last.pth, epoch_NNN.pth, final.pth), "
                                      "metrics.jsonl, TensorBoard logs when tensorboard is installed.")],
    model: Annotated[Model, typer.Option(help="A query-based model (knet, mask2former, queryinst), pre-trained with "
                                         "Saliency Prompts; or maskrcnn (torchvision), pre-trained on the pseudo "
                                         "masks as one class-agnostic class (CutLER's recipe, DropLoss as an option), "
                                         "without prompts (docs/maskrcnn_pretraining.md).")] = Model(model_kind(PRE.model)),
    small: Annotated[bool, typer.Option(help="CPU-sized heads (query models: 64 channels, 16 queries, fewer layers; "
                                        "Mask R-CNN: few proposals) for smoke runs and the demo; the backbone is "
                                        "still --backbone.")] = False,  # PRE.model is the full-size config
    backbone: Backbone = PRE.model.backbone,
    backbone_weights: BackboneWeights = DEFAULT_BACKBONE_WEIGHTS,
    num_queries: Annotated[Optional[int], typer.Option("--num-queries", "--num-kernels", help="Number of queries "
                                                       "(K-Net: kernels) N (default 100; 16 with --small); query "
                                                       "models only.")] = None,
    freeze_backbone: Annotated[bool, typer.Option(help="Freeze the whole backbone, as the paper's authors "
                                                  "did (CutLER trains Mask R-CNN's whole backbone: "
                                                  "--no-freeze-backbone).")] = PRE.model.frozen_stages == 4,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = PRE.epochs,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step and process.")] = PRE.batch_size,
    lr: Annotated[Optional[float], typer.Option(help=f"Learning rate (default: {QUERY_MODEL_DEFAULTS['lr']:g} AdamW "
                                                f"for query models, {MASKRCNN_DEFAULTS['lr']:g} SGD with momentum 0.9 "
                                                "for Mask R-CNN).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (default: "
                                                          f"{QUERY_MODEL_DEFAULTS['weight_decay']:g} for query models, "
                                                          f"{MASKRCNN_DEFAULTS['weight_decay']:g} for Mask R-CNN, "
                                                          "CutLER's).")] = None,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = PRE.schedule.warmup_steps,
    lr_steps: Annotated[list[int], typer.Option(help="Epochs at which the lr is multiplied by 0.1 (repeat the "
                                                "option).")] = list(PRE.schedule.lr_steps),
    clip_norm: Annotated[float, typer.Option(help="Gradient clipping max-norm.")] = PRE.clip_norm,
    prompt: Annotated[Optional[Prompt], typer.Option(help="Prompt-kernel assignment: cosine (the paper), sequential, "
                                                     "random, or none (pseudo masks only); default "
                                                     f"{QUERY_MODEL_DEFAULTS['prompt'].mode} for query models. Mask "
                                                     "R-CNN has no queries: none only.")] = None,
    prompt_drop: Annotated[Optional[float], typer.Option(help="Probability of dropping each kernel's prompt (default "
                                                         f"{QUERY_MODEL_DEFAULTS['prompt'].drop_prob:g}); query "
                                                         "models only.")] = None,
    kernel_loss_weight: Annotated[Optional[float], typer.Option(help="Weight of kernel supervision (Eq. 9; default "
                                                                f"{QUERY_MODEL_DEFAULTS['kernel_loss_weight']:g} for "
                                                                "query models); 0 disables it, and is the only value "
                                                                "Mask R-CNN takes.")] = None,
    drop_loss: Annotated[Optional[bool], typer.Option("--drop-loss/--no-drop-loss", help="Mask R-CNN only (default "
                                                      "off: chosen on held-apart photos, docs/maskrcnn_"
                                                      "pretraining.md): CutLER's DropLoss, no background loss for "
                                                      "a sampled region whose predicted box overlaps no pseudo "
                                                      "box, so that objects the pseudo masks missed are not "
                                                      "taught as background.")] = None,
    drop_loss_iou: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Mask R-CNN only: DropLoss's IoU "
                                                           "threshold; a region overlapping no pseudo box by more "
                                                           "is left out (default "
                                                           f"{MASKRCNN_DEFAULTS['drop_loss_iou']:g}, CutLER's)."
                                                           )] = None,
    image_size: ImageSize = PRE.image_size,
    max_size: MaxSize = PRE.max_size,
    flip_prob: Annotated[float, typer.Option(help="Horizontal flip probability.")] = PRE.flip_prob,
    min_mask_area: Annotated[float, typer.Option(min=0.0, max=1.0, help="Leave out the pseudo masks covering less "
                                                 "than this fraction of their photo, e.g. 0.01 (0 keeps all; each "
                                                 "epoch logs how many were left out).")] = PRE.min_mask_area,
    workers: Workers = PRE.workers,
    device: Device = "auto",
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order, flips and prompt dropout.")] = PRE.seed,
    log_every: LogEvery = PRE.log_every,
    checkpoint_every: CheckpointEvery = PRE.checkpoint_every,
    keep_every: Annotated[int, typer.Option(help="Keep epoch_NNN.pth every N epochs (0: last.pth and final.pth "
                                            "only).")] = PRE.keep_every,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pth exactly where it stopped (a run with "
                                         "other settings is refused).")] = PRE.resume,
    overwrite: Overwrite = PRE.overwrite,
):
    """Stage 2a: pre-train a query-based model on the pseudo-label store with Saliency Prompts and kernel
    supervision, or Mask R-CNN on its pseudo masks with DropLoss. Multi-GPU: `torchrun --nproc_per_node N -m
    pipeline.cli pretrain ...`."""
    from models.build import query_model_config
    from stages.pretrain import pretrain

    prompt_fields = {k: v for k, v in (("mode", prompt and prompt.value), ("drop_prob", prompt_drop)) if v is not None}
    try:
        if model == Model.maskrcnn:
            if num_queries is not None:
                raise ValueError(f"--num-queries {num_queries}: Mask R-CNN has no queries (query models only)")
            model_config = (MaskRCNNConfig.small if small else MaskRCNNConfig)(
                backbone=backbone, num_classes=1, min_size=image_size, max_size=max_size,
                frozen_stages=4 if freeze_backbone else 1)
        else:
            model_config = query_model_config(model.value, small=small, backbone=backbone, num_queries=num_queries,
                                              num_classes=1, frozen_stages=4 if freeze_backbone else 1)
        cfg = PretrainConfig(
            store=store, images=images, out=out, model=model_config,
            backbone_weights=backbone_weights_path(backbone, backbone_weights), epochs=epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            schedule=Schedule(warmup_steps=warmup_steps, lr_steps=tuple(lr_steps)), clip_norm=clip_norm,
            prompt=PromptConfig(**prompt_fields) if prompt_fields else None, kernel_loss_weight=kernel_loss_weight,
            drop_loss=drop_loss, drop_loss_iou=drop_loss_iou, image_size=image_size, max_size=max_size,
            flip_prob=flip_prob, min_mask_area=min_mask_area, workers=workers, device=resolve_device(device),
            seed=seed, log_every=log_every, checkpoint_every=checkpoint_every, keep_every=keep_every, resume=resume,
            overwrite=overwrite)
    except ValueError as e:
        fail(str(e))
    try:
        final = pretrain(cfg)
    except (ValueError, OSError, FloatingPointError) as e:
        fail(str(e))
    typer.echo(f"wrote {final}")


@app.command("finetune")
def finetune_cmd(
    train_ann: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="COCO JSON of the labeled training set.")],
    train_images: Annotated[Path, typer.Option(help="Its image folder.")],
    val_ann: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="COCO JSON evaluated every --eval-every epochs.")],
    val_images: Annotated[Path, typer.Option(help="Its image folder.")],
    out: Annotated[Path, typer.Option(help="Run folder: last/best/final.pth, metrics.jsonl, curve.png, and eval.json "
                                      "(the last epoch's AP, as `sp evaluate --out` writes it).")],
    model: Annotated[Model, typer.Option(help="knet, mask2former, queryinst, or maskrcnn (torchvision, the CNN "
                                         "baseline).")] = Model(FT.model),
    small: Annotated[bool, typer.Option(help="CPU-sized heads (query models: 64 channels, 16 queries; Mask R-CNN: "
                                        "few proposals) for smoke runs and the demo; the backbone is still "
                                        "--backbone.")] = FT.small,
    backbone: Backbone = FT.backbone,
    init: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="A `sp pretrain` checkpoint of "
                                                 "the same --model: backbone, neck and heads are loaded, the "
                                                 "class-specific layers (classifier; Mask R-CNN: box and mask "
                                                 "predictors) are rebuilt for these categories where their number "
                                                 "differs, prompt modules are dropped.")] = FT.init,
    init_reset: Annotated[Optional[list[str]], typer.Option(help="A tensor-name prefix whose tensors keep their fresh "
                                                            "initialisation instead of --init's (repeat the option), "
                                                            "e.g. model.roi_heads.box_predictor for Mask R-CNN's box "
                                                            "classifier and regressor: the last layers a fine-tuning "
                                                            "to other classes gets new.")] = list(FT.init_reset) or None,
    backbone_weights: BackboneWeights = DEFAULT_BACKBONE_WEIGHTS,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (the paper: 48 on COCO 10 %).")] = FT.epochs,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step and process.")] = FT.batch_size,
    repeat: Annotated[int, typer.Option(min=1, help="Each epoch passes over the labeled images this many times (each "
                                        "pass with its own flips and rotations), as the reference's RepeatDataset: "
                                        "label budgets of different sizes then share one schedule in "
                                        "steps.")] = FT.repeat,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 1e-4 AdamW for query models, 0.02 SGD "
                                                "for Mask R-CNN).")] = FT.lr,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (default 0.05 query models, 1e-4 "
                                                          "Mask R-CNN).")] = FT.weight_decay,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = FT.schedule.warmup_steps,
    lr_steps: Annotated[list[int], typer.Option(help="Epochs at which the lr is multiplied by 0.1 (repeat the "
                                                "option).")] = list(FT.schedule.lr_steps),
    clip_norm: Annotated[float, typer.Option(help="Gradient clipping max-norm.")] = FT.clip_norm,
    flip_prob: Annotated[float, typer.Option(help="Horizontal flip probability.")] = FT.flip_prob,
    rotate: Annotated[float, typer.Option(help="Random rotation up to this many degrees on half of the images "
                                          "(§4.1: 9).")] = FT.rotate_deg,
    image_size: ImageSize = FT.image_size,
    max_size: MaxSize = FT.max_size,
    mask_threshold: Annotated[Optional[float], typer.Option(help="Query models' test-time mask threshold (default: "
                                                            "the model's: K-Net 0.3, as its authors on COCO and "
                                                            "chosen so on held-apart photos here; Mask2Former and "
                                                            "QueryInst 0.5).")] = FT.mask_threshold,
    max_per_image: Annotated[int, typer.Option(help="Detections kept per image (top-k over queries x "
                                               "classes).")] = FT.max_per_image,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate on the validation set every N "
                                            "epochs.")] = FT.eval_every,
    eval_at: Annotated[Optional[list[int]], typer.Option(help="Evaluate after these epochs (repeat the option) "
                                                         "and the last, instead of every "
                                                         "--eval-every.")] = list(FT.eval_at) or None,
    workers: Workers = FT.workers,
    device: Device = "auto",
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order and augmentation.")] = FT.seed,
    log_every: LogEvery = FT.log_every,
    checkpoint_every: CheckpointEvery = FT.checkpoint_every,
    keep_every: Annotated[int, typer.Option(help="Keep epoch_NNN.pth every N epochs (0: last, best and final "
                                            "only).")] = FT.keep_every,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pth exactly where it stopped (a run with "
                                         "other settings is refused); an evaluation the run was stopped in is "
                                         "done again, the last one too (eval.json).")] = FT.resume,
    overwrite: Overwrite = FT.overwrite,
    frozen_stages: Annotated[int, typer.Option(min=0, max=4, help="Backbone stem + this many of its four stages "
                                               "frozen (the paper: 1; 4: the whole backbone).")] = FT.frozen_stages,
    class_agnostic: Annotated[bool, typer.Option(help="Merge all categories into one ('fg') for training and "
                                                 "evaluation: the localisation and shape prior "
                                                 "alone.")] = FT.class_agnostic,
    skip_bad: SkipBad = FT.skip_bad,
    decode_images: DecodeImages = FT.decode_images,
):
    """Stage 2b: fine-tune on a small labeled set, with mask and box AP on the validation set every epoch."""
    from stages.finetune import finetune

    cfg = FinetuneConfig(
        train_ann=train_ann, train_images=train_images, val_ann=val_ann, val_images=val_images, out=out,
        model=model.value, small=small, backbone=backbone, init=init, init_reset=tuple(init_reset or ()),
        backbone_weights=backbone_weights_path(backbone, backbone_weights),
        epochs=epochs, batch_size=batch_size, repeat=repeat, lr=lr, weight_decay=weight_decay,
        schedule=Schedule(warmup_steps=warmup_steps, lr_steps=tuple(lr_steps)), clip_norm=clip_norm,
        flip_prob=flip_prob, rotate_deg=rotate, image_size=image_size, max_size=max_size,
        mask_threshold=mask_threshold, max_per_image=max_per_image, eval_every=eval_every, workers=workers,
        device=resolve_device(device), seed=seed, log_every=log_every, checkpoint_every=checkpoint_every,
        keep_every=keep_every, resume=resume, overwrite=overwrite, skip_bad=skip_bad, decode_images=decode_images,
        class_agnostic=class_agnostic, eval_at=tuple(eval_at or ()), frozen_stages=frozen_stages)
    try:
        final = finetune(cfg)
    except (ValueError, OSError, FloatingPointError) as e:
        fail(str(e))
    typer.echo(f"wrote {final}")


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: FinetuneCheckpoint,
    ann: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="COCO instances JSON to evaluate on.")],
    images: Annotated[Path, typer.Option(help="Its image folder.")],
    out: Annotated[Optional[Path], typer.Option(help="Write the metrics (JSON) here, and the COCO results "
                                                "(RLE segmentations) next to it as *.results.json.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Test short side (default: the training one).")] = None,
    max_size: Annotated[Optional[int], typer.Option(help="Test long-side cap (default: the training one).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch. 1 (default): every image alone, as "
                                            "fine-tuning evaluates; in a padded batch K-Net's mask pooling and "
                                            "GroupNorm see the padding, so results depend on batch partners.")] = 1,
    workers: Workers = 2,
    device: Device = "auto",
    skip_bad: Annotated[bool, typer.Option(help="Leave out the images and annotations that the up-front check "
                                           "finds bad (listed in OUT's *.skipped.json), instead of stopping; "
                                           "AP is then that of the rest.")] = False,
    class_agnostic: Annotated[bool, typer.Option(help="Merge all categories into one (and every prediction into "
                                                 "it): class-agnostic AP. Automatic for a model fine-tuned with "
                                                 "--class-agnostic and for a `sp pretrain` checkpoint (the paper's "
                                                 "Table 6), which this command also evaluates.")] = False,
    decode_images: DecodeImages = False,
    mask_threshold: Annotated[Optional[float], typer.Option(help="Test-time mask threshold (default: the one the "
                                                            "model was fine-tuned with).")] = None,
    mask_quality_score: Annotated[bool, typer.Option(help="K-Net: rank detections by class score x the mean mask "
                                                     "probability inside the mask (Mask2Former's rule) instead of "
                                                     "the class score alone (K-Net's).")] = False,
):
    """Mask and box AP, AP50, AP75, APs, APm, APl of a fine-tuned (or, class-agnostic, a pre-trained) model
    (faster-coco-eval when installed)."""
    from stages.coco_check import EVALUATION, load_checked_coco, same_categories, write_skipped
    from stages.coco_data import one_class
    from stages.evaluate import format_ap_table
    from stages.finetune import evaluate_model, evaluation_record
    from stages.inference import load_checkpoint_model

    try:
        dev = resolve_device(device)
        checked = load_checked_coco(ann, images, EVALUATION, skip_bad, decode_images)
        model, state = load_checkpoint_model(checkpoint, dev, pretrained_ok=True, mask_threshold=mask_threshold,
                                             mask_quality_score=mask_quality_score)
        args = state["args"]
        # a pre-trained model has one class, 'fg': it is scored class-agnostically, as the paper's Table 6
        agnostic = class_agnostic or state["kind"] == "sp-pretrain" or args.get("class_agnostic", False)
        data = one_class(checked.data) if agnostic else checked.data
        if not agnostic:
            same_categories(state["categories"], data["categories"], f"{checkpoint} and --ann {ann}")
        metrics, results = evaluate_model(model, state["model_kind"], data, images, image_size or args["image_size"],
                                          max_size or args["max_size"], dev, batch_size, workers, data["categories"])
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(format_ap_table(metrics))
    if out is not None:
        out.write_text(json.dumps(evaluation_record(metrics, state), indent=2))
        out.with_suffix(".results.json").write_text(json.dumps(results))
        write_skipped({"ann": checked.skipped}, out.with_suffix(".skipped.json"))


@app.command("predict")
def predict_cmd(
    checkpoint: FinetuneCheckpoint,
    images_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Folder for results.json (COCO results, RLE) and PNG overlays.")],
    score_threshold: Annotated[float, typer.Option(help="Keep detections at least this confident.")] = 0.3,
    overlays: Annotated[int, typer.Option(help="Draw overlays for the first N images (0: none).")] = 16,
    batch_size: BatchSize = 2,
    workers: Workers = 2,
    device: Device = "auto",
):
    """Instances for a folder of images: COCO results JSON (image_id = position + 1, file_name given) and overlays."""
    from stages.inference import load_checkpoint_model
    from stages.predict import predict_folder

    try:
        dev = resolve_device(device)
        model, state = load_checkpoint_model(checkpoint, dev)
        path = predict_folder(model, state, images_dir, out, score_threshold, overlays, dev, batch_size, workers)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(f"wrote {path}")


@app.command("table")
def table_cmd(
    eval_files: Annotated[Optional[list[Path]], typer.Argument(exists=True, dir_okay=False,
                                                               help="`sp evaluate --out` JSON files.")] = None,
    names: Annotated[str, typer.Option(help="Comma-separated row names, one per file; files under one name are "
                                       "seeds of one setting (mean ± sd).")] = "",
    out: Annotated[Path, typer.Option(help="Output prefix: writes OUT.md, OUT.json (and OUT_curves.png).")] = ...,
    metrics: Annotated[Optional[list[Path]], typer.Option(exists=True, dir_okay=False, help="The runs' "
                                                          "metrics.jsonl, one per file in the same order (repeat "
                                                          "the option): learning curves, early-epoch AP and each "
                                                          "run's wall minutes.")] = None,
    early_epochs: Annotated[Optional[list[int]], typer.Option(help="Add a column of mask AP after this fine-tuning "
                                                              "epoch (repeat the option; needs --metrics).")] = None,
    pseudo_masks: Annotated[Optional[list[str]], typer.Option(help="NAME=FILE of `sp eval-masks --out`: adds the "
                                                              "pseudo-mask quality of that store (repeat).")] = None,
    decimals: Annotated[int, typer.Option(min=0, max=4, help="Digits after the point of every number (AP in "
                                          "percent); 2 where AP is below 1 %, as with a few hundred labels on CPU.")] = 1,
    include: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="OUT.json of an earlier `sp "
                                                    "table` (e.g. a committed results file): its seeds are kept, but "
                                                    "for those whose evaluation file this call reads again (the "
                                                    "same path, however spelled), so runs no longer on disk stay in "
                                                    "the table; so is its pseudo-mask quality, unless "
                                                    "--pseudo-masks gives new.")] = None,
    rows: Annotated[str, typer.Option(help="Comma-separated rows of the table, in order (default: the --names, "
                                      "then the rows of --include).")] = "",
    replace_fileless: Annotated[bool, typer.Option(help="A row given evaluation files here drops the seeds that "
                                                   "--include recorded without a file (tables from before records "
                                                   "named their file, which cannot be matched); without it such "
                                                   "a row is an error.")] = False,
    allow_mixed: Annotated[bool, typer.Option(help="Average seeds that ran different code versions (by the hash "
                                              "of the package's source; runs from before versions were recorded "
                                              "count as one unknown version) instead of refusing the row; the "
                                              "table then has a 'versions' column, OUT.json lists them.")] = False,
):
    """Mask and box AP tables of several evaluated runs, printed and written as markdown and JSON."""
    from stages.report import write_table

    quality = {}
    for entry in pseudo_masks or []:
        name, sep, path = entry.partition("=")
        if not sep or not Path(path).is_file():
            fail(f"--pseudo-masks {entry!r}: expected NAME=FILE with an existing file")
        quality[name] = Path(path)
    try:
        typer.echo(write_table(eval_files or [], [n for n in names.split(",") if n], out, metrics or [],
                               tuple(early_epochs or ()), quality, decimals, include, [r for r in rows.split(",") if r],
                               replace_fileless, allow_mixed))
    except (ValueError, OSError, KeyError) as e:
        fail(str(e))


def display_names(paths: list[Path], names: Optional[str], what: str) -> list[str]:
    """--names split at commas (one per path), or else the shortest path endings that tell the paths apart
    (runs/sp/last.pth and runs/scratch/last.pth → sp/last, scratch/last)."""
    if names is not None:
        listed = names.split(",")
        if len(listed) != len(paths):
            fail(f"--names gives {len(listed)} names for {len(paths)} {what}")
        return listed
    parts = [(p.resolve().parent / p.stem if p.suffix and not p.is_dir() else p.resolve()).parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        endings = ["/".join(p[-depth:]) for p in parts]
        if len(set(endings)) == len(endings):
            break
    return endings


Checkpoints = Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="Checkpoints, one column or row each.")]
Names = Annotated[Optional[str], typer.Option(help="Comma-separated display names, one per argument (default: "
                                              "the shortest path endings that tell them apart).")]
ImagesDir = Annotated[Path, typer.Option(exists=True, file_okay=False, help="Folder of images.")]
OutPng = Annotated[Path, typer.Option(help="The PNG to write.")]


@app.command("prompt-stats")
def prompt_stats_cmd(
    checkpoint: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A `sp pretrain` checkpoint "
                                               "trained with prompts.")],
    store: Annotated[Path, typer.Option(help="The pseudo-label store it was pre-trained on.")],
    images: Annotated[Path, typer.Option(help="The images folder of the store.")],
    out: Annotated[Optional[Path], typer.Option(help="Also write the statistics (means and per image) as JSON.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the store's first K images.")] = None,
    device: Device = "auto",
):
    """How the Saliency Prompt acts in a pre-trained model: pseudo masks per image, queries prompted, distinct
    prompts, and whether the query matched to pseudo mask l received prompt l (prompt dropout off)."""
    from stages.prompt_stats import format_stats, prompt_stats

    try:
        stats = prompt_stats(checkpoint, store, images, limit, resolve_device(device))
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(format_stats(stats))
    if out is not None:
        out.write_text(json.dumps(stats, indent=2))


@app.command("plot-losses")
def plot_losses_cmd(
    runs: Annotated[list[Path], typer.Argument(exists=True, help="Run folders of `sp pretrain` / `sp finetune` "
                                               "(or their metrics.jsonl files).")],
    out: OutPng,
    names: Names = None,
):
    """Training losses of runs side by side: a panel per loss term (loss, s0_dice, ..., kernel), a line per run."""
    from stages.report import plot_losses

    files = [run / "metrics.jsonl" if run.is_dir() else run for run in runs]
    labels = display_names([f.parent for f in files], names, "runs")
    try:
        typer.echo(f"wrote {plot_losses(files, labels, out)}")
    except (ValueError, OSError) as e:
        fail(str(e))


@app.command("kernel-maps")
def kernel_maps_cmd(
    checkpoints: Checkpoints,
    images: ImagesDir,
    out: Annotated[Path, typer.Option(help="The PNG grid; the maps go next to it as OUT_STEM.NAME.npy (N, S, S).")],
    names: Names = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N images (sorted by path).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Short side (default: the checkpoint's training one).")] = None,
    max_size: Annotated[Optional[int], typer.Option(help="Long-side cap (default: the checkpoint's training one).")] = None,
    canvas: Annotated[int, typer.Option(min=4, help="Side S of the map in normalised image coordinates.")] = 64,
    columns: Annotated[int, typer.Option(min=0, help="Maps per row (0: all N kernels of a checkpoint in one row).")] = 0,
    workers: Workers = 2,
    device: Device = "auto",
):
    """Figure 6: each K-Net kernel's mask probability averaged over a folder of images, a row per checkpoint."""
    from stages.kernel_maps import write_kernel_maps

    labels = display_names(checkpoints, names, "checkpoints")
    try:
        paths = write_kernel_maps(checkpoints, labels, images, out, limit, image_size, max_size,
                                  resolve_device(device), canvas, columns, workers)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo("\n".join(f"wrote {p}" for p in paths))


@app.command("compare")
def compare_cmd(
    checkpoints: Checkpoints,
    images: ImagesDir,
    out: OutPng,
    names: Names = None,
    files: Annotated[Optional[str], typer.Option(help="Comma-separated image files (relative to --images) to show.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Without --files: the first N images (sorted by path).")] = 4,
    score_threshold: Annotated[float, typer.Option(help="Draw detections at least this confident.")] = 0.3,
    ann: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="COCO instances JSON of the "
                                                "images: adds a ground-truth column first.")] = None,
    workers: Workers = 2,
    device: Device = "auto",
):
    """Fine-tuned checkpoints' predictions on the same photos side by side: a column per checkpoint, a row per photo."""
    from stages.plots import save
    from stages.compare import comparison_figure

    labels = display_names(checkpoints, names, "checkpoints")
    try:
        figure = comparison_figure(checkpoints, labels, images, files.split(",") if files else None, limit,
                                   score_threshold, ann, resolve_device(device), workers)
        typer.echo(f"wrote {save(figure, out)}")
    except (ValueError, OSError) as e:
        fail(str(e))


@app.command("split")
def split(
    instances: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                              help="COCO instances JSON to split, e.g. instances_train2017.json.")],
    out: Annotated[Path, typer.Option(help="Folder for STEM.SEED@PERCENT_labeled.json and _unlabeled.json.")],
    percent: Annotated[Optional[float], typer.Option(help="Percent of images to label (0 < p < 100); with "
                                                     "--ids-file, picks the entry of an Unbiased-Teacher "
                                                     "COCO_supervision.txt.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (or the Unbiased-Teacher seed key).")] = 1,
    ids_file: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="Labeled image ids: text "
                                                     "(one per line, # comments), JSON list, or Unbiased-Teacher "
                                                     "COCO_supervision.txt (needs --percent and --seed).")] = None,
    class_agnostic: Annotated[bool, typer.Option(help="Write both parts with all categories merged into one "
                                                 "('fg'); names gain '.agnostic'.")] = False,
    skip_bad: Annotated[bool, typer.Option(help="Leave the images and annotations that the check of the file finds "
                                           "bad out of both parts (listed in OUT/STEM.skipped.json), instead of "
                                           "stopping.")] = False,
):
    """Low-data split of a COCO JSON: a labeled subset and the rest, deterministic for a seed."""
    from stages.split import split_command

    try:
        labeled, unlabeled = split_command(instances, out, percent, seed, ids_file, skip_bad, class_agnostic)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(f"{labeled}\n{unlabeled}")
