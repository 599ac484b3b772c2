"""Reading a damaged or unfinished store: a StoreError naming the store (and array), never a crash of another
kind, shown by fuzzing attributes, progress.json, array values, shapes, chunks and metadata with a fixed seed."""
import json
import shutil
import time

import numpy as np
import pytest
import zarr

from store import rle
from store.pseudo_label_store import ARRAYS, DONE, SKIPPED, ImageResult, PseudoLabelStore, StoreError

D = 8  # seed-feature dimension
SIZES = [(20, 30), (0, 0), (16, 16), (24, 12)]  # image 1 is skipped


def make_store(path):
    """Four images (one skipped, one without masks), nine masks."""
    rng = np.random.default_rng(0)
    store = PseudoLabelStore.create(path, [f"dir/img{i}.jpg" for i in range(4)], {"method": "test"}, D)
    results = []
    for i, ((h, w), k) in enumerate(zip(SIZES, (5, 0, 0, 4))):
        if i == 1:
            results.append(ImageResult(index=i, status=SKIPPED, reason="OSError: truncated"))
            continue
        masks = rng.random((k, h, w)) > 0.5
        boxes = np.tile(np.array([0, 0, w, h], np.float32), (k, 1))
        results.append(ImageResult(index=i, height=h, width=w, rle=rle.encode_batch(masks.reshape(k, h, w)),
                                   box=boxes, score=rng.random(k).astype(np.float32),
                                   seed=np.zeros((k, 3), np.int16), seed_feature=rng.random((k, D)).astype(np.float16)))
    store.append(results)
    store.finalize()
    return path


def read_everything(path) -> int:
    """Every read the stages make of a store, checking that what comes back is consistent. Returns the mask count."""
    store = PseudoLabelStore.open(path)
    names = store.file_names
    status, heights, widths = (store.image_array(n) for n in ("status", "height", "width"))
    offset = store.mask_offset
    boxes, scores = store.mask_array("box"), store.mask_array("score")
    rles = store.rle_images(0, store.images_done)
    assert len(names) == store.num_images and offset[0] == 0 and (np.diff(offset) >= 0).all()
    assert len(boxes) == len(scores) == offset[-1] and len(rles) == store.images_done
    for i in range(store.images_done):
        count = offset[i + 1] - offset[i]
        assert len(rles[i]) == count and store.seed_features(i).shape == (count, store.attrs["feature_dim"])
        if status[i] == DONE:
            for counts in rles[i]:
                assert rle.decode(counts, int(heights[i]), int(widths[i])).shape == (heights[i], widths[i])
    dict(store.skipped)
    return int(offset[-1])


def test_an_intact_store_reads_back(tmp_path):
    assert read_everything(make_store(tmp_path / "s.zarr")) == 9


def test_a_merged_store_that_does_not_exist_yet_names_its_parts(tmp_path):
    for i in range(2):
        make_store(tmp_path / f"masks.part{i:03d}-of-002.zarr")
    with pytest.raises(StoreError, match=r"masks.zarr does not exist yet, only 2 part store\(s\) of it "
                                         r"\(masks.part000-of-002.zarr, masks.part001-of-002.zarr\).*sp store merge"):
        PseudoLabelStore.open(tmp_path / "masks.zarr")


ODD = [None, True, -1, 0, 3, 2**40, 1.5, "", "x", [], [1, 2], {}, {"a": 1}]


def corrupt(path, rng: np.random.Generator) -> str:
    """One random damage to a store; returns what was done (for the failure message)."""
    what = int(rng.integers(6))
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if what == 0:  # an attribute
        key = pick(["schema_version", "settings", "settings_hash", "feature_dim", "num_images"])
        group = zarr.open_group(str(path), mode="r+")
        if rng.random() < 0.2:
            del group.attrs[key]
            return f"attr {key} deleted"
        group.attrs[key] = value = pick(ODD)
        return f"attr {key} = {value!r}"
    if what == 1:  # progress.json
        try:
            progress = json.loads((path / "progress.json").read_text())
            key = pick(sorted(progress))
        except (ValueError, TypeError):  # damaged by an earlier step of this case
            return "progress.json damaged already"
        if rng.random() < 0.2:
            (path / "progress.json").write_text('{"images_done": 4,')
            return "progress.json cut"
        progress[key] = value = pick(ODD)
        (path / "progress.json").write_text(json.dumps(progress))
        return f"progress {key} = {value!r}"
    name = pick(sorted(ARRAYS))
    try:
        arr = zarr.open_array(str(path / name), mode="r+")
        values = arr[:]
    except Exception:  # noqa: BLE001 - damaged by an earlier step of this case
        return f"{name} unreadable already"
    if what == 2 and arr.shape[0]:  # one value
        k = int(rng.integers(values.size))
        if values.dtype.kind == "f":
            value = pick([np.nan, np.inf, -6e4, 0.0, 7.5])
        else:
            info = np.iinfo(values.dtype)
            value = pick([info.min, info.max, -1, 0, 1, int(rng.integers(0, 1000))])
            value = max(info.min, min(info.max, value))
        values.flat[k] = value
        arr[...] = values
        return f"{name}[{k}] = {value}"
    if what == 3:  # its length
        length = int(rng.integers(0, 2 * arr.shape[0] + 2))
        arr.resize((length,) + arr.shape[1:])
        return f"{name} resized to {length}"
    if what == 4:  # a chunk file
        chunks = sorted(p for p in (path / name).rglob("*") if p.is_file() and p.name != "zarr.json")
        if not chunks:
            return "no chunk"
        chunk = pick(chunks)
        action = int(rng.integers(3))
        if action == 0:
            chunk.unlink()
        elif action == 1:
            chunk.write_bytes(chunk.read_bytes()[: int(rng.integers(chunk.stat().st_size + 1))])
        else:
            chunk.write_bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes())
        return f"{chunk.relative_to(path)} {['deleted', 'cut', 'replaced'][action]}"
    if rng.random() < 0.5:  # its metadata
        (path / name / "zarr.json").write_text(pick(["", "{", '{"zarr_format": 3}', "[]"]))
        return f"{name}/zarr.json damaged"
    shutil.rmtree(path / name)
    return f"{name} deleted"


def test_fuzz_damaged_stores_give_a_store_error_or_consistent_data(tmp_path):
    """Random damage (fixed seed, bounded count and time): every read either raises a ValueError (StoreError
    names the store and array; RLE decoding names the corrupt counts) or returns consistent data."""
    intact = make_store(tmp_path / "intact.zarr")
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "read": 0}
    start = time.perf_counter()
    for case in range(80):
        path = tmp_path / f"case{case}.zarr"
        shutil.copytree(intact, path)
        done = [corrupt(path, rng) for _ in range(int(rng.integers(1, 3)))]
        try:
            read_everything(path)
            outcomes["read"] += 1
        except ValueError as e:
            assert "\n" not in str(e), (done, str(e))
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001 - the test's point: name the damage that crashed the reader
            pytest.fail(f"case {case} ({'; '.join(done)}): {type(e).__name__}: {e}")
        shutil.rmtree(path)
        assert time.perf_counter() - start < 120, f"fuzzing took too long ({case} cases)"
    assert min(outcomes.values()) > 5, outcomes  # both outcomes occur
