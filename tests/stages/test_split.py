import json
import random

import pytest
from pycocotools.coco import COCO

from stages.split import read_id_list, split_by_ids, split_by_percent, split_command, write_split


def polygon_annotation(ann_id: int, image_id: int, category_id: int = 1, x: int = 2, iscrowd: int = 0) -> dict:
    """A 6x6 square polygon at (x, 2)."""
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": iscrowd,
            "segmentation": [[x, 2, x + 6, 2, x + 6, 8, x, 8]], "area": 36.0, "bbox": [x, 2, 6, 6]}


def make_coco(num_images: int, per_image: int = 2, crowd_every: int = 5, image_order: list[int] | None = None,
              annotations: list[dict] | None = None) -> dict:
    """A COCO instances dict: ids 1000, 1007, ... listed in shuffled order (so nothing relies on file order),
    `per_image` polygons per image of categories 1, 2, 1, ..., every `crowd_every`-th annotation crowd.
    Category 3 is never used. image_order / annotations replace the generated ones."""
    ids = image_order or random.Random(0).sample([1000 + 7 * i for i in range(num_images)], num_images)
    if annotations is None:
        annotations = [polygon_annotation(n + 1, image_id, 1 + k % 2, 2 + 8 * k, int((n + 1) % crowd_every == 0))
                       for n, (image_id, k) in enumerate((i, k) for i in sorted(ids) for k in range(per_image))]
    categories = [{"id": c, "name": f"cat{c}", "supercategory": "thing"} for c in (1, 2, 3)]
    return {"info": {"description": "synthetic"}, "licenses": [{"id": 1, "name": "none"}],
            "images": [{"id": i, "file_name": f"{i}.jpg", "height": 32, "width": 32} for i in ids],
            "annotations": annotations, "categories": categories}


def image_ids(part: dict) -> set[int]:
    return {img["id"] for img in part["images"]}


def test_percent_chooses_the_rounded_number_of_images():
    data = make_coco(50)
    assert len(split_by_percent(data, 10, seed=1)[0]["images"]) == 5
    assert len(split_by_percent(data, 0.5, seed=1)[0]["images"]) == 1  # at least one image
    assert len(split_by_percent(data, 99.9, seed=1)[1]["images"]) == 1  # never an empty unlabeled part


def test_split_is_deterministic_per_seed_and_ignores_file_order():
    data = make_coco(50)
    first = image_ids(split_by_percent(data, 10, seed=1)[0])
    assert image_ids(split_by_percent(data, 10, seed=1)[0]) == first
    assert image_ids(split_by_percent(data, 10, seed=2)[0]) != first
    reordered = {**data, "images": sorted(data["images"], key=lambda img: img["id"])}
    assert image_ids(split_by_percent(reordered, 10, seed=1)[0]) == first
    assert first < image_ids(split_by_percent(data, 20, seed=1)[0])  # one seed: nested percentages


def test_parts_are_disjoint_complete_and_annotations_follow_their_images():
    data = make_coco(50)
    labeled, unlabeled = split_by_percent(data, 30, seed=0)
    assert not image_ids(labeled) & image_ids(unlabeled)
    assert image_ids(labeled) | image_ids(unlabeled) == image_ids(data)
    for part in (labeled, unlabeled):
        assert {ann["image_id"] for ann in part["annotations"]} <= image_ids(part)
    ann_ids = [ann["id"] for part in (labeled, unlabeled) for ann in part["annotations"]]
    assert sorted(ann_ids) == [ann["id"] for ann in data["annotations"]]


def test_both_parts_keep_info_licenses_all_categories_and_crowd_annotations():
    data = make_coco(20, per_image=1)  # categories 2 and 3 unused
    for part in split_by_ids(data, [1000]):
        assert part["categories"] == data["categories"]
        assert part["info"] == data["info"] and part["licenses"] == data["licenses"]
    crowd = [ann for ann in data["annotations"] if ann["iscrowd"]]
    assert crowd
    labeled, unlabeled = split_by_ids(data, [ann["image_id"] for ann in crowd[:2]])
    assert [a for a in labeled["annotations"] if a["iscrowd"]] == crowd[:2]
    assert [a for a in unlabeled["annotations"] if a["iscrowd"]] == crowd[2:]


def test_explicit_id_lists_in_text_and_json(tmp_path):
    data = make_coco(10)
    text = tmp_path / "ids.txt"
    text.write_text("# labeled images\n1007\n\n1021  # a comment\n1000\n")
    listed = tmp_path / "ids.json"
    listed.write_text("[1007, 1021, 1000]")
    for path in (text, listed):
        ids = read_id_list(path, data)
        assert ids == [1007, 1021, 1000]
        labeled, unlabeled = split_by_ids(data, ids)
        assert image_ids(labeled) == {1000, 1007, 1021} and len(unlabeled["images"]) == 7


def test_unbiased_teacher_indices_map_to_sorted_ids_of_images_with_objects(tmp_path):
    # images 20 (crowd only) and 40 (no annotation) are outside the index space, as in detectron2's list
    annotations = [polygon_annotation(1, 10), polygon_annotation(2, 20, iscrowd=1), polygon_annotation(3, 30),
                   polygon_annotation(4, 50), polygon_annotation(5, 60), polygon_annotation(6, 60, iscrowd=1)]
    data = make_coco(6, image_order=[50, 10, 40, 20, 30, 60], annotations=annotations)  # indices → 10 30 50 60
    path = tmp_path / "COCO_supervision.txt"
    path.write_text(json.dumps({"50.0": {"1": [3, 1], "2": [0, 1, 2]}, "25": {"0": [2]}}))
    assert read_id_list(path, data, percent=50, seed=1) == [60, 30]
    assert read_id_list(path, data, percent=25.0, seed=0) == [50]
    labeled, _ = split_by_ids(data, read_id_list(path, data, percent=50, seed=1))
    assert image_ids(labeled) == {30, 60}
    with pytest.raises(ValueError, match=r"lists 3 indices .* expects 2"):
        read_id_list(path, data, percent=50, seed=2)
    with pytest.raises(ValueError, match=r"no seed '7' in the file; available: \['1', '2'\]"):
        read_id_list(path, data, percent=50, seed=7)
    with pytest.raises(ValueError, match=r"no percent '10.0' in the file; available: \['25', '50.0'\]"):
        read_id_list(path, data, percent=10, seed=1)
    with pytest.raises(ValueError, match="needs a percent and a seed"):
        read_id_list(path, data)


def test_bad_percent_and_unknown_ids_are_rejected(tmp_path):
    data = make_coco(20)
    for percent in (0, 100, -5, 150):
        with pytest.raises(ValueError, match=f"got {percent}$"):
            split_by_percent(data, percent, seed=0)
    unknown = list(range(1, 16))
    with pytest.raises(ValueError, match=r"15 image id\(s\) are not in the dataset: \[1, 2, .*10\] \.\.\.") as err:
        split_by_ids(data, [1000, *unknown])
    assert "11" not in str(err.value)
    bad = tmp_path / "bad.txt"
    bad.write_text("1000\nimage_7\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: 'image_7'"):
        read_id_list(bad, data)


def test_split_command_writes_loadable_coco_files(tmp_path):
    data = make_coco(50)
    instances = tmp_path / "instances_train2017.json"
    instances.write_text(json.dumps(data))
    labeled_path, unlabeled_path = split_command(instances, tmp_path / "out", percent=10, seed=1, ids_file=None)
    assert (labeled_path.name, unlabeled_path.name) == ("instances_train2017.1@10_labeled.json",
                                                         "instances_train2017.1@10_unlabeled.json")
    labeled, unlabeled = COCO(str(labeled_path)), COCO(str(unlabeled_path))
    assert len(labeled.getImgIds()) == 5 and len(unlabeled.getImgIds()) == 45
    assert len(labeled.getAnnIds()) + len(unlabeled.getAnnIds()) == len(data["annotations"])
    assert sorted(labeled.getCatIds()) == sorted(unlabeled.getCatIds()) == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([labeled_path.name, unlabeled_path.name])

    ids = tmp_path / "mine.txt"
    ids.write_text("1000\n1007\n")
    paths = split_command(instances, tmp_path / "out", percent=None, seed=0, ids_file=ids)
    assert paths[0].name == "instances_train2017.mine_labeled.json"
    assert set(COCO(str(paths[0])).getImgIds()) == {1000, 1007}
    with pytest.raises(ValueError, match="plain id list"):
        split_command(instances, tmp_path / "out", percent=10, seed=0, ids_file=ids)
    with pytest.raises(ValueError, match="percent or an ids file"):
        split_command(instances, tmp_path / "out", percent=None, seed=0, ids_file=None)


def test_write_split_replaces_existing_files(tmp_path):
    labeled, unlabeled = split_by_percent(make_coco(10), 50, seed=0)
    write_split(unlabeled, labeled, tmp_path, "x")
    paths = write_split(labeled, unlabeled, tmp_path, "x")
    assert [json.loads(p.read_text()) for p in paths] == [labeled, unlabeled]


def test_class_agnostic_split_merges_categories_over_the_same_images(tmp_path):
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(make_coco(20)))
    plain = split_command(instances, tmp_path / "out", percent=30, seed=1, ids_file=None)
    merged = split_command(instances, tmp_path / "out", percent=30, seed=1, ids_file=None, class_agnostic=True)
    assert merged[0].name == "instances.1@30.agnostic_labeled.json"
    for a, b in zip(plain, merged):
        a, b = json.loads(a.read_text()), json.loads(b.read_text())
        assert a["images"] == b["images"]
        assert b["categories"] == [{"id": 1, "name": "fg", "supercategory": "fg"}]
        assert [x["category_id"] for x in b["annotations"]] == [1] * len(a["annotations"])
        assert [{**x, "category_id": 1} for x in a["annotations"]] == b["annotations"]
