"""COCO run-length encoding (RLE), compiled with numba.

Output is byte-identical to the compressed ``counts`` of
``pycocotools.mask.encode``, so any COCO tool can read what we write.

Format: pixels are visited in column-major (Fortran) order and stored as
alternating run lengths, starting with a run of zeros (0 when the first pixel
is foreground). Each count becomes characters ``chr(48 + chunk)``; a chunk
holds 5 bits of the value (low bits first) plus a "more follows" bit (0x20),
and the last chunk's 0x10 bit is the sign. From index 3 on, the value stored
is the difference from the count two places earlier: runs of one colour have
similar lengths, so the differences are short.
"""

from __future__ import annotations

import numba
import numpy as np

# COCO counts are uint32. A difference of two needs 33 bits with its sign,
# so 7 chunks of 5 bits bound the output size.
_MAX_PIXELS = 2**32
_MAX_CHARS_PER_COUNT = 7
# 12 chunks = 60 bits is far above any real count; more means garbage input
# (and would overflow the int64 shift).
_MAX_CHUNKS = 12


@numba.njit(cache=True)
def _runs(m, diff, pos, cnts):
    """Fill cnts with the run lengths of m: uint8 (H, W) C-contiguous,
    nonzero = foreground; return their number. Scratch: diff uint8 (W rounded
    up to 8,) zeros; pos, cnts int64 (H*W + 1,).

    Runs are column-major, masks row-major, and a transposed copy costs more
    than all the rest. So each row is compared with the one above (contiguous,
    vectorised), zero 8-byte words of the difference are skipped, and the few
    changes are sorted into column order afterwards.
    """
    h, w = m.shape
    words = diff.view(np.uint64)
    n = 0  # pos[:n]: column-major index of every pixel that starts a run
    for y in range(h):
        if y == 0:  # top pixel: compare with the bottom of the column before
            diff[0] = m[0, 0] != 0
            for x in range(1, w):
                diff[x] = (m[0, x] != 0) != (m[h - 1, x - 1] != 0)
        else:
            for x in range(w):
                diff[x] = (m[y, x] != 0) != (m[y - 1, x] != 0)
        for k in range(words.shape[0]):
            if words[k] != 0:
                for x in range(8 * k, min(8 * k + 8, w)):
                    if diff[x]:
                        pos[n] = x * h + y
                        n += 1
    # Stable counting sort by column; within a column y already ascends.
    col = np.zeros(w + 1, np.int64)
    for i in range(n):
        col[pos[i] // h + 1] += 1
    for x in range(w):
        col[x + 1] += col[x]
    for i in range(n):
        x = pos[i] // h
        cnts[col[x]] = pos[i]
        col[x] += 1
    # Run starts -> run lengths (the first run, of zeros, starts at 0).
    cnts[n] = h * w
    for i in range(n, 0, -1):
        cnts[i] -= cnts[i - 1]
    return n + 1


@numba.njit(cache=True)
def _write_string(cnts, m, out, pos):
    """Append the compressed form of cnts[:m] to out at pos; return new pos."""
    for i in range(m):
        x = cnts[i]
        if i > 2:
            x -= cnts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative deltas end at -1
            # Stop once the remaining bits are just the sign of c repeated.
            more = x != (-1 if c & 0x10 else 0)
            if more:
                c |= 0x20
            out[pos] = c + 48
            pos += 1
    return pos


@numba.njit(cache=True)
def _encode_masks(masks):
    """Encode masks: uint8 (N, H, W) C-contiguous. Returns (buf uint8 (L,),
    offsets int64 (N + 1,)); mask i is buf[offsets[i]:offsets[i + 1]]."""
    n_masks, h, w = masks.shape
    diff = np.zeros((w + 7) // 8 * 8, np.uint8)
    pos = np.empty(h * w + 1, np.int64)
    cnts = np.empty(h * w + 1, np.int64)
    offsets = np.zeros(n_masks + 1, np.int64)
    buf = np.empty(max(64, 16 * n_masks), np.uint8)
    end = 0
    for i in range(n_masks):
        m = _runs(masks[i], diff, pos, cnts)
        need = end + m * _MAX_CHARS_PER_COUNT
        if need > buf.shape[0]:
            # Grow geometrically so noisy masks do not cost a copy each.
            grown = np.empty(max(need, 2 * buf.shape[0]), np.uint8)
            grown[:end] = buf[:end]
            buf = grown
        end = _write_string(cnts, m, buf, end)
        offsets[i + 1] = end
    return buf[:end], offsets


@numba.njit(cache=True)
def _parse(s):
    """Counts from a compressed string s: uint8 (L,). Returns (cnts int64
    (L,), m, pos): cnts[:m] if m >= 0, else error code m at byte pos."""
    n = s.shape[0]
    cnts = np.empty(n, np.int64)  # every count takes at least one char
    m = p = 0
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                return cnts, -1, p
            c = np.int64(s[p]) - 48
            if c < 0 or c > 63:
                return cnts, -2, p
            if k >= _MAX_CHUNKS:
                return cnts, -3, p
            x |= (c & 0x1F) << (5 * k)
            more = (c & 0x20) != 0
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= np.int64(-1) << (5 * k)  # sign-extend
        if m > 2:
            x += cnts[m - 2]
        if x < 0 or x >= _MAX_PIXELS:  # also keeps later sums from overflowing
            return cnts, -4, p
        cnts[m] = x
        m += 1
    return cnts, m, p


_PARSE_ERRORS = {
    -1: "string ends in the middle of a count",
    -2: "character outside '0'..'o'",
    -3: "count longer than %d characters" % _MAX_CHUNKS,
    -4: "run length below 0 or above 2**32",
}


@numba.njit(cache=True)
def _fill(cnts, out):
    """Set the foreground runs of cnts to 1 in out: uint8 (H*W,) zeros,
    column-major."""
    pos = 0
    for i in range(cnts.shape[0]):
        if i % 2 == 1:
            out[pos:pos + cnts[i]] = 1
        pos += cnts[i]


@numba.njit(cache=True)
def _bbox(cnts, h):
    """[x, y, w, h] of the foreground, following the COCO API's rleToBbox
    (same results, quirks included) so boxes match pycocotools exactly."""
    bb = np.zeros(4, np.float64)
    m = (cnts.shape[0] // 2) * 2  # a trailing background run does not matter
    if m == 0:
        return bb
    xs = ys = np.int64(1) << 62
    xe = ye = xp = cc = np.int64(0)
    for j in range(m):
        cc += cnts[j]
        # Even j: first pixel of a foreground run; odd j: its last pixel.
        t = cc - j % 2
        y = t % h
        x = t // h
        if j % 2 == 0:
            xp = x
        elif xp < x:
            # The run wraps into a later column, so it covers whole rows.
            ys, ye = 0, h - 1
        xs, xe = min(xs, x), max(xe, x)
        ys, ye = min(ys, y), max(ye, y)
    bb[:] = (xs, ys, xe - xs + 1, ye - ys + 1)
    return bb


def _counts(counts: bytes | str, height: int, width: int) -> np.ndarray:
    """Validated int64 run lengths (m,) of a compressed string."""
    if height < 0 or width < 0:
        raise ValueError(f"RLE size must be non-negative, got {height}x{width}")
    if isinstance(counts, str):
        if not counts.isascii():
            raise ValueError("corrupt RLE counts: non-ASCII characters")
        counts = counts.encode("ascii")
    cnts, m, pos = _parse(np.frombuffer(counts, np.uint8))
    if m < 0:
        raise ValueError(f"corrupt RLE counts: {_PARSE_ERRORS[m]} (byte {pos})")
    cnts = cnts[:m]
    total = int(cnts.sum())
    if total != height * width:
        raise ValueError(
            f"corrupt RLE counts: runs cover {total} pixels, "
            f"mask {height}x{width} has {height * width}"
        )
    return cnts


def encode_batch(masks: np.ndarray) -> list[bytes]:
    """Compressed COCO RLE counts of masks (N, H, W), nonzero = foreground.

    Returns N bytes objects, same as [encode(m) for m in masks].
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if masks.shape[1] * masks.shape[2] >= _MAX_PIXELS:
        raise ValueError(f"mask {masks.shape[1:]} too big for 32-bit COCO counts")
    if masks.dtype == np.bool_:
        masks = masks.view(np.uint8)  # free; keeps one compiled signature
    elif masks.dtype != np.uint8:
        masks = (masks != 0).view(np.uint8)
    # Row-major is what _runs is fast on (one compiled signature, too).
    buf, offsets = _encode_masks(np.ascontiguousarray(masks))
    data = buf.tobytes()
    return [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def encode(mask: np.ndarray) -> bytes:
    """Compressed COCO RLE counts of one mask (H, W), nonzero = foreground.

    Equals pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    ['counts'] for 0/1 masks.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    return encode_batch(mask[None])[0]


def decode(counts: bytes | str, height: int, width: int) -> np.ndarray:
    """Mask uint8 (H, W), C-contiguous, from compressed counts.

    Raises ValueError if counts are corrupt or do not cover H*W pixels.
    """
    cnts = _counts(counts, height, width)
    out = np.zeros(height * width, np.uint8)
    _fill(cnts, out)
    return np.ascontiguousarray(out.reshape(width, height).T)


def area(counts: bytes | str, height: int, width: int) -> int:
    """Number of foreground pixels (sum of the odd-index runs)."""
    return int(_counts(counts, height, width)[1::2].sum())


def bbox(counts: bytes | str, height: int, width: int) -> np.ndarray:
    """Bounding box float64 (4,) [x, y, w, h], zeros for an empty mask;
    equal to pycocotools.mask.toBbox."""
    cnts = _counts(counts, height, width)
    if height == 0 or width == 0:
        return np.zeros(4, np.float64)  # no pixels; also avoids t % 0
    return _bbox(cnts, height)


def to_coco(counts: bytes | str, height: int, width: int) -> dict:
    """JSON-ready COCO RLE dict {'size': [h, w], 'counts': str}."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(height), int(width)], "counts": counts}
