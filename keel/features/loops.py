"""The kernels a single pass of compiled code does better than whole-array NumPy: one loop each, by Numba.

``keel.features.kernels`` imports this on first use (compiling takes a moment once; the machine
code is cached beside this file, or under ``NUMBA_CACHE_DIR``), so a process that computes no
feature never loads Numba. Each loop runs without the GIL, so features computed on threads run
at once. The floating-point operations are those of the NumPy formulas they replace, in the
same order (Numba neither fuses nor reorders them without ``fastmath``): the sums are the very
bits the array versions gave. Large arrays are allocated by the caller, through NumPy: NumPy
asks the kernel for huge pages, and first touching small ones costs more than the loop itself.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_SPLIT = 134217729.0  # 2**27 + 1, Dekker's splitter (as kernels._SPLIT)

_jit = numba.njit(cache=True, nogil=True)


@_jit
def exact_square(a):
    """a * a and its exact rounding error (Dekker's product, as ``kernels.two_product``)."""
    sq = a * a
    ca = _SPLIT * a
    ah = ca - (ca - a)
    al = a - ah
    return sq, ((ah * ah - sq) + ah * al + al * ah) + al * al


@_jit
def dd_step(s, e, v, extra, with_extra):
    """(s, e) after adding v: s the running sum, e its errors (TwoSum's, plus ``extra``) summed."""
    prev = s
    s = prev + v
    bb = s - prev
    err = (prev - (s - bb)) + (v - bb)
    if with_extra:
        err = err + extra
    return s, e + err


@_jit
def dd_prefix(x, restart, squares, s_through, e_through):
    """Running sums of x (of its exact squares with ``squares``) restarting where ``restart`` is
    set, with each addition's exact rounding error (TwoSum; a square's own rounding error, by
    Dekker's product, joins it) summed alongside, into ``through[i]`` (n + 1 each): the sums up
    to element i-1."""
    s_through[0] = e_through[0] = 0.0
    s = e = 0.0
    for i in range(len(x)):
        if restart[i]:
            s = e = 0.0
        v, extra = exact_square(x[i]) if squares else (x[i], 0.0)
        s, e = dd_step(s, e, v, extra, squares)
        s_through[i + 1], e_through[i + 1] = s, e


@_jit
def sliding_extreme(x, lo, up, largest, out, queue):
    """The max (``largest``) or min of x[lo[j]:up[j]] for windows whose bounds never move back
    (probes in sorted order) into ``out`` (zeroed), by a monotone deque of positions in ``queue``
    (len(x)): O(len(x) + len(lo)). Empty windows keep their 0."""
    m = len(lo)
    head = tail = nxt = 0
    a_prev = b_prev = 0
    for j in range(m):
        a, b = lo[j], up[j]
        if a < a_prev or b < b_prev:
            raise ValueError("sliding_extreme: window bounds moved back (probes out of order)")
        a_prev, b_prev = a, b
        if nxt < a:  # the window jumped past everything queued
            nxt, head, tail = a, 0, 0
        while nxt < b:
            v = x[nxt]
            while tail > head and (x[queue[tail - 1]] <= v if largest else x[queue[tail - 1]] >= v):
                tail -= 1
            queue[tail] = nxt
            tail += 1
            nxt += 1
        while head < tail and queue[head] < a:
            head += 1
        if head < tail and a < b:
            out[j] = x[queue[head]]
    return out


@_jit
def sliding_distinct(codes, seen, all_seen, lo, up, n_values):
    """How many distinct codes the seen events of x[lo[j]:up[j]] hold, for windows whose
    bounds never move back: each event enters and leaves a count once."""
    m = len(lo)
    out = np.zeros(m, np.int64)
    counts = np.zeros(n_values, np.int64)
    distinct = a0 = b0 = 0
    for j in range(m):
        a, b = lo[j], up[j]
        if a < a0 or b < b0:
            raise ValueError("sliding_distinct: window bounds moved back (probes out of order)")
        if a >= b0:  # no overlap with what is counted: let it all go
            for i in range(a0, b0):
                counts[codes[i]] = 0
            distinct, a0, b0 = 0, a, a
        while b0 < b:
            if all_seen or seen[b0]:
                c = codes[b0]
                if counts[c] == 0:
                    distinct += 1
                counts[c] += 1
            b0 += 1
        while a0 < a:
            if all_seen or seen[a0]:
                c = codes[a0]
                counts[c] -= 1
                if counts[c] == 0:
                    distinct -= 1
            a0 += 1
        out[j] = distinct
    return out


@_jit
def scaled_moments(x, codes, fresh, seen, all_seen, exponents, s1, e1, s2, e2, changes, nxt):
    """For a standard deviation over windows of x (one block per entity, starting where ``fresh``;
    unseen values 0): each block's scale exponent (of its largest magnitude), and of y, x scaled
    by it (exactly, a power of two), the ``dd_prefix`` of y and of y^2; the prefix count of
    changes of value between consecutive seen events (a new entity counts as one); and each
    position's next seen one (n where none is); into the arrays given (``exponents`` one per
    block, the others n + 1 each)."""
    n = len(x)
    b, largest = -1, 0.0
    for i in range(n):
        if fresh[i]:
            if b >= 0:
                exponents[b] = math.frexp(largest)[1]
            b, largest = b + 1, 0.0
        largest = max(largest, abs(x[i]))
    if b >= 0:
        exponents[b] = math.frexp(largest)[1]
    s1[0] = e1[0] = s2[0] = e2[0] = 0.0
    changes[0] = 0
    a1 = c1 = a2 = c2 = 0.0
    b, scale, moved, last = -1, 0, 0, -1
    for i in range(n):
        if fresh[i]:
            a1 = c1 = a2 = c2 = 0.0
            b += 1
            scale = -exponents[b]
        y = math.ldexp(x[i], scale)
        a1, c1 = dd_step(a1, c1, y, 0.0, False)
        sq, sq_err = exact_square(y)
        a2, c2 = dd_step(a2, c2, sq, sq_err, True)
        s1[i + 1], e1[i + 1], s2[i + 1], e2[i + 1] = a1, c1, a2, c2
        if all_seen or seen[i]:
            if last >= 0 and (x[i] != x[last] or codes[i] != codes[last]):
                moved += 1
            last = i
        changes[i + 1] = moved
    nxt[n] = n
    for i in range(n - 1, -1, -1):
        nxt[i] = i if (all_seen or seen[i]) else nxt[i + 1]
