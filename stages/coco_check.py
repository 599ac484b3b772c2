"""One validation pass over a COCO instances file and its image folder, run by every command that reads labels
(`sp split`, `sp finetune`, `sp evaluate`, `sp eval-masks`, `sp store import-coco`, `sp check-labels`) before
it trains or writes anything.

Every problem is collected, not just the first: JSON syntax (file, line and column), required keys and their
types, duplicate ids and file names, dangling image_id / category_id, polygons with fewer than 3 points or of
odd length, corrupt RLE or RLE of another size than its image, boxes of negative size, and image files that
are missing, unreadable, truncated or of another size than the JSON states. The result is one `CocoError`
whose single line counts the problems by kind and names the first few with their ids; or, with `skip_bad`,
the dataset without the images and annotations concerned plus a record of what was left out.

Image files are checked cheaply: the header gives the size, and the last bytes of a JPEG or PNG must hold its
end marker (a truncated file lacks it); only files without one (and formats other than JPEG/PNG) are decoded
in full, with the loader training uses. `decode=True` decodes every file (see bench/coco_check.py for costs).
Sizes are those of the stored pixels: EXIF orientation is ignored, as by the loader and by COCO itself.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stages.image_data import load_image
from store import rle

log = logging.getLogger(__name__)

# What each use of a COCO file reads from an annotation. Images always need id, file_name, height and width;
# categories are checked where annotations need a category_id.
TRAINING = ("id", "image_id", "category_id", "segmentation")
EVALUATION = TRAINING + ("bbox", "area", "iscrowd")  # COCOeval reads these of every ground-truth annotation
MASK_GT = ("id", "image_id", "segmentation", "bbox")  # `sp eval-masks`: one class; area and iscrowd filled in
PSEUDO_LABELS = ("image_id", "segmentation")  # `sp store import-coco`
USES = {"train": TRAINING, "eval": EVALUATION, "mask-gt": MASK_GT, "pseudo-labels": PSEUDO_LABELS}
EXAMPLES = 3  # per kind of problem in the error message
END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}  # found in the last TAIL_BYTES
TAIL_BYTES = 64
ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height when a viewer applies them
THREADS = 16  # image checks wait on the disk more than on the CPU


class CocoError(ValueError):
    """A COCO file or its images cannot be used as they are; the message names the file and the offending
    ids."""


@dataclass
class Problem:
    """One problem. `image` / `annotation`: the position in data['images'] / data['annotations'] that skipping
    drops; neither (a category or the file's structure) means it cannot be skipped."""

    kind: str  # problems are counted by kind, e.g. "unknown image_id"
    record: str  # e.g. "image 12 'a.jpg'", "annotation 7", "category 3", "annotations[4]"
    detail: str = ""
    image: int | None = None
    annotation: int | None = None

    def __str__(self) -> str:
        return f"{self.record} ({self.detail})" if self.detail else self.record


@dataclass
class CheckedCoco:
    """A dataset that passed the check: data without what skipping left out; skipped is None or the record of
    it (see `skip_record`)."""

    data: dict
    skipped: dict | None = None


def _is_int(value) -> bool:
    return type(value) is int  # not bool; JSON gives plain ints


def _finite_numbers(values, length: int | None = None) -> bool:
    """A list of finite numbers (of the given length); sum() fails on anything else and is C-fast."""
    if not isinstance(values, list) or (length is not None and len(values) != length):
        return False
    try:
        return math.isfinite(sum(values))
    except (TypeError, OverflowError):
        return False


def read_coco_json(path: Path, needs: tuple[str, ...] = TRAINING) -> dict:
    """The parsed file, with images, annotations (and categories where needed) as lists; a CocoError naming
    the file (and line for syntax errors) otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CocoError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CocoError(f"{path} is a folder, not a COCO JSON file") from None
    except json.JSONDecodeError as e:
        raise CocoError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, absurdly long numbers or nesting
        raise CocoError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise CocoError(f"{path}: cannot read it: {e.strerror or e}") from None
    if isinstance(data, list):
        raise CocoError(f"{path} is a list (a COCO results file?), not a COCO instances JSON with 'images' and "
                        "'annotations'; a results list has no file names: merge it with its dataset's 'images'")
    keys = ("images", "annotations") + (("categories",) if "category_id" in needs else ())
    missing = [k for k in keys if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise CocoError(f"{path} is not a COCO instances JSON: no list {', '.join(repr(k) for k in missing)}")
    return data


def _segmentation_problem(seg, height: int | None, width: int | None) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with a segmentation, or None. height/width: its image's, when known."""
    if isinstance(seg, list):
        if not seg:
            return "segmentation without polygons", ""
        for poly in seg:
            if not _finite_numbers(poly):
                return "polygon that is not a list of numbers", ""
            if len(poly) % 2:
                return "polygon of odd length", f"{len(poly)} numbers"
            if len(poly) < 6:
                return "polygon with fewer than 3 points", f"{len(poly) // 2} points"
        return None
    if not isinstance(seg, dict):
        return "segmentation neither polygons nor RLE", type(seg).__name__
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
        return "RLE without a valid size", f"size {size!r}"
    if height is not None and size != [height, width]:
        return "RLE of another size than its image", f"RLE {size[0]}x{size[1]}, image {height}x{width}"
    if isinstance(counts, str):
        try:
            rle.area(counts, *size)
        except ValueError as e:
            return "corrupt RLE", str(e)
    elif isinstance(counts, list):  # uncompressed (crowd regions): long lists, so numpy checks them
        try:
            runs = np.asarray(counts)
        except ValueError:  # nested lists of unequal length
            runs = np.zeros(1, object)
        if runs.dtype.kind not in "iu" or runs.ndim != 1 or (runs < 0).any() or runs.sum() != size[0] * size[1]:
            return "corrupt RLE", f"counts do not cover the {size[0]}x{size[1]} pixels"
    else:
        return "corrupt RLE", f"counts of type {type(counts).__name__}"
    return None


def _image_record(k: int, img) -> str:
    if isinstance(img, dict) and _is_int(img.get("id")):
        name = img.get("file_name")
        return f"image {img['id']}" + (f" {name!r}" if isinstance(name, str) else "")
    return f"images[{k}]"


def _duplicates(values: list, kind: str, records: list[str], position: str | None) -> list[Problem]:
    """A problem for every record whose value (id or file name) another record shares; position: 'image',
    'annotation' or None (categories: not skippable)."""
    counts = Counter(v for v in values if v is not None)
    return [Problem(kind, records[k], f"{counts[v]} records", **({position: k} if position else {}))
            for k, v in enumerate(values) if v is not None and counts[v] > 1]


def check_records(data: dict, needs: tuple[str, ...] = TRAINING) -> list[Problem]:
    """Every problem of the JSON's content (no files are read). `needs`: the annotation keys this use reads."""
    images, annotations = data["images"], data["annotations"]
    problems = [] if images else [Problem("no images", "images")]
    image_records = [_image_record(k, img) for k, img in enumerate(images)]
    sizes: dict[int, tuple[int, int]] = {}
    for k, img in enumerate(images):
        if not isinstance(img, dict):
            problems.append(Problem("image record that is not an object", image_records[k], image=k))
            continue
        bad = [key for key, ok in (("id", _is_int(img.get("id"))),
                                   ("file_name", isinstance(img.get("file_name"), str) and img["file_name"]),
                                   ("height", _is_int(img.get("height")) and img["height"] > 0),
                                   ("width", _is_int(img.get("width")) and img["width"] > 0)) if not ok]
        if bad:
            problems.append(Problem("image without a valid id, file_name, height or width", image_records[k],
                                    ", ".join(f"{key} {img.get(key)!r}" for key in bad), image=k))
        elif img["id"] not in sizes:
            sizes[img["id"]] = (img["height"], img["width"])
    ids = [img["id"] if isinstance(img, dict) and _is_int(img.get("id")) else None for img in images]
    known_ids = set(ids)  # an annotation of an image with a bad record goes with that image, not as dangling
    problems += _duplicates(ids, "duplicate image id", image_records, "image")
    names = [img.get("file_name") if isinstance(img, dict) and isinstance(img.get("file_name"), str) else None
             for img in images]
    problems += _duplicates(names, "duplicate file_name", image_records, "image")

    category_ids = None
    if "category_id" in needs:
        categories = data["categories"]
        cat_ids = [c.get("id") if isinstance(c, dict) and _is_int(c.get("id")) else None for c in categories]
        records = [f"category {i}" if i is not None else f"categories[{k}]" for k, i in enumerate(cat_ids)]
        problems += [Problem("category without a valid id", records[k]) for k, i in enumerate(cat_ids) if i is None]
        problems += _duplicates(cat_ids, "duplicate category id", records, None)
        if not categories:
            problems.append(Problem("no categories", "categories"))
        category_ids = {i for i in cat_ids if i is not None}

    ann_ids = []
    for k, ann in enumerate(annotations):
        ann_id = ann.get("id") if isinstance(ann, dict) and _is_int(ann.get("id")) else None
        ann_ids.append(ann_id)
        record = f"annotation {ann_id}" if ann_id is not None else f"annotations[{k}]"
        add = lambda kind, detail="": problems.append(Problem(kind, record, detail, annotation=k))  # noqa: E731
        if not isinstance(ann, dict):
            add("annotation that is not an object")
            continue
        missing = [key for key in needs if key not in ann]
        if missing:
            add("annotation without " + ", ".join(missing))
        for key in ("id", "image_id", "category_id"):
            if key in ann and not _is_int(ann[key]):
                add(f"annotation whose {key} is not an integer", f"{key} {ann[key]!r}")
        image_id = ann.get("image_id")
        if _is_int(image_id) and image_id not in known_ids:
            add("unknown image_id", f"image_id {image_id}")
        if category_ids is not None and _is_int(ann.get("category_id")) and ann["category_id"] not in category_ids:
            add("unknown category_id", f"category_id {ann['category_id']}")
        if "segmentation" in ann:
            found = _segmentation_problem(ann["segmentation"], *sizes.get(image_id, (None, None))
                                          if _is_int(image_id) else (None, None))
            if found:
                add(*found)
        if "bbox" in ann:
            if not _finite_numbers(ann["bbox"], 4):
                add("bbox that is not 4 numbers", f"bbox {ann['bbox']!r}")
            elif ann["bbox"][2] < 0 or ann["bbox"][3] < 0:
                add("box of negative size", f"bbox {ann['bbox']}")
        if "area" in ann and not (_finite_numbers([ann["area"]]) and ann["area"] >= 0):
            add("area that is not a number >= 0", f"area {ann['area']!r}")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            add("iscrowd other than 0 or 1", f"iscrowd {ann['iscrowd']!r}")
        if "score" in ann and not _finite_numbers([ann["score"]]):  # pseudo labels' confidence
            add("score that is not a number", f"score {ann['score']!r}")
    records = [f"annotation {i}" for i in ann_ids]
    problems += _duplicates(ann_ids, "duplicate annotation id", records, "annotation")
    return problems


def _file_problem(path: Path, height: int, width: int, decode: bool) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with one image file, or None. Reads the header and the last bytes; decodes
    fully only with `decode`, for formats without an end marker, or when the marker is missing."""
    try:
        with open(path, "rb") as f:
            with Image.open(f) as im:
                size, image_format = im.size, im.format
                orientation = im.getexif().get(ORIENTATION) if size != (width, height) else None
            f.seek(max(0, f.seek(0, 2) - TAIL_BYTES))
            tail = f.read()
        marker = END_MARKERS.get(image_format)
        if decode or marker is None or marker not in tail:
            load_image(path)  # the loader training uses: what passes here, trains
    except FileNotFoundError:
        return "image file missing", ""
    except Exception as e:  # noqa: BLE001 - any decoder failure means: this file cannot be used; say why
        return "image file unreadable", f"{type(e).__name__}: {e}"
    if size != (width, height):
        hint = ("; EXIF orientation is ignored: the JSON must give the stored pixels' size"
                if orientation in (5, 6, 7, 8) and size == (height, width) else "")
        return "image of another size than the JSON's", f"file {size[1]}x{size[0]}, JSON {height}x{width}{hint}"
    return None


def check_image_files(data: dict, images_dir: Path, decode: bool = False, exclude: set[int] = frozenset(),
                      threads: int = THREADS, source: Path | str = "the JSON") -> list[Problem]:
    """A problem for every image file (of the images not in `exclude`) that is missing, unreadable, truncated
    or of another size than its record states. source: the COCO file the records come from, for the error
    when none of its images is in the folder."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise CocoError(f"image folder {images_dir} " + ("is not a folder" if images_dir.exists() else
                                                        "does not exist"))
    todo = [k for k in range(len(data["images"])) if k not in exclude]
    images = data["images"]
    with ThreadPoolExecutor(threads) as pool:
        found = list(pool.map(lambda k: _file_problem(images_dir / images[k]["file_name"], images[k]["height"],
                                                      images[k]["width"], decode), todo))
    problems = [Problem(kind, _image_record(k, images[k]), detail, image=k)
                for k, problem in zip(todo, found) if problem for kind, detail in [problem]]
    if todo and len(problems) == len(todo) and all(p.kind == "image file missing" for p in problems):
        raise CocoError(f"none of the {len(todo)} images of {source} is in {images_dir}, e.g. "
                        f"{images[todo[0]]['file_name']!r}: is it the right image folder?")
    return problems


def summarize(path: Path, problems: list[Problem]) -> str:
    """One line: how many problems of each kind, with the first few records and details."""
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    n_images = len({p.image for p in problems if p.image is not None})
    n_annotations = len({p.annotation for p in problems if p.annotation is not None})
    parts = [f"{kind} x{len(ps)}: " + ", ".join(str(p) for p in ps[:EXAMPLES]) + (", ..." if len(ps) > EXAMPLES
                                                                                  else "")
             for kind, ps in by_kind.items()]
    return (f"{path}: {len(problems)} problem(s) in {n_images} image(s) and {n_annotations} annotation(s): "
            + "; ".join(parts))


def skip_record(data: dict, problems: list[Problem], path: Path) -> tuple[dict, dict]:
    """(data without every image and annotation a problem names, and without the annotations of those images;
    the record of what was left out and why, JSON-ready)."""
    images, annotations = data["images"], data["annotations"]
    reasons: dict[tuple[str, int], list[str]] = defaultdict(list)
    for p in problems:
        where = ("images", p.image) if p.image is not None else ("annotations", p.annotation)
        reasons[where].append(f"{p.kind} ({p.detail})" if p.detail else p.kind)
    dropped_ids = {images[k].get("id") for (part, k) in reasons if part == "images"
                   and isinstance(images[k], dict) and _is_int(images[k].get("id"))}
    for k, ann in enumerate(annotations):
        if isinstance(ann, dict) and _is_int(ann.get("image_id")) and ann["image_id"] in dropped_ids:
            reasons[("annotations", k)].append("its image is left out")
    record: dict = {"file": str(path), "images": [], "annotations": []}
    for (part, k), why in sorted(reasons.items()):
        item = (images if part == "images" else annotations)[k]
        keys = ("id", "file_name") if part == "images" else ("id", "image_id")
        record[part].append({"index": k, **({key: item.get(key) for key in keys} if isinstance(item, dict) else {}),
                             "problems": why})
    drop = {part: {item["index"] for item in record[part]} for part in ("images", "annotations")}
    clean = {**data, "images": [img for k, img in enumerate(images) if k not in drop["images"]],
             "annotations": [a for k, a in enumerate(annotations) if k not in drop["annotations"]]}
    return clean, record


def load_checked_coco(path: Path, images_dir: Path | None = None, needs: tuple[str, ...] = TRAINING,
                      skip_bad: bool = False, decode: bool = False) -> CheckedCoco:
    """Read and check a COCO file (and, given images_dir, its image files). Any problem is a CocoError; with
    skip_bad, the images and annotations concerned are left out (and recorded) instead, except problems of
    categories or structure, which cannot be skipped."""
    data = read_coco_json(path, needs)
    problems = check_records(data, needs)
    if images_dir is not None:
        problems += check_image_files(data, images_dir, decode, exclude={p.image for p in problems}, source=path)
    if not problems:
        return CheckedCoco(data)
    unskippable = any(p.image is None and p.annotation is None for p in problems)
    if not skip_bad or unskippable:
        raise CocoError(summarize(path, problems) + ("" if unskippable else " (--skip-bad leaves them out)"))
    clean, record = skip_record(data, problems, path)
    if not clean["images"]:
        raise CocoError(f"no image left after skipping: {summarize(path, problems)}")
    log.warning("--skip-bad leaves out %d image(s) and %d annotation(s) of %s: %s", len(record["images"]),
                len(record["annotations"]), path, summarize(path, problems))
    return CheckedCoco(clean, record)


def checked_data(ann: dict | Path, images_dir: Path | None = None, needs: tuple[str, ...] = TRAINING) -> dict:
    """`ann` as a checked dataset: a dict is taken as already checked, a path is read and checked."""
    return ann if isinstance(ann, dict) else load_checked_coco(ann, images_dir, needs).data


def same_categories(expected: list[dict], found: list[dict], what: str) -> None:
    """Labels are category ids sorted: two files (or a model and a file) must have the same ids."""
    a, b = sorted(c["id"] for c in expected), sorted(c["id"] for c in found)
    if a != b:
        raise CocoError(f"{what}: category ids differ (only in the first: {sorted(set(a) - set(b))[:10]}, only "
                        f"in the second: {sorted(set(b) - set(a))[:10]}); labels would map to the wrong classes")


def write_skipped(records: dict[str, dict | None], path: Path) -> Path | None:
    """Write what skipping left out ({name: skip record}) as JSON, if anything was; returns the path or None."""
    records = {name: r for name, r in records.items() if r}
    if not records:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(records, indent=1))
    log.warning("what --skip-bad left out is listed in %s", path)
    return Path(path)
