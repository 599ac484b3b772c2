"""`sp split`: divide a COCO instances JSON into a labeled and an unlabeled part (semi-supervised settings).

The split is by image: each part keeps every annotation of its images (crowd ones included) and all categories,
so both files load as ordinary COCO datasets with the same category ids. Output names follow MMDetection's
split tool / FreeSOLO: `instances_train2017.{seed}@{percent}_labeled.json` and `..._unlabeled.json`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from stages.coco_check import TRAINING, load_checked_coco, write_skipped
from stages.coco_data import one_class

log = logging.getLogger(__name__)


def _partition(dataset: dict, labeled_ids: set[int]) -> tuple[dict, dict]:
    """(labeled, unlabeled) dicts; images and annotations keep their file order, other keys are shared."""
    common = {k: v for k, v in dataset.items() if k not in ("images", "annotations")}
    parts = []
    for inside in (True, False):
        images = [img for img in dataset["images"] if (img["id"] in labeled_ids) == inside]
        ids = {img["id"] for img in images}
        annotations = [ann for ann in dataset["annotations"] if ann["image_id"] in ids]
        parts.append({**common, "images": images, "annotations": annotations})
    return parts[0], parts[1]


def split_by_percent(dataset: dict, percent: float, seed: int) -> tuple[dict, dict]:
    """Label round(percent/100 × images) randomly chosen images, at least one and at most all but one.

    The choice is numpy's default_rng(seed) permutation of the image ids sorted by id, so it depends only on
    the seed and the set of images (not on their file order), and with one seed a smaller percentage is a
    subset of a larger one."""
    if not 0 < percent < 100:
        raise ValueError(f"percent must be between 0 and 100 (exclusive), got {percent}")
    ids = sorted(img["id"] for img in dataset["images"])
    if len(ids) < 2:
        raise ValueError(f"a split needs at least 2 images, the dataset has {len(ids)}")
    count = min(max(1, round(percent / 100 * len(ids))), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    return _partition(dataset, {ids[i] for i in order[:count]})


def split_by_ids(dataset: dict, ids: list[int]) -> tuple[dict, dict]:
    """Label exactly the listed image ids; ids missing from the dataset are an error, not silently skipped."""
    if not ids:
        raise ValueError("the list of labeled image ids is empty")
    known = {img["id"] for img in dataset["images"]}
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"{len(unknown)} image id(s) are not in the dataset: {unknown[:10]}"
                         + (" ..." if len(unknown) > 10 else ""))
    return _partition(dataset, set(ids))


def _select(table: dict, keys: list[str], what: str) -> object:
    """table[first key present], or a ValueError naming the available keys."""
    for key in keys:
        if key in table:
            return table[key]
    raise ValueError(f"no {what} {keys[0]!r} in the file; available: {sorted(table)}")


def _unbiased_teacher_ids(table: dict, dataset: dict, percent: float | None, seed: int | None) -> list[int]:
    """Image ids of one {"<percent>": {"<seed>": [indices]}} entry of Unbiased Teacher's COCO_supervision.txt."""
    if percent is None or seed is None:
        raise ValueError(f"an Unbiased-Teacher file needs a percent and a seed; percents: {sorted(table)}")
    by_seed = _select(table, [str(float(percent)), f"{percent:g}"], "percent")
    indices = _select(by_seed, [str(seed)], "seed")
    # Unbiased Teacher indexes detectron2's dataset dicts: ids sorted, images with only crowd (or no)
    # annotations dropped (FILTER_EMPTY_ANNOTATIONS), e.g. 117266 of the 118287 COCO train2017 images.
    with_objects = {ann["image_id"] for ann in dataset["annotations"] if not ann.get("iscrowd", 0)}
    candidates = sorted(img["id"] for img in dataset["images"] if img["id"] in with_objects)
    # Unbiased Teacher asserts this count; a mismatch means the file was made for another dataset.
    expected = int(percent / 100 * len(candidates))
    if len(indices) != expected:
        raise ValueError(f"the file lists {len(indices)} indices for {percent}%, but this dataset has "
                         f"{len(candidates)} images with objects, so Unbiased Teacher expects {expected}")
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < len(candidates)]
    if bad:
        raise ValueError(f"indices out of range 0..{len(candidates) - 1}: {bad[:10]}")
    return [candidates[i] for i in indices]


def read_id_list(path: Path, dataset: dict, percent: float | None = None, seed: int | None = None) -> list[int]:
    """Labeled image ids from a file in one of three layouts:

    (a) text, one image id per line; blank lines and '#' comments are ignored;
    (b) a JSON list of image ids;
    (c) Unbiased Teacher's `COCO_supervision.txt`: {"<percent>": {"<seed>": [...]}}. `percent` and `seed`
        pick the entry (keys like "10.0" or "10", and "1"). Its lists are INDICES, not ids: positions in
        detectron2's training list, i.e. the ids of `dataset`'s images sorted by id, keeping only images with
        at least one non-crowd annotation. They are mapped to ids here, so the file must come with the
        dataset it was made for (the count check below catches most mix-ups).

    `dataset` is only read for layout (c). A `percent` with layout (a) or (b) is an error, because it would be
    silently ignored; `seed` is ignored there."""
    text = Path(path).read_text()
    if text.lstrip().startswith(("{", "[")):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    if text.lstrip().startswith("{"):
        return _unbiased_teacher_ids(parsed, dataset, percent, seed)
    if percent is not None:
        raise ValueError(f"{path} is a plain id list: a percent only selects an entry of an Unbiased-Teacher file")
    if text.lstrip().startswith("["):
        ids = parsed
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{path}: the JSON list must hold integer image ids")
        return ids
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                ids.append(int(line))
            except ValueError:
                raise ValueError(f"{path}:{number}: {line!r} is not an integer image id") from None
    return ids


def _write_json(data: dict, path: Path) -> None:
    """Write via a temporary file and rename it, so a reader never sees a half-written JSON."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_split(labeled: dict, unlabeled: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write `{stem}_labeled.json` and `{stem}_unlabeled.json` into out_dir (made if missing); returns both."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / f"{stem}_labeled.json", out_dir / f"{stem}_unlabeled.json"
    for data, path in zip((labeled, unlabeled), paths):
        _write_json(data, path)
    return paths


def split_command(instances: Path, out_dir: Path, percent: float | None, seed: int,
                  ids_file: Path | None, skip_bad: bool = False, class_agnostic: bool = False) -> tuple[Path, Path]:
    """`sp split`: a random percent split, or the images named by ids_file (where percent and seed pick the
    entry of an Unbiased-Teacher file). Output stem: `{instances stem}.{seed}@{percent}`, or
    `{instances stem}.{ids_file stem}` for a plain id list.

    The file is checked first (`stages.coco_check`); with skip_bad, the images and annotations it names are in
    neither part (skipped ids in an id list are dropped from it) and are listed in `{stem}.skipped.json`. An
    Unbiased-Teacher file counts the images of the whole file, so it cannot be combined with skipping.
    class_agnostic: both parts have every annotation in one category 'fg' (stem suffix `.agnostic`)."""
    if ids_file is None and percent is None:
        raise ValueError("give a percent or an ids file")
    checked = load_checked_coco(instances, needs=TRAINING, skip_bad=skip_bad)
    dataset = one_class(checked.data) if class_agnostic else checked.data
    base = Path(instances).stem
    if ids_file is None:
        labeled, unlabeled = split_by_percent(dataset, percent, seed)
    else:
        skipped = {img.get("id") for img in checked.skipped["images"]} if checked.skipped else set()
        if checked.skipped and Path(ids_file).read_text().lstrip().startswith("{"):
            raise ValueError(f"{ids_file} holds Unbiased-Teacher indices, which count every image of {instances}: "
                             "leaving some out (--skip-bad) would shift them; fix the file instead")
        ids = [i for i in read_id_list(ids_file, dataset, percent, seed) if i not in skipped]
        labeled, unlabeled = split_by_ids(dataset, ids)
    stem = f"{base}.{seed}@{percent:g}" if percent is not None else f"{base}.{Path(ids_file).stem}"
    stem += ".agnostic" if class_agnostic else ""
    paths = write_split(labeled, unlabeled, out_dir, stem)
    write_skipped({"instances": checked.skipped}, Path(out_dir) / f"{stem}.skipped.json")
    for name, part, path in zip(("labeled", "unlabeled"), (labeled, unlabeled), paths):
        log.info("%s: %d images, %d annotations -> %s", name, len(part["images"]), len(part["annotations"]), path)
    return paths
