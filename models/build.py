"""The query-based models by name: their config class and build function, for the commands and checkpoints.

Adding a model is one entry in ``QUERY_MODELS``; every stage reaches models only through these functions and
the interface of ``models.query_model``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from models.knet import KNetConfig, build_knet
from models.mask2former import Mask2FormerConfig, build_mask2former


@dataclass(frozen=True)
class QueryModelSpec:
    config: type
    build: Callable[..., nn.Module]  # build(cfg, backbone_weights)
    num_queries_field: str  # the config field holding N (K-Net calls its queries kernels)


QUERY_MODELS = {
    "knet": QueryModelSpec(KNetConfig, build_knet, "num_kernels"),
    "mask2former": QueryModelSpec(Mask2FormerConfig, build_mask2former, "num_queries"),
}
PLANNED_MODELS = ("queryinst",)  # accepted by the commands, refused with a clear message until implemented


def query_model_spec(kind: str) -> QueryModelSpec:
    if kind in QUERY_MODELS:
        return QUERY_MODELS[kind]
    if kind in PLANNED_MODELS:
        raise ValueError(f"--model {kind} is not yet implemented (available: {', '.join(QUERY_MODELS)})")
    raise ValueError(f"unknown query-based model {kind!r}: expected one of {', '.join(QUERY_MODELS)}")


def query_model_config(kind: str, *, small: bool, backbone: str, num_queries: int | None = None, **fields):
    """The config of model `kind` on `backbone`: the CPU-sized one when `small`, else the full-size one;
    `num_queries` (None: the config's default) and other fields override."""
    spec = query_model_spec(kind)
    config = spec.config.small if small else spec.config
    if num_queries:
        fields[spec.num_queries_field] = num_queries
    return config(backbone=backbone, **fields)


def model_kind(cfg) -> str:
    """The name of the model a config belongs to."""
    return next(kind for kind, spec in QUERY_MODELS.items() if isinstance(cfg, spec.config))


def build_query_model(cfg, backbone_weights: Path | None = None) -> nn.Module:
    """The model of a config (any of QUERY_MODELS' config classes)."""
    return QUERY_MODELS[model_kind(cfg)].build(cfg, backbone_weights)
