"""The settings of the models, with their defaults: those of the steps of stage 1 (saliency, refinement), of the
Saliency Prompt, and each model's config. Plain dataclasses that import nothing heavy (no torch), so that `sp`
and the workflow read every default without loading a model (docs/defaults.md); the modules that implement
them (models/saliency.py, models/knet.py, ...) import them from here."""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class SaliencyConfig:
    """Every setting of the saliency step; all of them are recorded in the store."""

    seed_pools: tuple[int, ...] = (1, 2, 4)  # seeds = C5 average-pooled by these factors
    threshold: float = 0.5  # on the min-max normalised similarity map
    min_cells: int = 2  # a candidate must cover at least this many C5 cells
    nms: str = "matrix"  # "matrix" (SOLOv2, Gaussian) or "greedy" (hard IoU NMS)
    matrix_sigma: float = 2.0
    iou_threshold: float = 0.5  # greedy NMS only
    max_masks: int = 20  # kept after NMS, before the filters
    min_score: float = 0.7  # on the score after NMS (decayed maskness)
    max_width_frac: float = 0.95  # drop masks whose box is as wide as the image
    min_center_y_frac: float = 0.2  # drop masks centred in the top band of the image

    def to_dict(self) -> dict:
        return asdict(self)


REFINE_METHODS = ("none", "superpixel", "guided")
# The settings that change each method's masks: only these are recorded, so an unused one cannot make two
# stores differ.
_METHOD_KEYS = {"none": (), "superpixel": ("downsample", "scale", "sigma", "min_size"),
                "guided": ("downsample", "radius", "eps")}
_METHOD_MODULE = {"superpixel": ("skimage.segmentation", "scikit-image"), "guided": ("kornia.filters", "kornia")}


@dataclass(frozen=True)
class RefineConfig:
    """Every setting of the refinement; those of the chosen method are recorded in the store."""

    # "none" (the paper's generator), "superpixel" or "guided". The default is "none" by the one downstream
    # measurement: pre-trained on superpixel-refined masks, K-Net fine-tuned on 20 Penn-Fudan photos scored
    # 11.2 ± 4.8 mask AP against 15.9 ± 0.5 (experiments/README.md, Penn-Fudan, "The paper's claims, here"),
    # although the refined masks themselves score higher; the pre-training scale study may revisit it.
    method: str = "none"
    downsample: int = 2  # superpixel: segment the resized image shrunk by this; guided: the filter's subsampling
    scale: float = 400.0  # superpixel: Felzenszwalb's k, larger gives larger segments
    sigma: float = 0.5  # superpixel: Gaussian pre-smoothing, in working pixels
    min_size: int = 100  # superpixel: smaller segments are merged into a neighbour, in working pixels
    radius: int = 64  # guided: window radius, in resized-image pixels
    eps: float = 0.01  # guided: regulariser on the local colour variance (colours in [0, 1])

    def __post_init__(self):
        if self.method not in REFINE_METHODS:
            raise ValueError(f"unknown refinement {self.method!r}: expected one of {', '.join(REFINE_METHODS)}")
        if self.downsample < 1 or self.radius < 1 or self.min_size < 1 or self.scale <= 0 or self.eps <= 0:
            raise ValueError(f"refinement settings out of range: {self}")
        if self.method in _METHOD_MODULE:  # refused here, before a store is created, not at its first image
            module, package = _METHOD_MODULE[self.method]
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ValueError(f"refinement {self.method!r} needs {package}, which cannot be imported ({e}); "
                                 "install the project's dependencies (pyproject.toml)") from None

    def to_dict(self) -> dict:
        return {"method": self.method, **{key: getattr(self, key) for key in _METHOD_KEYS[self.method]}}

    def work_size(self, resized_hw: tuple[int, int]) -> tuple[int, int]:
        """The grid the soft maps are refined on: the resized image, shrunk for the segmentation."""
        if self.method == "superpixel":
            return tuple(max(1, round(side / self.downsample)) for side in resized_hw)
        return tuple(resized_hw)


@dataclass
class PromptConfig:
    """The Saliency Prompt's settings (models/saliency_prompt.py)."""

    mode: str = "cosine"  # the paper's matching; the others are Table 5's ablations
    drop_prob: float = 0.1  # each kernel's prompt is dropped with this probability (training only)
    roi_size: int = 7  # RoIAlign grid, averaged to one vector per box


@dataclass
class KNetConfig:
    """K-Net's settings (models/knet.py); the defaults are the full-size model's."""

    backbone: str = "resnet50"
    num_classes: int = 80
    num_kernels: int = 100
    num_stages: int = 3
    channels: int = 256
    ffn_dim: int = 2048
    num_heads: int = 8
    frozen_stages: int = 1
    norm_eval: bool = True  # backbone BatchNorm statistics stay fixed (small per-GPU batches)
    # 0.3, as the SP authors evaluate K-Net on COCO: higher mask AP than 0.5 on held-apart training photos
    # (experiments/README.md, "Test-time mask threshold"); Mask2Former and QueryInst keep their 0.5
    mask_threshold_test: float = 0.3
    max_per_image: int = 100
    # test time: score x mean mask probability inside the mask (Mask2Former's rule; not K-Net's, which ranks by
    # the class score alone)
    mask_quality_score: bool = False

    @classmethod
    def small(cls, **overrides) -> KNetConfig:
        """A CPU-sized model for tests and smoke runs: ResNet-18, 64 channels, 16 kernels.

        64 channels still allow GroupNorm with the reference's 32 groups (see ``models.fpn.gn_groups``).
        """
        base = cls(backbone="resnet18", channels=64, ffn_dim=256, num_heads=4, num_kernels=16)
        return replace(base, **overrides)


@dataclass
class Mask2FormerConfig:
    """The defaults are the paper's (Mask2Former R50 instance segmentation), but for the backbone's freezing:
    the reference trains all of it (FREEZE_AT 0) with frozen BatchNorm; here stem + C2 are frozen as in the
    project's other models and the Saliency Prompt paper (§4.1), and the stages set it anyway."""
    backbone: str = "resnet50"
    num_classes: int = 80
    num_queries: int = 100
    channels: int = 256  # pixel decoder, transformer decoder and mask embedding width
    num_heads: int = 8
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024
    encoder_points: int = 4  # deformable sampling points per head and level
    decoder_layers: int = 9
    decoder_ffn_dim: int = 2048
    frozen_stages: int = 1
    norm_eval: bool = True
    num_points: int = 12544  # 112 x 112 points for matching and for the mask losses
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    mask_threshold_test: float = 0.5
    max_per_image: int = 100

    @classmethod
    def small(cls, **overrides) -> Mask2FormerConfig:
        """A CPU-sized model: 64 channels, 4 heads, 16 queries, 2 encoder layers, 6 decoder layers (two
        cycles over the three scales), 3136 points. The backbone is the caller's."""
        base = cls(channels=64, num_heads=4, num_queries=16, encoder_layers=2, encoder_ffn_dim=256,
                   decoder_layers=6, decoder_ffn_dim=256, num_points=3136)
        return replace(base, **overrides)


@dataclass
class QueryInstConfig:
    """QueryInst's settings (models/queryinst.py); the defaults are the full-size model's."""

    backbone: str = "resnet50"
    num_classes: int = 80
    num_proposals: int = 100
    num_stages: int = 6
    channels: int = 256
    dynamic_dim: int = 64  # width of the generated 1x1 convs
    ffn_dim: int = 2048
    num_heads: int = 8
    mask_convs: int = 4
    mask_channels: int = 256
    frozen_stages: int = 1
    norm_eval: bool = True  # backbone BatchNorm statistics stay fixed (small per-GPU batches)
    max_per_image: int = 100
    mask_threshold_test: float = 0.5

    @classmethod
    def small(cls, **overrides) -> QueryInstConfig:
        """A CPU-sized model for tests and smoke runs: 64 channels, 16 proposals, 2 stages, a 2-conv 32-channel
        mask head. The backbone stays whatever the caller gives (``backbone=...``).

        Two stages, not six: each stage refines the previous one's boxes, and from a random start the later
        stages' boxes are far off and their losses dominate the clipped gradient, so a short CPU run learns
        markedly slower with more stages (the full config keeps QueryInst's six).
        """
        base = cls(num_proposals=16, num_stages=2, channels=64, dynamic_dim=16, ffn_dim=256, num_heads=4,
                   mask_convs=2, mask_channels=32)
        return replace(base, **overrides)


@dataclass
class MaskRCNNConfig:
    """Mask R-CNN settings; the defaults are torchvision's (and the paper's) full-size ones."""

    backbone: str = "resnet50"
    num_classes: int = 80  # foreground classes; torchvision's background class is added internally
    frozen_stages: int = 1  # stem + C2 frozen, C3..C5 train (torchvision's default trainable_layers=3)
    min_size: int = 800
    max_size: int = 1333
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    mask_threshold: float = 0.5
    fpn_channels: int = 256
    box_head_dim: int = 1024  # the two-layer MLP of the box head
    mask_head_channels: int = 256  # the four 3x3 convs and the deconvolution of the mask head

    @classmethod
    def small(cls, **overrides) -> MaskRCNNConfig:
        """A CPU-sized model, heads as narrow as K-Net's small ones (64-channel FPN and mask head, 256-d box
        MLP), few proposals and RoIs (the mask head's 14x14 convs on up to 25% positive RoIs dominate a CPU
        step, hence 32 RoIs); ResNet-18 at 128-192 px unless overridden (the commands pass the backbone and
        the image size)."""
        base = cls(backbone="resnet18", min_size=128, max_size=192, rpn_pre_nms_top_n_train=200,
                   rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                   box_batch_size_per_image=32, fpn_channels=64, box_head_dim=256, mask_head_channels=64)
        return replace(base, **overrides)


# The query-based models by name (models.build adds each one's build function).
QUERY_MODEL_CONFIGS = {"knet": KNetConfig, "mask2former": Mask2FormerConfig, "queryinst": QueryInstConfig}


def model_kind(cfg) -> str:
    """The name of the query-based model a config belongs to."""
    return next(kind for kind, config in QUERY_MODEL_CONFIGS.items() if isinstance(cfg, config))
