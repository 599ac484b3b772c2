"""The query-based models by name: their config class and build function, for the commands and checkpoints.

Adding a model is its config in ``models.settings.QUERY_MODEL_CONFIGS`` and one entry in ``QUERY_MODELS``; every
stage reaches models only through these functions and the interface of ``models.query_model``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from models.knet import build_knet
from models.mask2former import build_mask2former
from models.queryinst import build_queryinst
from models.settings import QUERY_MODEL_CONFIGS, model_kind


@dataclass(frozen=True)
class QueryModelSpec:
    config: type
    build: Callable[..., nn.Module]  # build(cfg, backbone_weights)
    num_queries_field: str  # the config field holding N (K-Net calls its queries kernels)


QUERY_MODELS = {
    "knet": QueryModelSpec(QUERY_MODEL_CONFIGS["knet"], build_knet, "num_kernels"),
    "mask2former": QueryModelSpec(QUERY_MODEL_CONFIGS["mask2former"], build_mask2former, "num_queries"),
    "queryinst": QueryModelSpec(QUERY_MODEL_CONFIGS["queryinst"], build_queryinst, "num_proposals"),
}


def query_model_spec(kind: str) -> QueryModelSpec:
    if kind in QUERY_MODELS:
        return QUERY_MODELS[kind]
    raise ValueError(f"unknown query-based model {kind!r}: expected one of {', '.join(QUERY_MODELS)}")


def query_model_config(kind: str, *, small: bool, backbone: str, num_queries: int | None = None, **fields):
    """The config of model `kind` on `backbone`: the CPU-sized one when `small`, else the full-size one;
    `num_queries` (None: the config's default) and other fields override."""
    spec = query_model_spec(kind)
    config = spec.config.small if small else spec.config
    if num_queries:
        fields[spec.num_queries_field] = num_queries
    return config(backbone=backbone, **fields)


def build_query_model(cfg, backbone_weights: Path | None = None) -> nn.Module:
    """The model of a config (any of QUERY_MODELS' config classes)."""
    return QUERY_MODELS[model_kind(cfg)].build(cfg, backbone_weights)
