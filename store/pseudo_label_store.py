"""The pseudo-label store: a Zarr v3 directory holding the masks of stage 1 for stage 2.

Layout (ragged data are flat arrays plus cumulative end offsets, Arrow style):

    attrs                 schema_version, settings (every generation setting), settings_hash, feature_dim, ...
    images/name_bytes     (T,) uint8    UTF-8 file names relative to the images root, concatenated
    images/name_end       (I,) int64    end of name i in name_bytes
    images/height, width  (I,) int32    original image size
    images/status         (I,) uint8    0 pending, 1 done, 2 skipped (reasons in attrs / progress.json)
    images/mask_end       (I,) int64    masks of image i are rows mask_end[i-1]:mask_end[i]
    masks/box             (M, 4) float32  xyxy in original pixels, x2/y2 exclusive
    masks/score           (M,) float32
    masks/seed            (M, 3) int16  (y, x, pool) of the seed on its pooled C5 grid (-1 when none)
    masks/seed_feature    (M, D) float16  unit seed feature; chunks of 32 rows, uncompressed
    masks/rle_end         (M,) int64    end of mask m's COCO compressed RLE in rle/bytes
    rle/bytes             (R,) uint8
    progress.json         committed lengths, written atomically after every batch

Crash safety: rows are written first and `progress.json` is replaced atomically last, so a store killed at
any moment reopens at its last commit; rows past it are simply written again (zarr's local store writes
each chunk atomically too). Arrays grow by doubling and are trimmed to their exact length on `finalize`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

SCHEMA_VERSION = 1
PENDING, DONE, SKIPPED = 0, 1, 2
ROWS_PER_CHUNK = 16384
SEED_ROWS_PER_CHUNK = 32  # one image's seeds in ~1 chunk: the fastest per-image read (see design notes)


class StoreError(ValueError):
    """A store that cannot be used as asked: wrong version, other settings, other images, unfinished."""


def settings_hash(settings: dict) -> str:
    """A short stable hash of the generation settings: equal settings give equal stores."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ImageResult:
    """Stage-1 output for one image (K masks). An image that could not be read has status SKIPPED."""

    index: int
    height: int = 0
    width: int = 0
    status: int = DONE
    reason: str = ""
    rle: list[bytes] = field(default_factory=list)
    box: np.ndarray | None = None  # (K, 4) float32
    score: np.ndarray | None = None  # (K,) float32
    seed: np.ndarray | None = None  # (K, 3) int16
    seed_feature: np.ndarray | None = None  # (K, D) float16


# Every array: (dtype, shape after the first axis, "D" = feature_dim; what its length counts: the images
# exactly, or at least the committed masks / RLE bytes; arrays grow by doubling while a store is written).
ARRAYS = {"images/name_bytes": ("uint8", (), "names"), "images/name_end": ("int64", (), "images"),
          "images/height": ("int32", (), "images"), "images/width": ("int32", (), "images"),
          "images/status": ("uint8", (), "images"), "images/mask_end": ("int64", (), "images"),
          "masks/box": ("float32", (4,), "masks"), "masks/score": ("float32", (), "masks"),
          "masks/seed": ("int16", (3,), "masks"), "masks/seed_feature": ("float16", ("D",), "masks"),
          "masks/rle_end": ("int64", (), "masks"), "rle/bytes": ("uint8", (), "rle")}


def _count(value) -> bool:
    """A non-negative int (not a bool), as counts in attrs and progress.json must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ragged(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    flat = np.frombuffer(b"".join(strings), dtype=np.uint8)
    return flat, np.cumsum([len(s) for s in strings], dtype=np.int64)


def _unragged(flat: np.ndarray, end: np.ndarray) -> list[bytes]:
    start = np.concatenate([[0], end[:-1]]).astype(np.int64)
    data = flat.tobytes()
    return [data[a:b] for a, b in zip(start, end)]


class PseudoLabelStore:
    """Read and append access to one store. Open with `create`, `open` or `open_for_append`."""

    def __init__(self, path: Path, root: zarr.Group):
        self.path = Path(path)
        self.root = root
        self.attrs = dict(root.attrs)
        version = self.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path}: store schema version {version!r}, this sp reads version {SCHEMA_VERSION}; "
                             "regenerate the store with this version of sp")
        self.progress = self._read_progress()
        self._cache: dict[str, np.ndarray] = {}
        self._check_layout()

    def _check_layout(self) -> None:
        """Attributes, progress and every array's dtype and shape as this version writes them, so that readers
        fail here with a StoreError rather than deep inside numpy or zarr."""
        a, p = self.attrs, self.progress
        if not (isinstance(a.get("settings"), dict) and isinstance(a.get("settings_hash"), str)
                and _count(a.get("feature_dim")) and a["feature_dim"] > 0 and _count(a.get("num_images"))):
            raise StoreError(f"{self.path}: damaged attributes (settings, settings_hash, feature_dim, num_images)")
        if not (all(_count(p.get(k)) for k in ("images_done", "masks_done", "rle_bytes"))
                and isinstance(p.get("complete"), bool) and isinstance(p.get("skipped"), dict)
                and all(k.isdigit() and isinstance(v, str) for k, v in p["skipped"].items())
                and p["images_done"] <= a["num_images"]):
            raise StoreError(f"{self.path}/progress.json is damaged")
        need = {"images": a["num_images"], "masks": p["masks_done"], "rle": p["rle_bytes"], "names": 0}
        for name, (dtype, tail, length) in ARRAYS.items():
            try:
                arr = self.root[name]
                shape, found = arr.shape, arr.dtype
            except Exception as e:  # noqa: BLE001 - any zarr failure (missing, bad metadata): a damaged store
                raise StoreError(f"{self.path}: array {name} cannot be opened ({type(e).__name__}: {e})") from None
            tail = tuple(a["feature_dim"] if t == "D" else t for t in tail)
            exact = length == "images"
            if (found != dtype or shape[1:] != tail or shape[0] < need[length]
                    or (exact and shape[0] != need[length])):
                raise StoreError(f"{self.path}: array {name} is {found} {shape}, expected {dtype} with "
                                 f"{'' if exact else 'at least '}{need[length]} rows of shape {tail}")

    # ---- creation and opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, file_names: list[str], settings: dict, feature_dim: int,
               attrs: dict | None = None) -> "PseudoLabelStore":
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path} exists already")
        # Build under a temporary name and rename when complete: a crash never leaves a half-made store.
        tmp = path.with_name(path.name + ".creating")
        if tmp.exists():
            shutil.rmtree(tmp)
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        n = len(file_names)
        names, name_end = _ragged([f.encode() for f in file_names])
        images = root.create_group("images")
        cls._array(images, "name_bytes", names, chunk=1 << 20)
        cls._array(images, "name_end", name_end)
        for name, dtype in [("height", "int32"), ("width", "int32"), ("status", "uint8"), ("mask_end", "int64")]:
            cls._array(images, name, np.zeros(n, dtype))
        masks = root.create_group("masks")
        cls._array(masks, "box", np.zeros((0, 4), "float32"))
        cls._array(masks, "score", np.zeros(0, "float32"))
        cls._array(masks, "seed", np.zeros((0, 3), "int16"))
        cls._array(masks, "rle_end", np.zeros(0, "int64"))
        masks.create_array("seed_feature", shape=(0, feature_dim), dtype="float16",
                           chunks=(SEED_ROWS_PER_CHUNK, feature_dim), compressors=None, fill_value=0)
        # 256 KiB chunks: every commit rewrites the open chunk, so it must stay small
        cls._array(root.create_group("rle"), "bytes", np.zeros(0, "uint8"), chunk=1 << 18)
        root.attrs.update({
            "schema_version": SCHEMA_VERSION, "settings": settings, "settings_hash": settings_hash(settings),
            "feature_dim": feature_dim, "num_images": n, "created": datetime.datetime.now().isoformat(),
            "versions": {"zarr": zarr.__version__, "numpy": np.__version__}, **(attrs or {}),
        })
        with open(tmp / "progress.json", "w") as f:
            json.dump({"images_done": 0, "masks_done": 0, "rle_bytes": 0, "skipped": {}, "complete": False}, f)
        os.replace(tmp, path)
        return cls.open(path)

    @staticmethod
    def _array(group, name, data, chunk=ROWS_PER_CHUNK):
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype,
                                 chunks=(chunk,) + data.shape[1:], fill_value=0)
        if data.size:
            arr[...] = data
        return arr

    @classmethod
    def open(cls, path: Path) -> "PseudoLabelStore":
        path = Path(path)
        if not (path / "zarr.json").is_file() or not (path / "progress.json").is_file():
            from store.merge import PART_GLOB  # merge builds on this module

            parts = sorted(p.name for p in path.parent.glob(PART_GLOB.format(stem=path.stem)))
            if parts and not path.exists():
                raise StoreError(f"{path} does not exist yet, only {len(parts)} part store(s) of it "
                                 f"({', '.join(parts[:3])}{', ...' if len(parts) > 3 else ''}): finish every "
                                 f"`sp gen-masks --shard I/N`, then run `sp store merge {path}`")
            raise StoreError(f"{path} is not a pseudo-label store (no zarr.json or progress.json)")
        try:
            root = zarr.open_group(str(path), mode="r+")
        except Exception as e:  # noqa: BLE001 - any zarr failure on its metadata: a damaged store
            raise StoreError(f"{path}: its zarr metadata cannot be read ({type(e).__name__}: {e})") from None
        return cls(path, root)

    @classmethod
    def open_for_append(cls, path: Path, file_names: list[str], settings: dict, feature_dim: int,
                        attrs: dict | None = None) -> "PseudoLabelStore":
        """Create the store, or reopen it to resume; refuse one made with other settings or images."""
        if not Path(path).exists():
            return cls.create(path, file_names, settings, feature_dim, attrs)
        store = cls.open(path)
        old = store.attrs["settings"]
        differing = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differing:
            detail = ", ".join(f"{k}: store={old.get(k)!r} now={settings.get(k)!r}" for k in differing)
            raise StoreError(f"{path} was generated with other settings ({detail}); "
                             "use a new --store path or the same settings")
        if store.file_names != list(file_names):
            raise StoreError(f"{path} was generated for another image list ({store.num_images} images, "
                             f"now {len(file_names)}); the folder, --shard or --limit changed; use a new --store")
        return store

    # ---- progress ---------------------------------------------------------------------------------------
    def _read_progress(self) -> dict:
        try:
            with open(self.path / "progress.json") as f:
                progress = json.load(f)
        except ValueError as e:  # bad JSON or bad UTF-8
            raise StoreError(f"{self.path}/progress.json is damaged ({e})") from None
        if not isinstance(progress, dict):
            raise StoreError(f"{self.path}/progress.json is damaged (not an object)")
        return progress

    def _write_progress(self, progress: dict) -> None:
        tmp = self.path / "progress.json.tmp"
        with open(tmp, "w") as f:
            json.dump(progress, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "progress.json")
        self.progress = progress

    @property
    def num_images(self) -> int:
        return int(self.attrs["num_images"])

    @property
    def images_done(self) -> int:
        return int(self.progress["images_done"])

    @property
    def complete(self) -> bool:
        return bool(self.progress["complete"])

    @property
    def skipped(self) -> dict[int, str]:
        return {int(k): v for k, v in self.progress["skipped"].items()}

    # ---- writing ----------------------------------------------------------------------------------------
    def append(self, results: list[ImageResult]) -> None:
        """Write the next images (in plan order) and commit them."""
        p = dict(self.progress)
        i0 = p["images_done"]
        if [r.index for r in results] != list(range(i0, i0 + len(results))):
            raise StoreError(f"{self.path}: results for images {[r.index for r in results]} do not follow "
                             f"the {i0} images already committed")
        done = [r for r in results if r.status == DONE]
        rle = [s for r in done for s in r.rle]
        m0, m1 = p["masks_done"], p["masks_done"] + len(rle)
        if rle:
            flat, rle_end = _ragged(rle)
            b0 = p["rle_bytes"]
            self._put("rle/bytes", b0, flat)
            self._put("masks/rle_end", m0, rle_end + b0)
            for name in ("box", "score", "seed", "seed_feature"):
                self._put(f"masks/{name}", m0, np.concatenate([getattr(r, name) for r in done]))
            p["rle_bytes"] = b0 + len(flat)
        counts = [len(r.rle) if r.status == DONE else 0 for r in results]
        images = self.root["images"]
        i1 = i0 + len(results)
        images["height"][i0:i1] = [r.height for r in results]
        images["width"][i0:i1] = [r.width for r in results]
        images["status"][i0:i1] = [r.status for r in results]
        images["mask_end"][i0:i1] = m0 + np.cumsum(counts)
        p["skipped"] = {**p["skipped"], **{str(r.index): r.reason for r in results if r.status == SKIPPED}}
        p["images_done"], p["masks_done"] = i1, m1
        self._write_progress(p)
        self._cache.clear()

    def _put(self, name: str, start: int, data: np.ndarray) -> None:
        arr = self.root[name]
        end = start + len(data)
        if end > arr.shape[0]:
            arr.resize((max(end, 2 * arr.shape[0]),) + arr.shape[1:])
        arr[start:end] = data

    def finalize(self) -> None:
        """Trim arrays to their committed length and mark the store complete."""
        p = self.progress
        if p["images_done"] != self.num_images:
            raise StoreError(f"{self.path}: only {p['images_done']} of {self.num_images} images are done")
        for name, length in [("rle/bytes", p["rle_bytes"])] + [
                (f"masks/{n}", p["masks_done"]) for n in ("box", "score", "seed", "seed_feature", "rle_end")]:
            arr = self.root[name]
            arr.resize((length,) + arr.shape[1:])
        self.root.attrs["skipped"] = p["skipped"]
        self.attrs = dict(self.root.attrs)
        self._write_progress({**p, "complete": True})

    # ---- reading ----------------------------------------------------------------------------------------
    def _read(self, name: str, start: int | None, stop: int | None) -> np.ndarray:
        try:
            return self.root[name][start:stop]
        except Exception as e:  # noqa: BLE001 - undecodable or missing chunks: a damaged store, say which array
            raise StoreError(f"{self.path}: array {name} cannot be read ({type(e).__name__}: {e})") from None

    def _load(self, name: str, length: int | None) -> np.ndarray:
        """Rows :length of an array, read once, with its values checked (offsets ascend and stay in range)."""
        if name not in self._cache:
            values = self._read(name, None, length)
            ends = {"images/name_end": self.root["images/name_bytes"].shape[0],
                    "images/mask_end": self.progress["masks_done"], "masks/rle_end": self.progress["rle_bytes"]}
            bad = ""
            if name in ends and len(values):
                exact = name != "images/name_end"
                if values[0] < 0 or (np.diff(values) < 0).any() or values[-1] > ends[name] \
                        or (exact and values[-1] != ends[name]):
                    bad = f"offsets do not ascend from 0 to {ends[name]}"
            elif name == "images/status" and not np.isin(values, (PENDING, DONE, SKIPPED)).all():
                bad = "status values other than 0, 1, 2"
            elif name in ("images/height", "images/width") and (values < 0).any():
                bad = "negative sizes"
            elif name in ("masks/box", "masks/score") and not np.isfinite(values).all():
                bad = "values that are not finite"
            if bad:
                raise StoreError(f"{self.path}: array {name} is damaged: {bad}")
            self._cache[name] = values
        return self._cache[name]

    @property
    def file_names(self) -> list[str]:
        names = _unragged(self._load("images/name_bytes", None), self._load("images/name_end", None))
        try:
            return [n.decode() for n in names]
        except UnicodeDecodeError:
            raise StoreError(f"{self.path}: array images/name_bytes is damaged: names that are not UTF-8") from None

    def image_array(self, name: str) -> np.ndarray:
        """height, width, status or mask_end of the committed images, as numpy."""
        return self._load(f"images/{name}", self.images_done)

    @property
    def mask_offset(self) -> np.ndarray:
        """(I_done + 1,) int64: masks of image i are rows mask_offset[i]:mask_offset[i + 1]."""
        if "mask_offset" not in self._cache:
            self._cache["mask_offset"] = np.concatenate([[0], self.image_array("mask_end")]).astype(np.int64)
        return self._cache["mask_offset"]

    def mask_array(self, name: str) -> np.ndarray:
        """box, score, seed or rle_end of every committed mask, loaded once into numpy."""
        return self._load(f"masks/{name}", self.progress["masks_done"])

    def rle_images(self, start: int, stop: int) -> list[list[bytes]]:
        """COCO compressed RLE counts of the masks of images start..stop-1, read with one slice."""
        offset = self.mask_offset
        a, b = offset[start], offset[stop]
        end = self.mask_array("rle_end")
        first = end[a - 1] if a > 0 else 0
        data = self._read("rle/bytes", first, end[b - 1]) if b > a else np.zeros(0, np.uint8)
        strings = _unragged(data, end[a:b] - first)
        return [strings[offset[i] - a:offset[i + 1] - a] for i in range(start, stop)]

    def rle(self, image: int) -> list[bytes]:
        """COCO compressed RLE counts of the masks of one image."""
        return self.rle_images(image, image + 1)[0]

    def seed_features(self, image: int) -> np.ndarray:
        """(K, D) float16 seed features of one image, read with one slice."""
        a, b = self.mask_offset[image:image + 2]
        return self._read("masks/seed_feature", a, b)
