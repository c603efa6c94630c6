"""One row through an XGBoost booster without the Python wrapper's per-call work.

``Booster.inplace_predict`` spends most of a one-row call in Python: it imports its data
adapters, serialises its arguments and the array's interface to JSON, and wraps the output
in a new array; measured here, 300-400 us a call against 120-130 us for the C call itself
(``XGBoosterPredictFromDense``) with the same booster. ``OneRow`` makes that call with the
arguments and the interface of a buffer it owns serialised once, so a call is: fill the
buffer, call, read the floats.

It relies on the C API ``inplace_predict`` itself uses (``xgboost.core``), so it checks
itself at start: a probe row scores the same through both, or it is not used
(``OneRow.for_booster`` returns None and the caller keeps ``inplace_predict``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading

import numpy as np

log = logging.getLogger("keel.serving")


class OneRow:
    """Scores one float64 row of ``width`` values (NaN = missing) with ``booster``.

    One caller at a time owns the buffer: ``try_score`` answers None when another thread
    is scoring, and the caller takes the general path.
    """

    def __init__(self, booster, width: int) -> None:
        from xgboost import core

        self.booster = booster  # held: the handle below lives as long as it does
        self.width = width
        self.row = np.full((1, width), np.nan, dtype=np.float64)
        self._lib = core._LIB
        self._handle = booster.handle
        interface = {
            "data": [self.row.ctypes.data, False],
            "strides": None,
            "descr": [["", "<f8"]],
            "typestr": "<f8",
            "shape": [1, width],
            "version": 3,
        }
        self._interface = json.dumps(interface).encode()
        config = {
            "type": 0,
            "training": False,
            "iteration_begin": 0,
            "iteration_end": 0,
            "missing": float("nan"),
            "strict_shape": False,
            "cache_id": 0,
        }
        self._config = json.dumps(config).encode()
        self._proxy = ctypes.c_void_p()
        self._out = ctypes.POINTER(ctypes.c_float)()
        self._shape = ctypes.POINTER(ctypes.c_uint64)()
        self._dims = ctypes.c_uint64()
        self._refs = (ctypes.byref(self._shape), ctypes.byref(self._dims), ctypes.byref(self._out))
        self._lock = threading.Lock()

    @classmethod
    def for_booster(cls, booster, width: int) -> OneRow | None:
        """A checked ``OneRow``, or None when this XGBoost's C API does not answer as ``inplace_predict`` does."""
        try:
            fast = cls(booster, width)
            rng = np.random.default_rng(0)
            for probe in (np.full(width, np.nan), rng.normal(size=width)):
                expected = np.asarray(booster.inplace_predict(probe.reshape(1, -1), validate_features=False))
                got = fast.try_score(probe.tolist())
                if got is None or expected.size != got.size or not np.array_equal(expected.reshape(-1), got):
                    raise ValueError(f"probe scored {got} against inplace_predict's {expected.reshape(-1)}")
        except Exception as exc:  # noqa: BLE001 - any doubt means the wrapper's path, which always works
            log.warning("XGBoost one-row fast path off (inplace_predict is used): %s", exc)
            return None
        return fast

    def try_score(self, values) -> np.ndarray | None:
        """The booster's outputs for one row of floats, or None if the buffer is busy or the call failed."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            self.row[0, :] = values
            shape, dims, out = self._refs
            if self._lib.XGBoosterPredictFromDense(
                self._handle, self._interface, self._config, self._proxy, shape, dims, out
            ):
                return None  # the caller's inplace_predict raises XGBoost's own error
            size = 1
            for d in range(self._dims.value):
                size *= self._shape[d]
            if size == 1:
                return np.array([self._out[0]], dtype=np.float64)
            return np.array(self._out[:size], dtype=np.float64)
        finally:
            self._lock.release()
