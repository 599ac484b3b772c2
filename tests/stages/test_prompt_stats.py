"""Tests for stages.prompt_stats (`sp prompt-stats`): what the Saliency Prompt does in a pre-trained model."""
import json

import pytest
import torch
from typer.testing import CliRunner

from models.knet import KNetConfig
from models.saliency_prompt import PromptConfig
from pipeline.cli import app
from stages.gen_masks import RunOptions
from stages.import_coco import import_coco
from stages.pretrain import PretrainConfig, pretrain
from stages.prompt_stats import image_prompt_stats
from stages.training import Schedule


def test_image_statistics_count_what_they_say():
    # 6 queries; prompts 0, 0, 2, -, 2, 0 (query 3 has none); the matcher paired queries 1, 4, 3 with masks 0, 1, 2
    assignment = torch.tensor([0, 0, 2, -1, 2, 0])
    stats = image_prompt_stats(assignment, (torch.tensor([1, 4, 3]), torch.tensor([0, 1, 2])), num_masks=3)
    assert stats == {"masks": 3, "prompted_queries": 5, "distinct_prompts": 2, "max_queries_per_prompt": 3,
                     "matched": 3, "matched_query_got_its_prompt": pytest.approx(1 / 3)}  # only query 1 -> mask 0
    empty = image_prompt_stats(torch.full((4,), -1), (torch.zeros(0, dtype=torch.long),) * 2, num_masks=0)
    assert empty["prompted_queries"] == 0 and empty["matched_query_got_its_prompt"] is None


@pytest.fixture(scope="module")
def pretrained(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    store = root / "gt.zarr"
    import_coco(demo["unlabeled_ann"], demo["unlabeled"], store, backbone="resnet18", image_size=128, max_size=192,
                options=RunOptions(batch_size=4, workers=0, limit=4))
    runs = {}
    for mode in ("cosine", "none"):
        cfg = PretrainConfig(store=store, images=demo["unlabeled"], out=root / mode, epochs=1, batch_size=2,
                             model=KNetConfig.small(backbone="resnet18", num_classes=1, frozen_stages=4, num_kernels=8),
                             image_size=128, max_size=192, workers=0, schedule=Schedule(warmup_steps=1),
                             prompt=PromptConfig(mode=mode))
        runs[mode] = pretrain(cfg)
    return store, runs


def test_cli_reports_cosine_matching_and_refuses_a_run_without_prompts(pretrained, demo, tmp_path):
    store, runs = pretrained
    args = ["--store", str(store), "--images", str(demo["unlabeled"]), "--device", "cpu"]
    result = CliRunner().invoke(app, ["prompt-stats", str(runs["cosine"]), *args, "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "cosine prompts, 8 queries, 4 images" in result.output
    stats = json.loads((tmp_path / "s.json").read_text())
    assert len(stats["per_image"]) == 4
    for image in stats["per_image"]:  # cosine: every query takes its most similar prompt when there is one
        assert image["prompted_queries"] == (8 if image["masks"] else 0)
        assert image["distinct_prompts"] <= image["masks"] and image["matched"] == min(8, image["masks"])
    result = CliRunner().invoke(app, ["prompt-stats", str(runs["none"]), *args])
    assert result.exit_code == 2 and "without prompts" in result.output
