"""Images/s of one pre-training step (forward with prompts, matching, losses, kernel supervision, backward, AdamW
step) and one fine-tuning step (the same without prompts, on labeled data) of every query model, and of the
pre-training data path: reading the store vs recomputing saliency in the loader (the reason the store exists).

    python bench/train_step.py --config small --image-size 320 --batch-size 4 --steps 5
    python bench/train_step.py --config default --device cuda --batch-size 8     # where a GPU is lent

Data: the demo's unlabeled ground truth imported as a store, and the demo's labeled train set (written once
under --work).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.build import QUERY_MODELS, build_query_model, query_model_config  # noqa: E402
from models.saliency_prompt import SaliencyPrompt  # noqa: E402
from pipeline.demo_data import make_demo_data  # noqa: E402
from stages.coco_data import CocoInstances  # noqa: E402
from stages.gen_masks import GenerationSettings, RunOptions, generate  # noqa: E402
from stages.import_coco import import_coco  # noqa: E402
from stages.pretrain import PretrainConfig, training_step  # noqa: E402
from stages.pseudo_label_data import PseudoLabelDataset, collate_training  # noqa: E402
from stages.training import forward_losses  # noqa: E402
from store.pseudo_label_store import PseudoLabelStore  # noqa: E402

warnings.filterwarnings("ignore", message=".*RANDOM weights.*")


def data(work: Path, image_size: int, max_size: int):
    demo = work / "demo"
    if not demo.is_dir():
        make_demo_data(demo, num_unlabeled=32, num_train=8, num_val=1, image_size=(480, 640))
    store = work / f"gt-{image_size}.zarr"
    if not store.exists():
        import_coco(demo / "annotations" / "unlabeled_gt.json", demo / "unlabeled", store, backbone="resnet18",
                    image_size=image_size, max_size=max_size, options=RunOptions(workers=0))
    return store, demo / "unlabeled"


def training_step_fn(args, kind: str, stage: str, store, images):
    """One `stage` ('pretrain' or 'finetune') step of model `kind` as the stages configure it (pre-training: one
    class, frozen backbone, prompts and kernel supervision; fine-tuning: the demo's 3 classes, backbone stage 1
    frozen, no prompts), as a function of the step number, and the batch's input size."""
    demo = args.work / "demo"
    if stage == "pretrain":
        dataset = PseudoLabelDataset(store, images, args.image_size, args.max_size)
        num_classes, frozen = 1, 4
    else:
        dataset = CocoInstances(demo / "annotations" / "train.json", demo / "train", args.image_size, args.max_size)
        num_classes, frozen = len(dataset.categories), 1
    model_cfg = query_model_config(kind, small=args.config == "small", backbone=args.backbone,
                                   num_classes=num_classes, frozen_stages=frozen)
    batch = collate_training([dataset[i % len(dataset)] for i in range(args.batch_size)])
    model = build_query_model(model_cfg).to(args.device).train()
    feature_dim = int(PseudoLabelStore.open(store).attrs["feature_dim"])
    prompt = SaliencyPrompt(feature_dim, model_cfg.channels).to(args.device).train()
    params = [p for p in list(model.parameters()) + list(prompt.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    cfg = PretrainConfig(store=store, images=images, out=args.work, model=model_cfg)

    def one(step):
        if stage == "pretrain":
            losses = training_step(model, prompt, batch, cfg, step, args.device)
        else:
            targets = [{k: v.to(args.device) for k, v in t.items()} for t in batch["targets"]]
            losses = forward_losses(model, batch["images"].to(args.device), targets, args.device)[1]
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    return one, list(batch["images"].shape[-2:])


def step_rates(args, store, images) -> list[dict]:
    """Images/s of every (model, stage): `--repeats` rounds that time `--steps` steps of each in turn (so that
    load on a shared machine hits all alike), keeping each one's best round."""
    setups = {(kind, stage): training_step_fn(args, kind, stage, store, images)
              for kind in args.models for stage in ("pretrain", "finetune")}
    best = dict.fromkeys(setups, 0.0)
    for one, _ in setups.values():
        one(0)  # warm-up
    for _ in range(args.repeats):
        for key, (one, _) in setups.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for step in range(args.steps):
                one(step + 1)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best[key] = max(best[key], args.batch_size * args.steps / (time.perf_counter() - start))
    return [{"model": kind, "stage": stage, "config": args.config, "device": args.device, "batch_size": args.batch_size,
             "input": size, "threads": torch.get_num_threads(), "img_per_s": round(best[kind, stage], 3)}
            for (kind, stage), (_, size) in setups.items()]


def loader_rates(args, store, images) -> dict:
    """Samples/s of the store-reading dataset vs a loader that recomputes saliency per sample (backbone +
    saliency + NMS + upsampling, what OursNet-style online generation does), same images."""
    dataset = PseudoLabelDataset(store, images, args.image_size, args.max_size)
    n = min(len(dataset), args.samples)
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    store_rate = n / (time.perf_counter() - start)
    names = [dataset.names[i].decode() for i in dataset.images[:n]]
    settings = GenerationSettings(backbone=args.saliency_backbone, image_size=args.image_size, max_size=args.max_size)
    target = args.work / "recompute.zarr"
    if target.exists():
        import shutil
        shutil.rmtree(target)
    start = time.perf_counter()
    generate(images, target, settings, RunOptions(batch_size=1, workers=0, device=args.device), file_names=names)
    recompute_rate = n / (time.perf_counter() - start)
    return {"samples": n, "store_samples_per_s": store_rate, "recompute_samples_per_s": recompute_rate,
            "saliency_backbone": args.saliency_backbone, "speedup": store_rate / recompute_rate}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["small", "default"], default="small")
    parser.add_argument("--models", nargs="+", choices=list(QUERY_MODELS), default=list(QUERY_MODELS))
    parser.add_argument("--backbone", default="efficientnet_lite0", help="speed does not depend on the weights")
    parser.add_argument("--no-loader", action="store_true", help="skip the data-path comparison")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=533)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="timing rounds; the best of each is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=16, help="samples for the data-path comparison")
    parser.add_argument("--saliency-backbone", default="resnet50")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sp-bench-train"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store, images = data(args.work, args.image_size, args.max_size)
    steps = step_rates(args, store, images)
    print(json.dumps({"steps": steps, **({} if args.no_loader else loader_rates(args, store, images))}, indent=2))


if __name__ == "__main__":
    main()
