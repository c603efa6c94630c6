"""The point-in-time engine's inputs as NumPy numbers, and its error.

Entities become dense int64 codes (dictionary-encoded keys, several keys combined into one code);
(entity code, time) becomes one int64 composite that sorts like the pair (``Axis``); a column
becomes numbers that sort like its values, with a decoder back to Arrow (``sortable``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import COLUMN_TYPES

# Composite sort keys stay below this; a test lowers it to exercise the rank-of-time path.
COMPOSITE_LIMIT = 1 << 62


class PointInTimeError(ValueError):
    """Feature values cannot be computed as asked; the message says why and what to do."""


class Axis:
    """(entity code, time) as one int64 that sorts like the pair and keeps every comparison made.

    Time is microseconds from a base when (entities x 2^bits) fits; otherwise it is the rank
    of the time among every time the engine will compare (events and probe bounds).
    """

    def __init__(self, ts: np.ndarray, t: np.ndarray, back: list[int], n_codes: int):
        lows, highs = [], []
        if len(ts):
            lows.append(int(ts.min()))
            highs.append(int(ts.max()))
        if len(t):
            lows.append(int(t.min()) - back[-1])
            highs.append(int(t.max()))
        lo, hi = min(lows, default=0), max(highs, default=0)
        self.lo = lo - 1  # offset 0 lies before every event
        self.bits = max(hi - self.lo, 1).bit_length()
        self.ranks = None
        if n_codes << self.bits >= COMPOSITE_LIMIT:
            times = [ts, *(t - b for b in back)]
            self.ranks = np.unique(np.concatenate(times))
            self.width = len(self.ranks) + 1
            if n_codes * self.width >= 1 << 63:
                raise PointInTimeError(f"{n_codes} entities x {self.width} distinct times do not fit int64 keys")

    def compose(self, codes: np.ndarray, times: np.ndarray | None) -> np.ndarray:
        """Composite keys; times None gives each entity's lowest key."""
        if self.ranks is None:
            out = np.left_shift(codes, self.bits)
            if times is not None:
                out += times
                out -= self.lo
            return out
        base = codes * self.width
        return base if times is None else base + np.searchsorted(self.ranks, times, "left") + 1

    def split(self, composite: np.ndarray, times) -> tuple[np.ndarray, np.ndarray]:
        """Entity codes and times back from sorted composites (``times()``: the times if ranks were used)."""
        if self.ranks is None:
            return composite >> self.bits, (composite & ((1 << self.bits) - 1)) + self.lo
        return composite // self.width, times()


def entity_codes(ev: pa.Table, pr: pa.Table, n_keys: int) -> tuple[np.ndarray, int]:
    """One int64 per event and probe naming its entity (events first); -1 where a key is NULL."""
    codes, size = None, 1
    for i in range(n_keys):
        e, p = ev.column(f"_k{i}"), pr.column(f"_k{i}")
        if p.type != e.type:
            try:
                p = p.cast(e.type)
            except pa.ArrowInvalid as exc:
                raise PointInTimeError(
                    f"probe key {i + 1} has type {p.type} but the events' has {e.type} ({exc}); "
                    "cast the probes' keys to the entity's declared types"
                ) from None
        enc = pa.chunked_array(e.chunks + p.chunks, type=e.type).dictionary_encode()
        idx = filled_numpy(pa.chunked_array([c.indices for c in enc.chunks], type=enc.chunks[0].indices.type), fill=-1)
        idx = idx.astype(np.int64)
        n = len(enc.chunks[0].dictionary) if enc.num_chunks else 0
        if codes is None:
            codes, size = idx, max(n, 1)
        else:
            missing = (codes < 0) | (idx < 0)
            codes, size = combine_codes(codes, size, idx, max(n, 1))
            codes[missing] = -1
    return codes, size


def combine_codes(a: np.ndarray, na: int, b: np.ndarray, nb: int) -> tuple[np.ndarray, int]:
    """Pairs of codes as one code, made dense first when the product would overflow."""
    if na * nb >= 1 << 62:
        _, a = np.unique(a, return_inverse=True)
        _, b = np.unique(b, return_inverse=True)
        na, nb = int(a.max(initial=0)) + 1, int(b.max(initial=0)) + 1
    return a * nb + b, na * nb


def filled_numpy(arr, fill=0) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        arr = pc.fill_null(arr, fill)
    return arr.to_numpy(zero_copy_only=False)


def sortable(col: pa.ChunkedArray, typ: str):
    """The column as sortable numbers, and a decoder from those numbers back to Arrow values."""
    arrow_type = COLUMN_TYPES[typ]
    col = col.combine_chunks()
    if typ == "string":
        enc = col.dictionary_encode()
        by_value = pc.sort_indices(enc.dictionary).to_numpy()
        rank = np.empty(len(by_value), np.int64)
        rank[by_value] = np.arange(len(by_value))
        idx = filled_numpy(enc.indices, fill=0).astype(np.int64)
        ranks = rank[idx] if len(rank) else idx

        def decode(found, empty):
            return enc.dictionary.take(
                pa.array(by_value[np.where(empty, 0, found)] if len(by_value) else found, mask=empty)
            )

        return ranks, decode
    if typ in ("timestamp", "date"):
        raw = col.cast(arrow_type).cast(pa.int64() if typ == "timestamp" else pa.int32())
        ranks = filled_numpy(raw).astype(np.int64)
        storage = pa.int64() if typ == "timestamp" else pa.int32()

        def decode(found, empty):
            return pa.array(found.astype(storage.to_pandas_dtype()), storage, mask=empty).cast(arrow_type)

        return ranks, decode
    ranks = filled_numpy(col)

    def decode(found, empty):
        return pa.array(found, arrow_type, mask=empty)

    return ranks, decode
