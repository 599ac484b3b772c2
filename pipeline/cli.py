"""The `sp` command line. Each command is a thin wrapper over one function of `stages/` or `store/`,
so everything the CLI (and the Snakemake workflow) does can be done from Python too. Stage-1 and data
commands live here, training and evaluation commands in `pipeline.cli_training`."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli_common import (DEFAULT_BACKBONE_WEIGHTS, Backbone, BackboneWeights, BatchSize, DecodeImages,
                                 Device, ImageSize, MaxSize, Method, Nms, Workers, app, backbone_weights_path, fail,
                                 resolve_device, store_app)
from stages.settings import GenerationSettings, RunOptions

# The options' defaults are the stage's (docs/defaults.md): `sp gen-masks` and `sp store import-coco` with no
# options make the store that GenerationSettings() and RunOptions() describe.
GEN, RUN = GenerationSettings(), RunOptions()
SAL, REF = GEN.saliency, GEN.refine


class Refine(str, Enum):
    none = "none"
    superpixel = "superpixel"
    guided = "guided"


@app.command("gen-masks")
def gen_masks(
    images_dir: Annotated[Path, typer.Argument(help="Folder of unlabeled images (searched recursively).")],
    store: Annotated[Path, typer.Option(help="Output store (a .zarr directory). Rerun the same command to resume.")],
    method: Annotated[Method, typer.Option(help="saliency (the paper) or random boxes (Table 7 "
                                           "baseline).")] = Method(GEN.method),
    backbone: Backbone = GEN.backbone,
    backbone_weights: BackboneWeights = DEFAULT_BACKBONE_WEIGHTS,
    image_size: ImageSize = GEN.image_size,
    max_size: MaxSize = GEN.max_size,
    batch_size: BatchSize = RUN.batch_size,
    workers: Workers = RUN.workers,
    device: Device = "auto",
    shard: Annotated[Optional[str], typer.Option(help="I/N: process the I-th of N contiguous parts into "
                                                 "STORE_STEM.partI-of-N.zarr; join them with `sp store merge`.")] = None,
    image_list: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="Only the images this text "
                                                       "file lists, one path relative to IMAGES_DIR per line (# "
                                                       "comments), e.g. to pool several folders under one root.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first K images (sorted by path).")] = RUN.limit,
    commit_every: Annotated[int, typer.Option(min=1, help="Commit to the store every N images; a crash "
                                              "loses at most the last N, redone on rerun.")] = RUN.commit_images,
    seed_pools: Annotated[str, typer.Option(help="Seed scales: C5 average-pooled by these factors.")] = ",".join(
        str(pool) for pool in SAL.seed_pools),
    threshold: Annotated[float, typer.Option(help="Binarisation threshold of the normalised similarity "
                                             "map.")] = SAL.threshold,
    min_cells: Annotated[int, typer.Option(help="Drop candidates covering fewer C5 cells.")] = SAL.min_cells,
    nms: Annotated[Nms, typer.Option(help="matrix (SOLOv2, Gaussian) or greedy (hard IoU NMS).")] = Nms(SAL.nms),
    matrix_sigma: Annotated[float, typer.Option(help="Gaussian sigma of Matrix NMS.")] = SAL.matrix_sigma,
    iou_threshold: Annotated[float, typer.Option(help="IoU threshold of greedy NMS.")] = SAL.iou_threshold,
    max_masks: Annotated[int, typer.Option(help="Masks kept per image after NMS, before the filters.")] = SAL.max_masks,
    min_score: Annotated[float, typer.Option(help="Drop masks whose score after NMS is lower.")] = SAL.min_score,
    max_width_frac: Annotated[float, typer.Option(help="Drop masks whose box is at least this fraction of the image "
                                                  "width.")] = SAL.max_width_frac,
    min_center_y_frac: Annotated[float, typer.Option(help="Drop masks centred above this fraction of the image "
                                                     "height.")] = SAL.min_center_y_frac,
    mask_threshold: Annotated[float, typer.Option(help="Threshold of the soft map upsampled to image "
                                                  "size.")] = GEN.mask_threshold,
    refine: Annotated[Refine, typer.Option(help="Refine each kept soft map with the image before thresholding it "
                                           "(saliency only): none is the paper's generator (bilinear upsampling "
                                           "of the C5 map), whose masks gave the better fine-tuned model "
                                           "(experiments/README.md, Penn-Fudan, the paper's claims); superpixel "
                                           "gives every Felzenszwalb segment of the image the map's mean inside "
                                           "it, so masks follow colour edges (about 5x the pseudo masks' AP, "
                                           "bench/README.md); guided filters the map with the image as guide "
                                           "(fast guided filter).")] = Refine(REF.method),
    refine_downsample: Annotated[int, typer.Option(min=1, help="--refine superpixel: segment the backbone input "
                                                   "shrunk by this factor; guided: the filter's "
                                                   "subsampling.")] = REF.downsample,
    superpixel_scale: Annotated[float, typer.Option(help="--refine superpixel: Felzenszwalb's scale (larger: "
                                                    "larger segments).")] = REF.scale,
    superpixel_sigma: Annotated[float, typer.Option(help="--refine superpixel: Gaussian smoothing before "
                                                    "segmenting, in pixels of the shrunk image.")] = REF.sigma,
    superpixel_min_size: Annotated[int, typer.Option(min=1, help="--refine superpixel: smallest segment, in pixels "
                                                     "of the shrunk image.")] = REF.min_size,
    guided_radius: Annotated[int, typer.Option(min=1, help="--refine guided: window radius, in pixels of the "
                                               "backbone input.")] = REF.radius,
    guided_eps: Annotated[float, typer.Option(help="--refine guided: regulariser of the local colour variance "
                                              "(colours in [0, 1]; smaller keeps more edges).")] = REF.eps,
    random_boxes: Annotated[int, typer.Option(help="--method random: boxes per image.")] = GEN.random_boxes,
    random_seed: Annotated[int, typer.Option(help="--method random: seed of the boxes.")] = GEN.random_seed,
    init_seed: Annotated[int, typer.Option(help="Seed of the random backbone when no weights are "
                                           "given.")] = GEN.init_seed,
):
    """Stage 1: pseudo masks from seed-convolution saliency, written to a resumable Zarr store."""
    from models.settings import RefineConfig, SaliencyConfig
    from stages.gen_masks import generate, parse_shard
    from stages.image_data import read_image_list
    from store.export import format_summary, store_summary

    try:
        pools = tuple(int(v) for v in seed_pools.split(","))
        settings = GenerationSettings(
            method=method.value, backbone=backbone, init_seed=init_seed, image_size=image_size,
            max_size=max_size, mask_threshold=mask_threshold, random_boxes=random_boxes, random_seed=random_seed,
            saliency=SaliencyConfig(seed_pools=pools, threshold=threshold, min_cells=min_cells, nms=nms.value,
                                    matrix_sigma=matrix_sigma, iou_threshold=iou_threshold, max_masks=max_masks,
                                    min_score=min_score, max_width_frac=max_width_frac,
                                    min_center_y_frac=min_center_y_frac),
            # random boxes are not saliency maps: nothing to refine
            refine=RefineConfig(method=refine.value if method is Method.saliency else "none",
                                downsample=refine_downsample, scale=superpixel_scale, sigma=superpixel_sigma,
                                min_size=superpixel_min_size, radius=guided_radius, eps=guided_eps))
        options = RunOptions(batch_size=batch_size, workers=workers, device=resolve_device(device),
                             shard=parse_shard(shard) if shard else None, limit=limit, commit_images=commit_every)
        names = read_image_list(image_list, images_dir) if image_list else None
        result = generate(images_dir, store, settings, options,
                          backbone_weights=backbone_weights_path(backbone, backbone_weights), file_names=names)
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
    backbone: Backbone = GEN.backbone,
    backbone_weights: BackboneWeights = DEFAULT_BACKBONE_WEIGHTS,
    image_size: ImageSize = GEN.image_size,
    max_size: MaxSize = GEN.max_size,
    batch_size: BatchSize = RUN.batch_size,
    workers: Workers = RUN.workers,
    device: Device = "auto",
    shard: Annotated[Optional[str], typer.Option(help="I/N: import the I-th of N contiguous parts of the JSON's "
                                                 "images into STORE_STEM.partI-of-N.zarr; join them with `sp store "
                                                 "merge`.")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Leave out the images and annotations that the up-front check "
                                           "finds bad (listed in the store's attrs, input_skipped), instead of "
                                           "stopping.")] = False,
    decode_images: DecodeImages = False,
):
    """Turn external pseudo labels into a store; seed features are pooled from the backbone inside each mask."""
    from stages.gen_masks import parse_shard
    from stages.import_coco import import_coco
    from store.export import format_summary, store_summary

    try:
        result = import_coco(ann, images, store, backbone=backbone,
                             backbone_weights=backbone_weights_path(backbone, backbone_weights),
                             image_size=image_size, max_size=max_size,
                             options=RunOptions(batch_size=batch_size, workers=workers, device=resolve_device(device),
                                                shard=parse_shard(shard) if shard else None), skip_bad=skip_bad,
                             decode=decode_images)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(format_summary(store_summary(result)))


@app.command("eval-masks")
def eval_masks(
    store: Annotated[Path, typer.Argument(help="A pseudo-label store.")],
    gt: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="COCO instances JSON of the same images.")],
    out: Annotated[Optional[Path], typer.Option(help="Also write the numbers as JSON.")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Leave out the GT images and annotations that the check finds "
                                           "bad (listed in OUT's *.skipped.json), instead of stopping.")] = False,
):
    """Class-agnostic box and mask AP of the pseudo masks against ground truth (the paper's Table 6)."""
    from stages.coco_check import MASK_GT, load_checked_coco, write_skipped
    from stages.eval_masks import evaluate_pseudo_masks, format_table
    from store.pseudo_label_store import PseudoLabelStore

    try:
        checked = load_checked_coco(gt, needs=MASK_GT, skip_bad=skip_bad)
        result = evaluate_pseudo_masks(PseudoLabelStore.open(store), checked.data)
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(format_table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
        write_skipped({"gt": checked.skipped}, out.with_suffix(".skipped.json"))


class LabelUse(str, Enum):
    train = "train"
    eval = "eval"
    mask_gt = "mask-gt"
    pseudo_labels = "pseudo-labels"


@app.command("check-labels")
def check_labels(
    ann: Annotated[Path, typer.Argument(help="A COCO instances JSON.")],
    images: Annotated[Optional[Path], typer.Option(help="Its image folder: every file named is opened too.")] = None,
    use: Annotated[LabelUse, typer.Option(help="What the file is for, which decides the annotation keys required: "
                                          "train (id, image_id, category_id, segmentation), eval (also bbox, area, "
                                          "iscrowd), mask-gt (`sp eval-masks`: no category), pseudo-labels (`sp "
                                          "store import-coco`: image_id, segmentation).")] = LabelUse.train,
    decode_images: DecodeImages = False,
    skip_bad: Annotated[bool, typer.Option(help="Only report what --skip-bad would leave out; exit 0 if "
                                           "anything is left.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Write what --skip-bad leaves out as JSON.")] = None,
):
    """Check a COCO file (and its images) the way every labeled-data command does before it starts."""
    from stages.coco_check import USES, load_checked_coco, write_skipped

    try:
        checked = load_checked_coco(ann, images, USES[use.value], skip_bad, decode_images)
    except (ValueError, OSError) as e:
        fail(str(e))
    data = checked.data
    typer.echo(f"ok: {ann}: {len(data['images'])} images, {len(data['annotations'])} annotations"
               + (f", {len(data['categories'])} categories" if "categories" in data else "")
               + (f"; every image file in {images} opened" if images is not None else ""))
    if report is not None:
        write_skipped({"ann": checked.skipped}, report)


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


@app.command("demo-data")
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the demo dataset into.")],
    synthetic: Annotated[bool, typer.Option(help="Generated scenes of textured shapes (for tests) instead of "
                                            "the shipped COCO photographs.")] = False,
    num_train: Annotated[Optional[int], typer.Option(help="Labeled training images (default: all 82 photos; "
                                                     "24 synthetic).")] = None,
    num_val: Annotated[Optional[int], typer.Option(help="Labeled validation images (default: all 57 photos; "
                                                   "12 synthetic).")] = None,
    num_unlabeled: Annotated[int, typer.Option(help="--synthetic: unlabeled images. (The photos' train split "
                                               "is their unlabeled set: its labels are not read there.)")] = 48,
    seed: Annotated[int, typer.Option(help="--synthetic: the same seed gives the same files.")] = 0,
):
    """The built-in demo data: 139 COCO photographs whose licence allows it (82 train, 57 val; credits in
    ATTRIBUTION.md) with their instance labels, or --synthetic scenes; COCO JSON in OUT/annotations."""
    from pipeline.demo_data import make_demo_data
    from pipeline.demo_photos import write_demo_photos

    try:
        if synthetic:
            paths = make_demo_data(out_dir, num_unlabeled=num_unlabeled, num_train=24 if num_train is None else num_train,
                                   num_val=12 if num_val is None else num_val, seed=seed)
        else:
            paths = write_demo_photos(out_dir, num_train=num_train, num_val=num_val)
    except (ValueError, OSError) as e:
        fail(str(e))
    for key, value in paths.items():
        typer.echo(f"{key}: {value}")


# Registered last so that `sp --help` lists the pipeline in order: data and stage 1, then training.
from pipeline import cli_training  # noqa: E402,F401

if __name__ == "__main__":
    app()
