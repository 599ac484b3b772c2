"""The `sp` command line. Each command is a thin wrapper over one function of `stages/` or `store/`,
so everything the CLI (and the Snakemake workflow) does can be done from Python too."""
from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Saliency-Prompt pre-training for query-based instance segmentation (CVPR 2023).")
store_app = typer.Typer(no_args_is_help=True, help="Inspect, merge, export and import pseudo-label stores.")
app.add_typer(store_app, name="store")
log = logging.getLogger("sp")


class Method(str, Enum):
    saliency = "saliency"
    random = "random"


class Nms(str, Enum):
    matrix = "matrix"
    greedy = "greedy"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: CUDA is not available on this machine")
    return device


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:  # COCOeval's own summary lines; we print our table instead
        logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


def fail(message: str):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


Backbone = Annotated[str, typer.Option(help="torchvision ResNet: resnet18, resnet34, resnet50 or resnet101.")]
BackboneWeights = Annotated[Optional[Path], typer.Option(
    exists=True, dir_okay=False, help="Local weights file: torchvision, MoCo-v2/DenseCL (module.encoder_q.), "
    "mmselfsup (backbone.) or detectron2 (.pkl) layout. Without it the backbone is random (a warning says so).")]
ImageSize = Annotated[int, typer.Option(help="Short side of the backbone input, in pixels.")]
MaxSize = Annotated[int, typer.Option(help="Cap on the long side of the backbone input.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per backbone batch.")]
Workers = Annotated[int, typer.Option(min=0, help="DataLoader processes decoding images.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (cuda when available).")]
FinetuneCheckpoint = Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A `sp finetune` checkpoint.")]


@app.command("gen-masks")
def gen_masks(
    images_dir: Annotated[Path, typer.Argument(help="Folder of unlabeled images (searched recursively).")],
    store: Annotated[Path, typer.Option(help="Output store (a .zarr directory). Rerun the same command to resume.")],
    method: Annotated[Method, typer.Option(help="saliency (the paper) or random boxes (Table 7 baseline).")] = Method.saliency,
    backbone: Backbone = "resnet50",
    backbone_weights: BackboneWeights = None,
    image_size: ImageSize = 800,
    max_size: MaxSize = 1333,
    batch_size: BatchSize = 8,
    workers: Workers = 2,
    device: Device = "auto",
    shard: Annotated[Optional[str], typer.Option(help="I/N: process the I-th of N contiguous parts into "
                                                 "STORE_STEM.partI-of-N.zarr; join them with `sp store merge`.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first K images (sorted by path).")] = None,
    commit_every: Annotated[int, typer.Option(min=1, help="Commit to the store every N images; a crash "
                                              "loses at most the last N, redone on rerun.")] = 32,
    seed_pools: Annotated[str, typer.Option(help="Seed scales: C5 average-pooled by these factors.")] = "1,2,4",
    threshold: Annotated[float, typer.Option(help="Binarisation threshold of the normalised similarity map.")] = 0.5,
    min_cells: Annotated[int, typer.Option(help="Drop candidates covering fewer C5 cells.")] = 2,
    nms: Annotated[Nms, typer.Option(help="matrix (SOLOv2, Gaussian) or greedy (hard IoU NMS).")] = Nms.matrix,
    matrix_sigma: Annotated[float, typer.Option(help="Gaussian sigma of Matrix NMS.")] = 2.0,
    iou_threshold: Annotated[float, typer.Option(help="IoU threshold of greedy NMS.")] = 0.5,
    max_masks: Annotated[int, typer.Option(help="Masks kept per image after NMS, before the filters.")] = 20,
    min_score: Annotated[float, typer.Option(help="Drop masks whose score after NMS is lower.")] = 0.7,
    max_width_frac: Annotated[float, typer.Option(help="Drop masks whose box is at least this fraction of the image width.")] = 0.95,
    min_center_y_frac: Annotated[float, typer.Option(help="Drop masks centred above this fraction of the image height.")] = 0.2,
    mask_threshold: Annotated[float, typer.Option(help="Threshold of the soft map upsampled to image size.")] = 0.5,
    random_boxes: Annotated[int, typer.Option(help="--method random: boxes per image.")] = 20,
    random_seed: Annotated[int, typer.Option(help="--method random: seed of the boxes.")] = 0,
    init_seed: Annotated[int, typer.Option(help="Seed of the random backbone when no weights are given.")] = 0,
):
    """Stage 1: pseudo masks from seed-convolution saliency, written to a resumable Zarr store."""
    from models.saliency import SaliencyConfig
    from stages.gen_masks import GenerationSettings, RunOptions, generate, parse_shard
    from store.export import format_summary, store_summary

    try:
        pools = tuple(int(v) for v in seed_pools.split(","))
        settings = GenerationSettings(
            method=method.value, backbone=backbone, init_seed=init_seed, image_size=image_size,
            max_size=max_size, mask_threshold=mask_threshold, random_boxes=random_boxes, random_seed=random_seed,
            saliency=SaliencyConfig(seed_pools=pools, threshold=threshold, min_cells=min_cells, nms=nms.value,
                                    matrix_sigma=matrix_sigma, iou_threshold=iou_threshold, max_masks=max_masks,
                                    min_score=min_score, max_width_frac=max_width_frac,
                                    min_center_y_frac=min_center_y_frac))
        options = RunOptions(batch_size=batch_size, workers=workers, device=resolve_device(device),
                             shard=parse_shard(shard) if shard else None, limit=limit, commit_images=commit_every)
        result = generate(images_dir, store, settings, options, backbone_weights=backbone_weights)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(format_summary(store_summary(result)))


@store_app.command("info")
def store_info(path: Annotated[Path, typer.Argument(help="A pseudo-label store.")],
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False):
    """Images, masks, masks-per-image histogram, settings and size on disk of a store."""
    from store.export import format_summary, store_summary
    from store.pseudo_label_store import PseudoLabelStore

    try:
        summary = store_summary(PseudoLabelStore.open(path))
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@store_app.command("merge")
def store_merge(
    out: Annotated[Path, typer.Argument(help="The merged store; its parts are found next to it by name.")],
    parts: Annotated[Optional[list[Path]], typer.Option("--part", help="Explicit part stores, in order "
                                                        "(repeat the option). Default: OUT_STEM.part*-of-N.zarr.")] = None,
    remove_parts: Annotated[bool, typer.Option(help="Delete the parts after a successful merge.")] = False,
):
    """Join the part stores of `sp gen-masks --shard I/N` into one store."""
    from store.merge import find_parts, merge_stores

    try:
        merge_stores(parts or find_parts(out), out, remove_parts=remove_parts)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(f"wrote {out}")


@store_app.command("export")
def store_export(
    path: Annotated[Path, typer.Argument(help="A pseudo-label store.")],
    coco: Annotated[Optional[Path], typer.Option(help="Write COCO instances JSON (category 'fg').")] = None,
    h5: Annotated[Optional[Path], typer.Option(help="Write a single-file HDF5 copy.")] = None,
):
    """Export a store as COCO JSON and/or HDF5."""
    from store.export import to_coco, to_hdf5
    from store.pseudo_label_store import PseudoLabelStore

    if coco is None and h5 is None:
        fail("give --coco OUT.json and/or --h5 OUT.h5")
    try:
        store = PseudoLabelStore.open(path)
        if coco is not None:
            to_coco(store, coco)
            typer.echo(f"wrote {coco}")
        if h5 is not None:
            to_hdf5(store, h5)
            typer.echo(f"wrote {h5}")
    except (ValueError, OSError) as e:
        fail(str(e))


@store_app.command("import-coco")
def store_import_coco(
    ann: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="COCO instances JSON (images + "
                                        "annotations) of external pseudo labels (FreeSOLO, CutLER, ...) or ground truth.")],
    images: Annotated[Path, typer.Option(help="Folder holding the images named in the JSON.")],
    store: Annotated[Path, typer.Option(help="Output store (.zarr).")],
    backbone: Backbone = "resnet50",
    backbone_weights: BackboneWeights = None,
    image_size: ImageSize = 800,
    max_size: MaxSize = 1333,
    batch_size: BatchSize = 8,
    workers: Workers = 2,
    device: Device = "auto",
):
    """Turn external pseudo labels into a store; seed features are pooled from the backbone inside each mask."""
    from stages.gen_masks import RunOptions
    from stages.import_coco import import_coco
    from store.export import format_summary, store_summary

    try:
        result = import_coco(ann, images, store, backbone=backbone, backbone_weights=backbone_weights,
                             image_size=image_size, max_size=max_size,
                             options=RunOptions(batch_size=batch_size, workers=workers,
                                                device=resolve_device(device)))
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(format_summary(store_summary(result)))


@app.command("eval-masks")
def eval_masks(
    store: Annotated[Path, typer.Argument(help="A pseudo-label store.")],
    gt: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="COCO instances JSON of the same images.")],
    out: Annotated[Optional[Path], typer.Option(help="Also write the numbers as JSON.")] = None,
):
    """Class-agnostic box and mask AP of the pseudo masks against ground truth (the paper's Table 6)."""
    from stages.eval_masks import evaluate_pseudo_masks, format_table
    from store.pseudo_label_store import PseudoLabelStore

    try:
        result = evaluate_pseudo_masks(PseudoLabelStore.open(store), gt)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(format_table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))


@app.command("viz")
def viz(
    store: Annotated[Path, typer.Argument(help="A pseudo-label store.")],
    images: Annotated[Path, typer.Option(help="The images folder the store was generated from.")],
    out: Annotated[Path, typer.Option(help="Folder for the PNG overlays (and grid.png).")],
    n: Annotated[int, typer.Option("-n", min=1, help="Number of images to draw.")] = 16,
):
    """PNG overlays of pseudo masks with their boxes and scores."""
    from stages.viz import contact_sheet, draw_overlays
    from store.pseudo_label_store import PseudoLabelStore

    try:
        paths = draw_overlays(PseudoLabelStore.open(store), images, out, n=n)
        contact_sheet(paths, out / "grid.png")
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(f"wrote {len(paths)} overlays and {out / 'grid.png'}")


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
    model: Annotated[str, typer.Option(help="Query-based model; knet is implemented.")] = "knet",
    small: Annotated[bool, typer.Option(help="CPU-sized K-Net (ResNet-18, 64 channels, 16 kernels) for "
                                        "smoke runs and the demo; overrides --backbone.")] = False,
    backbone: Backbone = "resnet50",
    backbone_weights: BackboneWeights = None,
    num_kernels: Annotated[Optional[int], typer.Option(help="Number of kernels N (default 100; 16 with --small).")] = None,
    freeze_backbone: Annotated[bool, typer.Option(help="Freeze the whole backbone, as the authors did.")] = True,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 12,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step and process.")] = 2,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 1000,
    lr_steps: Annotated[list[int], typer.Option(help="Epochs at which the lr is multiplied by 0.1 (repeat the option).")] = [8, 11],
    clip_norm: Annotated[float, typer.Option(help="Gradient clipping max-norm.")] = 1.0,
    prompt: Annotated[Prompt, typer.Option(help="Prompt-kernel assignment: cosine (the paper), sequential, "
                                           "random, or none (pseudo masks only).")] = Prompt.cosine,
    prompt_drop: Annotated[float, typer.Option(help="Probability of dropping each kernel's prompt.")] = 0.1,
    kernel_loss_weight: Annotated[float, typer.Option(help="Weight of kernel supervision (Eq. 9); 0 disables it.")] = 1.0,
    image_size: ImageSize = 800,
    max_size: MaxSize = 1333,
    flip_prob: Annotated[float, typer.Option(help="Horizontal flip probability.")] = 0.5,
    workers: Workers = 2,
    device: Device = "auto",
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order, flips and prompt dropout.")] = 0,
    log_every: Annotated[int, typer.Option(help="Steps between metrics records.")] = 10,
    checkpoint_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: per epoch only).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pth exactly where it stopped.")] = False,
):
    """Stage 2a: pre-train K-Net on the pseudo-label store with Saliency Prompts and kernel supervision.
    Multi-GPU: `torchrun --nproc_per_node N -m pipeline.cli pretrain ...`."""
    from models.knet import KNetConfig
    from models.saliency_prompt import PromptConfig
    from stages.pretrain import PretrainConfig, pretrain
    from stages.training import Schedule

    if model != "knet":
        fail(f"--model {model}: only knet is implemented")
    frozen = 4 if freeze_backbone else 1
    knet = KNetConfig.small(num_classes=1, frozen_stages=frozen) if small else \
        KNetConfig(backbone=backbone, num_classes=1, frozen_stages=frozen)
    if num_kernels:
        knet.num_kernels = num_kernels
    cfg = PretrainConfig(
        store=store, images=images, out=out, model=knet, backbone_weights=backbone_weights, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        schedule=Schedule(warmup_steps=warmup_steps, lr_steps=tuple(lr_steps)), clip_norm=clip_norm,
        prompt=PromptConfig(mode=prompt.value, drop_prob=prompt_drop), kernel_loss_weight=kernel_loss_weight,
        image_size=image_size, max_size=max_size, flip_prob=flip_prob, workers=workers,
        device=resolve_device(device), seed=seed, log_every=log_every, checkpoint_every=checkpoint_every,
        resume=resume)
    try:
        final = pretrain(cfg)
    except (ValueError, OSError, FloatingPointError) as e:
        fail(str(e))
    typer.echo(f"wrote {final}")


class Model(str, Enum):
    knet = "knet"
    maskrcnn = "maskrcnn"


@app.command("finetune")
def finetune_cmd(
    train_ann: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="COCO JSON of the labeled training set.")],
    train_images: Annotated[Path, typer.Option(help="Its image folder.")],
    val_ann: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="COCO JSON evaluated every --eval-every epochs.")],
    val_images: Annotated[Path, typer.Option(help="Its image folder.")],
    out: Annotated[Path, typer.Option(help="Run folder: last/best/final.pth, metrics.jsonl, curve.png.")],
    model: Annotated[Model, typer.Option(help="knet, or maskrcnn (torchvision, the CNN baseline).")] = Model.knet,
    small: Annotated[bool, typer.Option(help="CPU-sized models (ResNet-18) for smoke runs and the demo.")] = False,
    backbone: Backbone = "resnet50",
    init: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="A `sp pretrain` checkpoint: "
                                                 "backbone, neck and kernel heads are loaded, the classifier is "
                                                 "rebuilt for these categories, prompt modules are dropped.")] = None,
    backbone_weights: BackboneWeights = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (the paper: 48 on COCO 10 %).")] = 48,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step and process.")] = 2,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 1e-4 AdamW for K-Net, 0.02 SGD for Mask R-CNN).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (default 0.05 K-Net, 1e-4 Mask R-CNN).")] = None,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 100,
    lr_steps: Annotated[list[int], typer.Option(help="Epochs at which the lr is multiplied by 0.1 (repeat the option).")] = [36, 44],
    clip_norm: Annotated[float, typer.Option(help="Gradient clipping max-norm.")] = 4.0,
    flip_prob: Annotated[float, typer.Option(help="Horizontal flip probability.")] = 0.5,
    rotate: Annotated[float, typer.Option(help="Random rotation up to this many degrees on half of the images (§4.1: 9).")] = 0.0,
    image_size: ImageSize = 800,
    max_size: MaxSize = 1333,
    mask_threshold: Annotated[float, typer.Option(help="K-Net test-time mask threshold (the authors: 0.3 on COCO).")] = 0.5,
    max_per_image: Annotated[int, typer.Option(help="Detections kept per image (top-k over kernels x classes).")] = 100,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate on the validation set every N epochs.")] = 1,
    workers: Workers = 2,
    device: Device = "auto",
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order and augmentation.")] = 0,
    log_every: Annotated[int, typer.Option(help="Steps between metrics records.")] = 10,
    checkpoint_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: per epoch only).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pth exactly where it stopped.")] = False,
):
    """Stage 2b: fine-tune on a small labeled set, with mask and box AP on the validation set every epoch."""
    from stages.finetune import FinetuneConfig, finetune
    from stages.training import Schedule

    cfg = FinetuneConfig(
        train_ann=train_ann, train_images=train_images, val_ann=val_ann, val_images=val_images, out=out,
        model=model.value, small=small, backbone=backbone, init=init, backbone_weights=backbone_weights,
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        schedule=Schedule(warmup_steps=warmup_steps, lr_steps=tuple(lr_steps)), clip_norm=clip_norm,
        flip_prob=flip_prob, rotate_deg=rotate, image_size=image_size, max_size=max_size,
        mask_threshold=mask_threshold, max_per_image=max_per_image, eval_every=eval_every, workers=workers,
        device=resolve_device(device), seed=seed, log_every=log_every, checkpoint_every=checkpoint_every,
        resume=resume)
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
    batch_size: BatchSize = 2,
    workers: Workers = 2,
    device: Device = "auto",
):
    """Mask and box AP, AP50, AP75, APs, APm, APl of a fine-tuned model (faster-coco-eval when installed)."""
    from stages.evaluate import format_ap_table
    from stages.finetune import evaluate_model
    from stages.inference import load_checkpoint_model

    try:
        dev = resolve_device(device)
        model, state = load_checkpoint_model(checkpoint, dev)
        args = state["args"]
        metrics, results = evaluate_model(model, state["model_kind"], ann, images, image_size or args["image_size"],
                                          max_size or args["max_size"], dev, batch_size, workers)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(format_ap_table(metrics))
    if out is not None:
        out.write_text(json.dumps(metrics, indent=2))
        out.with_suffix(".results.json").write_text(json.dumps(results))


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
    eval_files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="`sp evaluate --out` JSON files.")],
    names: Annotated[str, typer.Option(help="Comma-separated row names, one per file.")],
    out: Annotated[Path, typer.Option(help="Output prefix: writes OUT.md and OUT.json.")],
):
    """Mask and box AP tables of several evaluated runs, printed and written as markdown and JSON."""
    from stages.report import write_table

    try:
        typer.echo(write_table(eval_files, names.split(","), out))
    except (ValueError, OSError, KeyError) as e:
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
):
    """Low-data split of a COCO JSON: a labeled subset and the rest, deterministic for a seed."""
    from stages.split import split_command

    try:
        labeled, unlabeled = split_command(instances, out, percent, seed, ids_file)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(f"{labeled}\n{unlabeled}")


@app.command("demo-data")
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the synthetic demo dataset into.")],
    num_unlabeled: Annotated[int, typer.Option(help="Unlabeled images (for gen-masks / pretrain).")] = 48,
    num_train: Annotated[int, typer.Option(help="Labeled training images.")] = 24,
    num_val: Annotated[int, typer.Option(help="Labeled validation images.")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same files.")] = 0,
):
    """Generate the built-in demo data: textured scenes with occluding objects, COCO JSON labels."""
    from pipeline.demo_data import make_demo_data

    try:
        paths = make_demo_data(out_dir, num_unlabeled=num_unlabeled, num_train=num_train, num_val=num_val, seed=seed)
    except (ValueError, OSError) as e:
        fail(str(e))
    for key, value in paths.items():
        typer.echo(f"{key}: {value}")


if __name__ == "__main__":
    app()
