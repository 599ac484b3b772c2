"""The settings of the stages, with their defaults (docs/defaults.md): stage 1's (`GenerationSettings`,
`RunOptions`), the training loop's (`LoopConfig`, `Schedule`), pre-training's and fine-tuning's
(`PretrainConfig`, `FinetuneConfig`). Plain dataclasses that import nothing heavy (no torch), so that `sp` and
the workflow read every default without loading a model; the stages (stages/gen_masks.py, stages/training.py,
stages/pretrain.py, stages/finetune.py) import them from here."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.settings import KNetConfig, MaskRCNNConfig, PromptConfig, RefineConfig, SaliencyConfig, model_kind


@dataclass
class GenerationSettings:
    """Everything that changes the masks. Its hash names the store (see `settings_hash`)."""

    method: str = "saliency"
    # ImageNet weights that install with the project (no ResNet weights ship); also the default backbone of every
    # model (PretrainConfig, FinetuneConfig), since the stored seed features come from it
    backbone: str = "efficientnet_lite0"
    backbone_weights_sha256: str | None = None  # None: random init from torch.manual_seed(init_seed)
    init_seed: int = 0
    image_size: int = 800  # short side of the backbone input
    max_size: int = 1333  # cap on the long side
    mask_threshold: float = 0.5  # on the upsampled soft map
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)  # saliency masks only
    random_boxes: int = 20  # --method random: boxes per image
    random_seed: int = 0
    source_sha256: str | None = None  # method "import": the imported JSON

    def to_dict(self) -> dict:
        d = asdict(self)
        d["saliency"]["seed_pools"] = list(d["saliency"]["seed_pools"])
        # "none" is left out: the paper's generator keeps the settings, hash and stores it had before refinement
        # existed (issue 20); any other refinement is recorded with the settings of its method.
        del d["refine"]
        if self.refine.method != "none":
            d["refine"] = self.refine.to_dict()
        return d


@dataclass
class RunOptions:
    """How to run; none of these change the masks (except batch composition at image borders)."""

    batch_size: int = 8
    workers: int = 2
    device: str = "cpu"
    shard: tuple[int, int] | None = None  # (index, count)
    limit: int | None = None
    commit_images: int = 32  # commit to the store every this many images (a crash loses at most these)


@dataclass
class Schedule:
    """Linear warm-up from lr × warmup_ratio over `warmup_steps`, then × gamma at each epoch in `lr_steps`."""

    warmup_steps: int = 1000
    lr_steps: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    warmup_ratio: float = 0.001

    def factor(self, step: int, epoch: int) -> float:
        decay = self.gamma ** sum(epoch >= e for e in self.lr_steps)
        if step < self.warmup_steps:
            return decay * (self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup_steps)
        return decay


@dataclass
class LoopConfig:
    """What `train_loop` needs; `PretrainConfig` and `FinetuneConfig` extend it with their stage's settings."""
    out: Path
    epochs: int = 12
    batch_size: int = 2
    workers: int = 2
    seed: int = 0
    clip_norm: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    keep_every: int = 0  # also keep epoch_NNN.pth every this many epochs (0: only last/final)
    resume: bool = False  # continue the run in `out` (same settings: see prepare_run_folder)
    overwrite: bool = False  # replace a run in `out` that cannot be resumed


# The settings whose default depends on the model (None in PretrainConfig: the model's). Query models: the
# paper's AdamW, cosine prompts and kernel supervision. Mask R-CNN: SGD (momentum 0.9) as CutLER pre-trains and
# as this project fine-tunes it, at the fine-tuning's rate for 4 images per step (lr 0.01: CutLER's base rate, and
# the one chosen for Mask R-CNN on held-apart photos), CutLER's weight decay; DropLoss off (torchvision's plain
# loss fine-tuned higher on held-apart Penn-Fudan train photos, experiments/maskrcnn_sp_select.yaml), at CutLER's
# IoU threshold where it is turned on; no prompts and no kernel supervision (it has no queries).
# docs/maskrcnn_pretraining.md explains each choice.
QUERY_MODEL_DEFAULTS = dict(lr=1e-4, weight_decay=0.05, prompt=PromptConfig(), kernel_loss_weight=1.0)
MASKRCNN_DEFAULTS = dict(lr=0.01, weight_decay=5e-5, prompt=PromptConfig(mode="none"), kernel_loss_weight=0.0,
                         drop_loss=False, drop_loss_iou=0.01)


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
    # leave out the pseudo masks covering less than this fraction of their photo (0: keep all); a lever for
    # labels dominated by small objects (experiments/README.md, "Pre-training scale")
    min_mask_area: float = 0.0
    device: str = "cpu"
    keep_every: int = 1  # keep epoch_NNN.pth every N epochs (0: last and final only)

    def __post_init__(self) -> None:
        mask_rcnn = isinstance(self.model, MaskRCNNConfig)
        if not 0 <= self.min_mask_area < 1:
            raise ValueError(f"--min-mask-area {self.min_mask_area:g}: a fraction of the photo, at least 0 and "
                             "under 1")
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
            raise ValueError(f"--drop-loss-iou {self.drop_loss_iou:g} is DropLoss's threshold, and DropLoss is off "
                             "(--no-drop-loss, the default): give --drop-loss with it, or leave it out")


@dataclass(kw_only=True)
class FinetuneConfig(LoopConfig):
    """`sp finetune`'s settings: the training loop's (epochs, batch size, schedule, checkpoints, ...) and these."""
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path
    model: str = "knet"  # a query model of models.build.QUERY_MODELS (knet, mask2former, ...) or "maskrcnn"
    small: bool = False  # CPU-sized heads for smoke runs and the demo (the backbone is `backbone`)
    backbone: str = GenerationSettings.backbone  # the pseudo masks' (a pre-trained model was built on it)
    init: Path | None = None  # a `sp pretrain` checkpoint of the same model
    # name prefixes of tensors that keep their fresh initialisation instead of `init`'s (e.g. Mask R-CNN's last
    # layers, as a fine-tuning to other classes gets them)
    init_reset: tuple[str, ...] = ()
    backbone_weights: Path | None = None
    epochs: int = 48
    repeat: int = 1  # passes over the labeled images per epoch (the reference's RepeatDataset)
    lr: float | None = None  # default: 1e-4 (query models, AdamW) or 0.02 (Mask R-CNN, SGD)
    weight_decay: float | None = None  # default: 0.05 (query models) or 1e-4 (Mask R-CNN)
    backbone_lr_mult: float = 0.25  # query models
    frozen_stages: int = 1  # backbone stem + this many stages frozen (§4.1: 1; 4 freezes the whole backbone)
    clip_norm: float = 4.0
    schedule: Schedule = field(default_factory=lambda: Schedule(warmup_steps=100, lr_steps=(36, 44)))
    flip_prob: float = 0.5
    rotate_deg: float = 0.0  # §4.1 uses 9 (applied to half of the images)
    image_size: int = 800
    max_size: int = 1333
    mask_threshold: float | None = None  # query models' test-time mask threshold (None: the model's, K-Net 0.3)
    max_per_image: int = 100
    eval_every: int = 1
    eval_at: tuple[int, ...] = ()  # evaluate after these epochs (and the last) instead of every eval_every
    device: str = "cpu"
    class_agnostic: bool = False  # all categories merged into one ('fg') for training and evaluation
    skip_bad: bool = False  # leave out (and list in skipped.json) the images and annotations the check names
    decode_images: bool = False  # the up-front check decodes every image, not just headers and file ends
