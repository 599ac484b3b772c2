"""Images/s of one pre-training step (forward with prompts, matching, losses, backward, AdamW step), and of the
pre-training data path: reading the store vs recomputing saliency in the loader (the reason the store exists).

    python bench/train_step.py --config small --image-size 320 --batch-size 4 --steps 5
    python bench/train_step.py --config default --device cuda --batch-size 8     # where a GPU is lent

Data: the demo's unlabeled ground truth imported as a store (written once under --work).
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
from models.knet import KNetConfig, build_knet  # noqa: E402
from models.saliency_prompt import SaliencyPrompt  # noqa: E402
from pipeline.demo_data import make_demo_data  # noqa: E402
from stages.gen_masks import GenerationSettings, RunOptions, generate  # noqa: E402
from stages.import_coco import import_coco  # noqa: E402
from stages.pretrain import PretrainConfig, training_step  # noqa: E402
from stages.pseudo_label_data import PseudoLabelDataset, collate_training  # noqa: E402

warnings.filterwarnings("ignore", message=".*RANDOM weights.*")


def data(work: Path, image_size: int, max_size: int):
    demo = work / "demo"
    if not demo.is_dir():
        make_demo_data(demo, num_unlabeled=32, num_train=1, num_val=1, image_size=(480, 640))
    store = work / f"gt-{image_size}.zarr"
    if not store.exists():
        import_coco(demo / "annotations" / "unlabeled_gt.json", demo / "unlabeled", store, backbone="resnet18",
                    image_size=image_size, max_size=max_size, options=RunOptions(workers=0))
    return store, demo / "unlabeled"


def step_rate(args, store, images) -> dict:
    model_cfg = KNetConfig.small(num_classes=1, frozen_stages=4) if args.config == "small" else \
        KNetConfig(num_classes=1, frozen_stages=4)
    dataset = PseudoLabelDataset(store, images, args.image_size, args.max_size)
    batch = collate_training([dataset[i % len(dataset)] for i in range(args.batch_size)])
    model = build_knet(model_cfg).to(args.device).train()
    prompt = SaliencyPrompt(dataset.feature_dim, model_cfg.channels).to(args.device).train()
    params = [p for p in list(model.parameters()) + list(prompt.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    cfg = PretrainConfig(store=store, images=images, out=args.work, model=model_cfg)

    def one(step):
        losses = training_step(model, prompt, batch, cfg, step, args.device)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    one(0)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(args.steps):
        one(step + 1)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"config": args.config, "device": args.device, "batch_size": args.batch_size,
            "input": list(batch["images"].shape[-2:]), "threads": torch.get_num_threads(),
            "train_img_per_s": args.batch_size * args.steps / elapsed}


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
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=533)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=16, help="samples for the data-path comparison")
    parser.add_argument("--saliency-backbone", default="resnet50")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sp-bench-train"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store, images = data(args.work, args.image_size, args.max_size)
    print(json.dumps({**step_rate(args, store, images), **loader_rates(args, store, images)}, indent=2))


if __name__ == "__main__":
    main()
