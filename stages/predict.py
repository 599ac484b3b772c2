"""`sp predict`: a fine-tuned model over a folder of images → COCO results JSON and PNG overlays."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from stages.evaluate import predictions_to_results
from stages.image_data import list_images, load_image
from stages.inference import predict_images
from stages.viz import overlay

log = logging.getLogger(__name__)


def predict_folder(model, state: dict, images_dir: Path, out: Path, score_threshold: float = 0.3,
                   overlays: int = 16, device: str = "cpu", batch_size: int = 2, workers: int = 2) -> Path:
    """Writes out/results.json (a COCO results list plus file_name; image_id = position in the sorted folder
    + 1) and out/overlays/*.png for the first `overlays` images. Returns the results path."""
    names = list_images(images_dir)
    args, category_ids = state["args"], [c["id"] for c in state["categories"]]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, pred in predict_images(model, state["model_kind"], images_dir, names, args["image_size"],
                                      args["max_size"], device, batch_size, workers):
        keep = pred["scores"] >= score_threshold
        pred = {k: v[keep] for k, v in pred.items()}
        for r in predictions_to_results([pred], [index + 1], category_ids):
            results.append({**r, "file_name": names[index]})
        if index < overlays:
            (out / "overlays").mkdir(exist_ok=True)
            masks = list(pred["masks"].numpy())
            image = overlay(load_image(images_dir / names[index]), masks, pred["boxes"].numpy(), pred["scores"].numpy())
            image.save(out / "overlays" / f"{Path(names[index]).stem}.png")
    path = out / "results.json"
    path.write_text(json.dumps(results))
    log.info("%d instances on %d images -> %s", len(results), len(names), path)
    return path
