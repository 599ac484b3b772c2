"""The up-front check of COCO files and their images: every problem found and named, skipping on request, and a
fuzz test showing that corrupted files end in a CocoError or in data that trains and evaluates."""
import copy
import json
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import stages.coco_check as coco_check
from stages.coco_check import (EVALUATION, MASK_GT, PSEUDO_LABELS, TRAINING, CocoError, check_records,
                               load_checked_coco, same_categories)
from stages.coco_data import CocoInstances
from stages.evaluate import coco_evaluate
from stages.import_coco import annotation_mask

H, W = 40, 60


def square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def rle_of(x, y, s):
    m = np.zeros((H, W), np.uint8, order="F")
    m[y:y + s, x:x + s] = 1
    r = mask_utils.encode(m)
    return {"size": [H, W], "counts": r["counts"].decode()}


def dataset() -> dict:
    """Three 40x60 images: polygons, compressed RLE, and a crowd region as uncompressed RLE."""
    crowd = {"size": [H, W], "counts": [100, 50, H * W - 150]}
    return {
        "images": [{"id": i, "file_name": f"{name}.png", "height": H, "width": W}
                   for i, name in ((1, "a"), (2, "b"), (3, "c"))],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "segmentation": square(2, 2, 10), "area": 100.0,
             "bbox": [2, 2, 10, 10], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "segmentation": rle_of(20, 5, 8), "area": 64.0,
             "bbox": [20, 5, 8, 8], "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 3, "segmentation": square(30, 10, 5), "area": 25.0,
             "bbox": [30, 10, 5, 5], "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 7, "segmentation": crowd, "area": 50.0,
             "bbox": [2, 20, 2, 20], "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in "abc":
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "ann.json").write_text(json.dumps(dataset()))
    return tmp_path


def write(folder, data, name="ann.json"):
    (folder / name).write_text(json.dumps(data))
    return folder / name


def test_a_good_file_passes_for_every_use(folder):
    for needs in (TRAINING, EVALUATION, MASK_GT, PSEUDO_LABELS):
        checked = load_checked_coco(folder / "ann.json", folder, needs)
        assert checked.data == dataset() and checked.skipped is None


def edit(path: str, value):
    """A mutation setting data[...] at a '/'-separated path (numbers index lists); value None deletes."""
    def apply(data):
        *head, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        target = data
        for key in head:
            target = target[key]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return apply


# (mutation, kind of problem, record named)
RECORD_CASES = [
    (edit("annotations/0/image_id", 99), "unknown image_id", "annotation 10 (image_id 99)"),
    (edit("annotations/0/category_id", 5), "unknown category_id", "annotation 10 (category_id 5)"),
    (edit("annotations/0/segmentation", [[1, 1, 5, 5]]), "polygon with fewer than 3 points", "annotation 10"),
    (edit("annotations/0/segmentation", [[1, 1, 5, 5, 9]]), "polygon of odd length", "annotation 10"),
    (edit("annotations/0/segmentation", []), "segmentation without polygons", "annotation 10"),
    (edit("annotations/0/segmentation", [[1, 1, "x", 5, 9, 9]]), "polygon that is not a list of numbers",
     "annotation 10"),
    (edit("annotations/1/segmentation/size", [W, H]), "RLE of another size than its image",
     "annotation 11 (RLE 60x40, image 40x60)"),
    (edit("annotations/1/segmentation/counts", "0000"), "corrupt RLE", "annotation 11"),
    (edit("annotations/3/segmentation/counts", [100, 50]), "corrupt RLE", "annotation 13"),
    (edit("annotations/0/bbox", [2, 2, -3, 10]), "box of negative size", "annotation 10"),
    (edit("annotations/0/bbox", [2, 2, 3]), "bbox that is not 4 numbers", "annotation 10"),
    (edit("annotations/0/area", -1), "area that is not a number >= 0", "annotation 10"),
    (edit("annotations/0/iscrowd", 2), "iscrowd other than 0 or 1", "annotation 10"),
    (edit("annotations/0/score", "high"), "score that is not a number", "annotation 10"),
    (edit("annotations/0/segmentation", None), "annotation without segmentation", "annotation 10"),
    (edit("annotations/0/image_id", "1"), "annotation whose image_id is not an integer", "annotation 10"),
    (edit("annotations/1/id", 10), "duplicate annotation id", "annotation 10 (2 records)"),
    (edit("images/1/id", 1), "duplicate image id", "image 1 'b.png' (2 records)"),
    (edit("images/1/file_name", "a.png"), "duplicate file_name", "image 2 'a.png'"),
    (edit("images/0/height", "40"), "image without a valid id, file_name, height or width",
     "image 1 'a.png' (height '40')"),
    (edit("images/2", "c.png"), "image record that is not an object", "images[2]"),
    (edit("categories/1/id", 7), "duplicate category id", "category 7"),
    (edit("annotations/2", 12), "annotation that is not an object", "annotations[2]"),
]


@pytest.mark.parametrize("mutate, kind, record", RECORD_CASES, ids=[c[1] for c in RECORD_CASES])
def test_each_record_problem_is_found_and_named(folder, mutate, kind, record):
    data = dataset()
    mutate(data)
    found = check_records(data, EVALUATION)
    assert kind in [p.kind for p in found], [str(p) for p in found]
    with pytest.raises(CocoError) as error:
        load_checked_coco(write(folder, data), folder, EVALUATION)
    message = str(error.value)
    assert "\n" not in message and str(folder / "ann.json") in message and kind in message and record in message


def test_every_problem_is_counted_and_the_first_few_named(folder):
    data = dataset()
    data["annotations"] += [{**data["annotations"][0], "id": 100 + k, "image_id": 50 + k} for k in range(5)]
    data["annotations"][2]["bbox"] = [0, 0, -1, -1]
    with pytest.raises(CocoError) as error:
        load_checked_coco(write(folder, data), folder)
    message = str(error.value)
    assert "6 problem(s) in 0 image(s) and 6 annotation(s)" in message
    assert "unknown image_id x5: annotation 100 (image_id 50), annotation 101 (image_id 51), annotation 102" in message
    assert "annotation 103" not in message and ", ..." in message
    assert "box of negative size x1: annotation 12" in message


def test_keys_required_depend_on_the_use(folder):
    data = dataset()
    for ann in data["annotations"]:
        del ann["area"], ann["iscrowd"], ann["id"]
    del data["categories"]
    path = write(folder, data)
    load_checked_coco(path, folder, PSEUDO_LABELS)  # import-coco reads image_id and segmentation only
    with pytest.raises(CocoError, match="no list 'categories'"):
        load_checked_coco(path, folder, TRAINING)
    data["categories"] = dataset()["categories"]
    with pytest.raises(CocoError, match="annotation without id, area, iscrowd x4"):
        load_checked_coco(write(folder, data), folder, EVALUATION)


@pytest.mark.parametrize("text, message", [
    ('{"images": [\n,]}', r"ann.json:2:1: not valid JSON: Expecting value"),
    ("", r"ann.json:1:1: not valid JSON"),
    ('[{"image_id": 1}]', "is a list .a COCO results file"),
    ('{"images": []}', "no list 'annotations', 'categories'"),
    (b'{"images": "\xff"}', "ann.json: not valid JSON"),
])
def test_unreadable_json_names_the_file_and_line(folder, text, message):
    path = folder / "ann.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CocoError, match=message):
        load_checked_coco(path, folder)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_image_files_missing_unreadable_truncated_or_of_another_size(folder):
    data = dataset()
    data["images"] += [{"id": 4, "file_name": "d.jpg", "height": H, "width": W},
                       {"id": 5, "file_name": "e.png", "height": H, "width": W},
                       {"id": 6, "file_name": "f.jpg", "height": H, "width": W}]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "d.jpg")
    truncate(folder / "d.jpg")
    truncate(folder / "b.png", 0.8)
    (folder / "e.png").write_text("not an image")
    Image.fromarray(np.zeros((W, H, 3), np.uint8)).save(folder / "f.jpg")  # 60x40, the JSON says 40x60
    (folder / "c.png").unlink()
    with pytest.raises(CocoError) as error:
        load_checked_coco(write(folder, data), folder)
    message = str(error.value)
    assert "image file missing x1: image 3 'c.png'" in message
    assert "image file unreadable x3: image 2 'b.png'" in message and "image 4 'd.jpg'" in message
    assert "image 5 'e.png' (UnidentifiedImageError" in message
    assert "image of another size than the JSON's x1: image 6 'f.jpg' (file 60x40, JSON 40x60)" in message


def test_intact_files_are_read_only_in_part_unless_decoding_is_asked(folder, monkeypatch):
    decoded = []
    real = coco_check.load_image
    monkeypatch.setattr(coco_check, "load_image", lambda path: decoded.append(path.name) or real(path))
    load_checked_coco(folder / "ann.json", folder)
    assert decoded == []  # header and end marker only
    truncate(folder / "a.png", 0.9)
    with pytest.raises(CocoError, match=r"image 1 'a.png' \(OSError"):
        load_checked_coco(folder / "ann.json", folder)
    assert decoded == ["a.png"]  # its end marker is missing: decoded to be sure, and that fails
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "a.png")
    decoded.clear()
    load_checked_coco(folder / "ann.json", folder, decode=True)
    assert sorted(decoded) == ["a.png", "b.png", "c.png"]


def test_exif_rotation_is_ignored_and_a_rotated_size_gets_a_hint(folder):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "a.jpg", exif=exif)
    data = dataset()
    data["images"][0]["file_name"] = "a.jpg"
    load_checked_coco(write(folder, data), folder)  # the stored pixels are 40x60, as the JSON says
    data["images"][0].update(height=W, width=H)  # the displayed size
    data["annotations"] = []
    with pytest.raises(CocoError, match="file 40x60, JSON 60x40; EXIF orientation is ignored"):
        load_checked_coco(write(folder, data), folder)


def test_a_wrong_folder_is_named_as_such(folder, tmp_path_factory):
    with pytest.raises(CocoError, match=r"none of the 3 images of .*ann\.json is in .*other.*, e\.g\. .*: is it the right image folder"):
        load_checked_coco(folder / "ann.json", tmp_path_factory.mktemp("other"))
    with pytest.raises(CocoError, match="image folder .*nowhere does not exist"):
        load_checked_coco(folder / "ann.json", folder / "nowhere")


def test_skip_bad_leaves_out_bad_images_with_their_annotations_and_bad_annotations(folder):
    data = dataset()
    data["annotations"][2]["segmentation"] = [[1, 2, 3, 4, 5, 6, 7]]  # image 2's polygon
    (folder / "a.png").unlink()  # image 1 and its annotations 10, 11
    checked = load_checked_coco(write(folder, data), folder, skip_bad=True)
    assert [img["id"] for img in checked.data["images"]] == [2, 3]
    assert [a["id"] for a in checked.data["annotations"]] == [13]
    assert checked.data["categories"] == data["categories"]
    skipped = checked.skipped
    assert skipped["images"] == [{"index": 0, "id": 1, "file_name": "a.png", "problems": ["image file missing"]}]
    assert {a["id"]: a["problems"] for a in skipped["annotations"]} == {
        10: ["its image is left out"], 11: ["its image is left out"], 12: ["polygon of odd length (7 numbers)"]}
    again = load_checked_coco(write(folder, checked.data, "clean.json"), folder)  # what is left passes
    assert again.skipped is None


def test_problems_of_categories_cannot_be_skipped(folder):
    data = dataset()
    data["categories"].append({"id": 3, "name": "again"})
    with pytest.raises(CocoError, match="duplicate category id"):
        load_checked_coco(write(folder, data), folder, skip_bad=True)


def test_same_categories_names_the_difference():
    same_categories([{"id": 1}, {"id": 2}], [{"id": 2}, {"id": 1}], "a and b")
    with pytest.raises(CocoError, match=r"a and b: category ids differ \(only in the first: \[1\], only in the "
                                        r"second: \[5\]\)"):
        same_categories([{"id": 1}, {"id": 2}], [{"id": 2}, {"id": 5}], "a and b")


def test_real_coco_passes_for_training_and_evaluation(coco_subset):
    for part in ("train", "val"):
        checked = load_checked_coco(coco_subset / part / "annotations.json", coco_subset / part / "images",
                                    EVALUATION)
        assert checked.skipped is None and len(checked.data["images"]) > 100


# ---- fuzz ----------------------------------------------------------------------------------------------------
ODD_VALUES = [None, True, -1, 0, 2**70, 1.5, float("nan"), float("inf"), "", "x", [], [1], {}, {"size": [1, 1]},
              [[1, 2, 3]], [[0, 0, 5, 0, 5, 5]]]


def mutate(data: dict, rng: np.random.Generator) -> None:
    """One random corruption: a field set to an odd value or deleted, a record duplicated or removed."""
    section = str(rng.choice(["images", "annotations", "categories"]))
    records = data[section]
    if not records:
        return
    k = int(rng.integers(len(records)))
    action = rng.integers(4)
    if action == 0:
        records.append(copy.deepcopy(records[k]))
    elif action == 1:
        del records[k]
    elif not isinstance(records[k], dict) or not records[k]:
        records[k] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
    else:
        key = str(rng.choice(sorted(records[k])))
        if action == 2:
            del records[k][key]
        else:
            records[k][key] = copy.deepcopy(ODD_VALUES[int(rng.integers(len(ODD_VALUES)))])


def use_fully(data: dict, folder) -> None:
    """What training and evaluation do with a checked dataset: every item, and COCO AP of the ground truth."""
    dataset_ = CocoInstances(data, folder, image_size=H, max_size=W, flip_prob=0.5, rotate_deg=9)
    for k in range(len(dataset_)):
        item = dataset_[k]
        assert item["masks"].shape[1:] == item["image"].shape[1:] and len(item["labels"]) == len(item["masks"])
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": a["bbox"],
                "segmentation": mask_utils.encode(np.asfortranarray(annotation_mask(a, H, W)))}
               for a in data["annotations"]]
    coco_evaluate(copy.deepcopy(data), results, backend="pycocotools")


def test_fuzz_corrupted_files_end_in_a_coco_error_or_in_usable_data(folder):
    """Random corruptions (fixed seed, bounded count and time) of the JSON's fields and text: the check either
    raises CocoError, or what it passes (with --skip-bad too) trains and evaluates without any other error."""
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "passed": 0, "skipped": 0}
    start = time.perf_counter()
    for case in range(300):
        data = dataset()
        for _ in range(int(rng.integers(1, 4))):
            mutate(data, rng)
        text = json.dumps(data)
        if case % 10 == 0:  # damage the text itself: a cut or a changed byte
            cut = int(rng.integers(len(text)))
            text = text[:cut] if case % 20 == 0 else text[:cut] + chr(int(rng.integers(32, 127))) + text[cut + 1:]
        (folder / "fuzz.json").write_text(text)
        for skip_bad in (False, True):
            try:
                checked = load_checked_coco(folder / "fuzz.json", folder, EVALUATION, skip_bad=skip_bad)
            except CocoError:
                outcomes["error"] += 1
                continue
            use_fully(checked.data, folder)
            outcomes["skipped" if checked.skipped else "passed"] += 1
        assert time.perf_counter() - start < 120, f"fuzzing took too long ({case} cases)"
    assert min(outcomes.values()) > 10, outcomes  # every outcome occurs: the corruptions are neither all fatal nor all harmless
