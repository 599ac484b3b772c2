"""`sp prompt-stats`: what the Saliency Prompt does inside a pre-trained model, on its own pseudo labels.

For the issue "does SP help, and if not, why": how many pseudo masks per image reach the matcher, how many
queries receive a prompt and how many distinct prompts they share, and whether the query that the Hungarian
matcher pairs with pseudo mask l is the one that received prompt l (if it rarely is, the prompt cannot act
as the "which object" hint the paper describes). Prompt dropout is off: the statistics are of the matching
itself.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from models.build import query_model_spec
from models.saliency_prompt import PromptConfig, SaliencyPrompt
from stages.inference import build_model
from stages.pseudo_label_data import PseudoLabelDataset, collate_training
from stages.training import read_checkpoint


def image_prompt_stats(assignment: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor], num_masks: int) -> dict:
    """Statistics of one image. assignment: (N,) prompt index per query (-1: none); pairs: the matcher's
    (query idx, pseudo-mask idx) of the last stage; num_masks: L, the image's pseudo masks (= its prompts)."""
    given = assignment[assignment >= 0]
    queries, masks = pairs
    agree = (assignment[queries] == masks).float()
    return {"masks": num_masks, "prompted_queries": int(len(given)),
            "distinct_prompts": int(given.unique().numel()),
            "max_queries_per_prompt": int(given.bincount().max()) if len(given) else 0,
            "matched": int(len(queries)), "matched_query_got_its_prompt": float(agree.mean()) if len(agree) else None}


@torch.no_grad()
def prompt_stats(checkpoint: Path, store: Path, images: Path, limit: int | None = None, device: str = "cpu",
                 batch_size: int = 4) -> dict:
    """Per-image statistics (see `image_prompt_stats`) over the first `limit` images of the store, and their
    means, for a `sp pretrain` checkpoint with prompts (mode cosine, sequential or random)."""
    state = read_checkpoint(checkpoint, "checkpoint")
    if state.get("kind") != "sp-pretrain":
        raise ValueError(f"{checkpoint} is not a `sp pretrain` checkpoint (kind {state.get('kind')!r})")
    args = state["args"]
    prompt_cfg = PromptConfig(**args["prompt"])
    if prompt_cfg.mode == "none":
        raise ValueError(f"{checkpoint} was pre-trained without prompts (--prompt none): nothing to measure")
    kind = state.get("model_kind", "knet")
    model = build_model(kind, state["model_config"])
    model.load_state_dict(state["model"])
    dataset = PseudoLabelDataset(store, images, args["image_size"], args["max_size"], flip_prob=0.0)
    prompt = SaliencyPrompt(dataset.feature_dim, model.cfg.channels, prompt_cfg)
    prompt.load_state_dict(state["prompt"])
    model, prompt = model.to(device).eval(), prompt.to(device).eval()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    per_image = []
    for start in range(0, count, batch_size):
        batch = collate_training([dataset[k] for k in range(start, min(start + batch_size, count))])
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        generator = torch.Generator().manual_seed(start)  # the random mode's order
        stages, _ = model(batch["images"].to(device), prompt.prompt_fn([t["boxes"] for t in targets], generator))
        _, assignments = model.losses(stages, targets)
        for b, target in enumerate(targets):
            per_image.append(image_prompt_stats(prompt.last_assignment[b].cpu(), assignments[-1][b],
                                                len(target["labels"])))

    def mean(key):  # over the images where it is defined (no match: no agreement to measure)
        values = [r[key] for r in per_image if r[key] is not None]
        return statistics.fmean(values) if values else None

    return {"checkpoint": str(checkpoint), "mode": prompt_cfg.mode,
            "queries": getattr(model.cfg, query_model_spec(kind).num_queries_field), "images": len(per_image),
            "mean": {key: mean(key) for key in per_image[0]}, "per_image": per_image}


def format_stats(stats: dict) -> str:
    m = stats["mean"]
    agree = "-" if m["matched_query_got_its_prompt"] is None else f"{100 * m['matched_query_got_its_prompt']:.0f} %"
    return (f"{stats['checkpoint']} ({stats['mode']} prompts, {stats['queries']} queries, {stats['images']} images):\n"
            f"  pseudo masks per image {m['masks']:.1f}; queries with a prompt {m['prompted_queries']:.1f}; distinct "
            f"prompts used {m['distinct_prompts']:.1f}; most queries on one prompt {m['max_queries_per_prompt']:.1f}\n"
            f"  matched queries (last stage) {m['matched']:.1f}; of them, the query matched to pseudo mask l had "
            f"received prompt l: {agree}")
