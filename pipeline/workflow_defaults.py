"""The stage settings of the workflow's config (config/config.yaml, experiments/*.yaml) and their defaults.

Each default is read from the stage's settings dataclass, where `sp` reads it too, so a key a config leaves out
means what the command does when its option is left out. The Snakefile fills these in before it names stores
and pre-training runs by their settings, so that a config spelling out a default and one leaving it out share
their stores and runs (docs/defaults.md).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.cli_common import DEFAULT_BACKBONE_WEIGHTS, settings_defaults
from stages.settings import FinetuneConfig, GenerationSettings, PretrainConfig, RunOptions


def workflow_defaults() -> dict:
    """{config key: its default}; `gen_masks` is a dict of its own keys (the settings every store starts from)."""
    gen, run = GenerationSettings(), RunOptions()
    pre, ft = settings_defaults(PretrainConfig), settings_defaults(FinetuneConfig)
    return {
        "gen_masks": {"method": gen.method, "backbone": gen.backbone, "backbone_weights": DEFAULT_BACKBONE_WEIGHTS,
                      "image_size": gen.image_size, "max_size": gen.max_size, "min_score": gen.saliency.min_score,
                      "max_masks": gen.saliency.max_masks, "nms": gen.saliency.nms, "refine": gen.refine.method,
                      "random_boxes": gen.random_boxes},
        "gen_batch_size": run.batch_size,
        "small_models": ft.small,  # pre-training and fine-tuning (PretrainConfig's model is the full-size one)
        "pretrain_epochs": pre.epochs,
        "pretrain_batch_size": pre.batch_size,
        "pretrain_lr_steps": list(pre.schedule.lr_steps),
        "pretrain_warmup_steps": pre.schedule.warmup_steps,
        "pretrain_image_size": pre.image_size,
        "pretrain_max_size": pre.max_size,
        "prompt": pre.prompt.mode,  # the query models' (PretrainConfig's model is K-Net)
        "kernel_loss_weight": pre.kernel_loss_weight,
        "finetune_epochs": ft.epochs,
        "finetune_batch_size": ft.batch_size,
        "finetune_lr_steps": list(ft.schedule.lr_steps),
        "finetune_warmup_steps": ft.schedule.warmup_steps,
        "finetune_image_size": ft.image_size,
        "finetune_max_size": ft.max_size,
        "finetune_rotate": ft.rotate_deg,
        "finetune_frozen_stages": ft.frozen_stages,
        "finetune_eval_at": list(ft.eval_at),
    }


def merged(base: dict, over: dict) -> dict:
    """Snakemake's layering of config files: dicts merge key by key, every other value is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def layered_config(path: str | Path) -> dict:
    """A config file with the files it `extends` laid under it, as the Snakefile reads it (without config.yaml and
    the stage defaults): each base is found relative to the working directory, else to this repository."""
    own = yaml.safe_load(Path(path).read_text()) or {}
    bases = own.pop("extends", None) or []
    config = {}
    for base in [bases] if isinstance(bases, str) else bases:
        found = Path(base) if Path(base).exists() else Path(__file__).resolve().parents[1] / base
        config = merged(config, layered_config(found))
    return merged(config, own)
