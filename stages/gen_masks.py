"""Stage 1, `sp gen-masks`: images → backbone C5 → pseudo masks → pseudo-label store.

The device loop only runs the backbone and the batched steps of the proposal method (saliency, NMS, the
refinement on its working grid); decoding, resizing and the image-only part of the refinement (superpixels)
happen in DataLoader workers, and the per-image work at the original size (upsampling, thresholding, filters,
the copy to the CPU), RLE encoding and store writes in a writer thread, so the stage is bound by the backbone.
The same loop serves every proposal method (saliency, random boxes, imported masks): a method takes a batch's
C5 features, runs its batched device steps, and returns a function that makes the per-image masks, which the
writer thread calls.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import zlib
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.backbone import build_backbone
from models.backbone_weights import file_sha256
from models.mask_refinement import superpixels
from models.saliency import image_masks, kept_maps, mask_boxes, select_candidates
from stages.image_data import Batch, ImageFolder, batch_loader, list_images
from stages.settings import GenerationSettings, RunOptions
from store import rle
from store.pseudo_label_store import DONE, SKIPPED, ImageResult, PseudoLabelStore

log = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' → (I, N), 0 ≤ I < N."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return index, count


def part_path(store: Path, shard: tuple[int, int]) -> Path:
    """Where shard I of N writes: a sibling of the final store, merged by `sp store merge`."""
    index, count = shard
    return store.with_name(f"{store.stem}.part{index:03d}-of-{count:03d}.zarr")


def shard_range(num_images: int, shard: tuple[int, int] | None, batch_size: int) -> range:
    """The images of one shard: contiguous, with bounds on batch boundaries, so that every batch equals the
    batch a single process would have formed and the merged store equals a single-process store."""
    if shard is None:
        return range(num_images)
    index, count = shard
    per_shard = math.ceil(math.ceil(num_images / batch_size) / count) * batch_size
    return range(min(index * per_shard, num_images), min((index + 1) * per_shard, num_images))


# ---- proposal methods: (C5 features, batch) → a function giving masks, boxes, scores, seeds per image -------
Proposal = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # masks, box, score, seed, feature
Finish = Callable[[], list[Proposal]]  # a batch's per-image work at the original size, run in the writer thread


def saliency_proposals(c5: torch.Tensor, batch: Batch, settings: GenerationSettings) -> Finish:
    """Candidates, NMS and the refinement on the working grid, batched on the device; the masks at the original
    size (upsampling, threshold, filters) are made per image by the returned function."""
    cand = select_candidates(c5, batch.grid_valid(c5.shape[-2:]).to(c5.device), settings.saliency)
    refine = settings.refine
    slots, maps = kept_maps(cand, batch.grid_hw, batch.resized_hw, settings.saliency, refine, batch.images,
                            batch.segments)
    refined = refine.method != "none"

    def masks_at_image_size() -> list[Proposal]:
        out = []
        for b, (kept, soft) in enumerate(zip(slots, maps)):
            keep, masks, boxes = image_masks(soft, batch.grid_hw[b], batch.resized_hw[b], batch.image_hw[b],
                                             settings.saliency, settings.mask_threshold, refined)
            slot = kept[keep]
            out.append((masks, boxes, cand.score[b, slot], cand.seed[b, slot], cand.seed_feature[b, slot]))
        return out

    return masks_at_image_size


def pooled_features(c5: torch.Tensor, index: int, masks: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Unit C5 features averaged inside masks given at original resolution. masks: (K, H, W) → (K, D).

    Each C5 cell is weighted by the fraction of it that the mask covers (masks are resized to the backbone
    input, padded, then average-pooled by 32)."""
    if not len(masks):  # an image with no object (e.g. an unannotated one in an imported COCO file)
        return c5.new_zeros((0, c5.shape[1]), dtype=torch.float32)
    (gh, gw), (rh, rw) = batch.grid_hw[index], batch.resized_hw[index]
    unit = F.normalize(c5[index, :, :gh, :gw].float(), dim=0)
    resized = F.interpolate(masks[None].float(), size=(rh, rw), mode="nearest")[0]
    cover = F.avg_pool2d(F.pad(resized, (0, gw * 32 - rw, 0, gh * 32 - rh)), 32)  # (K, gh, gw)
    pooled = torch.einsum("khw,dhw->kd", cover, unit) / cover.sum((1, 2)).clamp_min(1e-6)[:, None]
    return F.normalize(pooled, dim=1)


def random_proposals(c5: torch.Tensor, batch: Batch, settings: GenerationSettings) -> Finish:
    """UP-DETR-style random boxes (the paper's Table 7 baseline), seeded per file name so that shards and
    resumed runs draw the same boxes. All of it is per-image work at the original size (the returned function)."""

    def boxes() -> list[Proposal]:
        out = []
        for b, name in enumerate(batch.file_name):
            height, width = batch.image_hw[b]
            rng = np.random.default_rng([settings.random_seed, zlib.crc32(name.encode())])
            size = rng.uniform(0.1, 0.6, (settings.random_boxes, 2)) * (width, height)
            corner = rng.uniform(0, 1, (settings.random_boxes, 2)) * ((width, height) - size)
            xyxy = np.round(np.concatenate([corner, corner + size], 1)).astype(int)
            masks = torch.zeros(len(xyxy), height, width, dtype=torch.bool, device=c5.device)
            for k, (x1, y1, x2, y2) in enumerate(xyxy):
                masks[k, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)] = True
            score = torch.as_tensor(rng.uniform(0, 1, len(xyxy)), dtype=torch.float32, device=c5.device)
            seed = torch.tensor([[-1, -1, 0]] * len(xyxy), device=c5.device)
            out.append((masks, mask_boxes(masks), score, seed, pooled_features(c5, b, masks, batch)))
        return out

    return boxes


PROPOSERS: dict[str, Callable] = {"saliency": saliency_proposals, "random": random_proposals}


# ---- the run loop -------------------------------------------------------------------------------------------
def image_folder(images_dir: Path, names: list[str], settings: GenerationSettings, first_index: int = 0) -> ImageFolder:
    """Stage 1's dataset: decoding and resizing and, with `--refine superpixel`, the superpixels, which depend
    on the image alone and so are made in the DataLoader workers too."""
    segment = partial(superpixels, cfg=settings.refine) if settings.refine.method == "superpixel" else None
    return ImageFolder(images_dir, names, settings.image_size, settings.max_size, first_index, segment)


def to_results(batch: Batch, proposals: list[Proposal]) -> list[ImageResult]:
    """Device tensors → numpy results in plan order (in the writer thread, which encodes the RLE next)."""
    results = [ImageResult(index=i, status=SKIPPED, reason=reason) for i, _, reason in batch.failed]
    for b, (masks, box, score, seed, feature) in enumerate(proposals):
        height, width = batch.image_hw[b]
        results.append(ImageResult(
            index=batch.index[b], height=height, width=width, status=DONE,
            rle=masks.cpu().numpy(),  # (K, H, W) bool; replaced by the encoded strings in the writer
            box=box.cpu().numpy().astype(np.float32), score=score.cpu().numpy().astype(np.float32),
            seed=seed.cpu().numpy().astype(np.int16), seed_feature=feature.cpu().numpy().astype(np.float16)))
    return sorted(results, key=lambda r: r.index)


class StoreWriter(threading.Thread):
    """Finishes each batch off the device loop: runs its per-image work (the proposal method's `Finish`), copies
    the results to the CPU, encodes RLE and appends them to the store; errors surface in `put`.

    Results are committed in groups of at least `commit_images` images: each commit rewrites the open chunk
    of every array, so committing every small batch would cost more than the work it protects."""

    def __init__(self, store: PseudoLabelStore, on_written: Callable[[list[ImageResult]], None],
                 commit_images: int = 32):
        super().__init__(daemon=True)
        self.store, self.on_written, self.commit_images = store, on_written, commit_images
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None

    def run(self):
        pending: list[ImageResult] = []
        while True:
            item = self.queue.get()  # (batch, finish), or None after the last batch
            if self.error is not None:
                if item is None:
                    return
                continue
            try:
                if item is not None:
                    batch, finish = item
                    with torch.inference_mode():
                        results = to_results(batch, finish() if finish else [])
                    for r in results:
                        if r.status == DONE:
                            r.rle = rle.encode_batch(r.rle)
                    pending += results
                if pending and (item is None or len(pending) >= self.commit_images):
                    self.store.append(pending)
                    self.on_written(pending)
                    pending = []
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e
            if item is None:
                return

    def put(self, batch: Batch, finish: Finish | None):
        """Queue a batch and its per-image work (None: every image of the batch failed to load)."""
        if self.error is not None:
            raise self.error
        self.queue.put((batch, finish))

    def close(self):
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def generate(images_dir: Path, store_path: Path, settings: GenerationSettings, options: RunOptions,
             backbone_weights: Path | None = None, file_names: list[str] | None = None,
             proposer: Callable | None = None, extra_attrs: dict | None = None,
             backbone: torch.nn.Module | None = None) -> PseudoLabelStore:
    """Run stage 1 (or resume it) and return the finished store (a part store with --shard).

    file_names: the images to process, relative to images_dir (default: every image in the folder).
    proposer: the proposal method (default: PROPOSERS[settings.method]): (C5, batch, settings) → `Finish`.
    backbone: an already built C5 backbone to reuse (it must be the one `settings` and `backbone_weights`
    describe); by default it is built here.
    """
    images_dir = Path(images_dir)
    names = file_names if file_names is not None else list_images(images_dir)
    if options.limit is not None:
        names = names[: options.limit]
    span = shard_range(len(names), options.shard, options.batch_size)
    names = names[span.start:span.stop]
    if options.shard is not None:
        store_path = part_path(Path(store_path), options.shard)
    if backbone_weights is not None:
        settings.backbone_weights_sha256 = file_sha256(backbone_weights)
    if backbone is None:
        torch.manual_seed(settings.init_seed)  # a random backbone must at least be the same on resume
        backbone = build_backbone(settings.backbone, backbone_weights, out_levels=("c5",))
    backbone = backbone.to(options.device).eval()
    attrs = {"images_root": str(images_dir.resolve()), "shard": list(options.shard or (0, 1)),
             "image_range": [span.start, span.stop], "batch_size": options.batch_size,
             "backbone_weights": None if backbone_weights is None else str(backbone_weights), **(extra_attrs or {})}
    store = PseudoLabelStore.open_for_append(store_path, names, settings.to_dict(),
                                             backbone.channels["c5"], attrs)
    if store.complete:
        log.info("%s is complete already (%d images)", store_path, store.num_images)
        return store
    start = store.images_done
    if start % options.batch_size:
        log.warning("resuming at image %d, not a multiple of --batch-size %d: the batches differ from the "
                    "first run's", start, options.batch_size)
    propose = proposer or PROPOSERS[settings.method]
    dataset = image_folder(images_dir, names[start:], settings, first_index=start)
    bar = tqdm(total=len(names), initial=start, unit="img", desc=f"gen-masks {store_path.name}")
    stats = {"masks": 0, "skipped": 0}

    def on_written(results):
        stats["masks"] += sum(len(r.rle) for r in results)
        stats["skipped"] += sum(r.status == SKIPPED for r in results)
        bar.update(len(results))
        bar.set_postfix(masks=stats["masks"], skipped=stats["skipped"])

    writer = StoreWriter(store, on_written, options.commit_images)
    writer.start()
    try:
        with torch.inference_mode():
            for batch in batch_loader(dataset, options.batch_size, options.workers):
                finish = None
                if batch.index:  # not every image of the batch failed to load
                    batch = batch.to(options.device)
                    finish = propose(backbone(batch.images)["c5"], batch, settings)
                for _, name, reason in batch.failed:
                    log.warning("skipped %s: %s", name, reason)
                writer.put(batch, finish)
    finally:
        writer.close()
        bar.close()
    store.finalize()
    log.info("%s: %d images, %d masks, %d skipped", store_path, store.num_images,
             store.progress["masks_done"], len(store.skipped))
    return store
