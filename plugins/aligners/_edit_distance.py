"""Edit-distance machinery of the `mined` aligner: sequence DTW and nearest-string search.

Not a plugin itself (it registers nothing); kept apart so `mined.py` stays one readable plugin.
Levenshtein distances come from `rapidfuzz` (compiled, bit-parallel); the rest is vectorised numpy.
"""

from __future__ import annotations

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein


def distance_matrix(rows: list[str], cols: list[str]) -> np.ndarray:
    """`(len(rows), len(cols))` float64 Levenshtein distances."""
    if not rows or not cols:
        return np.zeros((len(rows), len(cols)))
    return process.cdist(rows, cols, scorer=Levenshtein.distance, dtype=np.int32).astype(np.float64)


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The DTW warping path through `cost (n, m)` as `(rows, cols)`, from `(0, 0)` to `(n-1, m-1)`.

    Same semantics as the MinED reference (spec §9.1, after `simpledtw`): the accumulated cost is
    `D[i, j] = cost[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1])` with an infinite first row and
    column, and the backtrack from the last cell moves diagonally, else up, else left, taking the
    first on ties.

    A row of `D` depends on itself through `D[i, j-1]`, but the recurrence
    `x[j] = c[j] + min(b[j], x[j-1])` unrolls to `x[j] = P[j+1] + min_{k<=j}(b[k] - P[k])`, with `P`
    the prefix sums of `c`: one cumulative minimum per row instead of a Python loop over cells.
    Costs are small integers, so float64 sums are exact.
    """
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    prefix = np.zeros((n, m + 1))
    np.cumsum(cost, axis=1, out=prefix[:, 1:])
    # Row views made once in C, and separate scratch buffers: an accumulate whose output aliases its
    # input takes numpy's buffered slow path (3x slower at this size).
    diag_or_up = np.empty(m)
    running = np.empty(m)
    rows = zip(acc[:-1, :-1], acc[:-1, 1:], prefix[:, :-1], prefix[:, 1:], acc[1:, 1:])
    for diag, up, before, through, out in rows:
        np.minimum(diag, up, out=diag_or_up)
        np.subtract(diag_or_up, before, out=diag_or_up)
        np.minimum.accumulate(diag_or_up, out=running)
        np.add(running, through, out=out)
    # Backtrack: diagonal, else up, else left, first minimum on ties; the infinite border makes the
    # out-of-range options lose exactly as the reference's bounds checks do. Only the path's cells
    # are read.
    flat = memoryview(acc.reshape(-1))
    width = m + 1
    path_rows, path_cols = [], []
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        path_rows.append(i)
        path_cols.append(j)
        at = (i + 1) * width + j + 1
        diag, up, left = flat[at - width - 1], flat[at - width], flat[at - 1]
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    path_rows.append(0)
    path_cols.append(0)
    return np.array(path_rows[::-1], dtype=np.int64), np.array(path_cols[::-1], dtype=np.int64)


def nearest_strings(queries: list[str], choices: list[str]) -> np.ndarray:
    """For each query, the index of the choice at the least Levenshtein distance (-1: no choices).

    Ties go to the choice closest in length, then to the lowest index. Since distance >= |length
    difference|, choices are searched in rings of growing length difference `delta`, and a query
    stops once its best distance is <= `delta`. Most tokens find a close neighbour within two or
    three rings, so GPT-2 -> TinyLlama takes ~8 s on 2 cores instead of ~30 s for all pairs.
    """
    q_len = np.fromiter(map(len, queries), dtype=np.int64, count=len(queries))
    c_len = np.fromiter(map(len, choices), dtype=np.int64, count=len(choices))
    found = np.full(len(queries), -1, dtype=np.int64)
    if not choices:
        return found
    by_length = {int(n): np.flatnonzero(c_len == n) for n in np.unique(c_len)}
    longest = int(c_len.max())
    for length in np.unique(q_len).tolist():
        members = np.flatnonzero(q_len == length)
        best = np.full(members.size, np.iinfo(np.int32).max, dtype=np.int64)
        for delta in range(0, max(length, longest) + 1):
            open_ = np.flatnonzero(best > delta)  # only these can still improve
            if open_.size == 0:
                break
            ring = [by_length[n] for n in {length - delta, length + delta} if n in by_length]
            if not ring:
                continue
            ids = np.sort(np.concatenate(ring))  # sorted, so argmin picks the lowest index on ties
            cutoff = int(best[open_].max())
            d = process.cdist(
                [queries[k] for k in members[open_]],
                [choices[c] for c in ids],
                scorer=Levenshtein.distance,
                dtype=np.int32,
                workers=-1,
                score_cutoff=None if cutoff == np.iinfo(np.int32).max else cutoff - 1,
            )
            pick = d.argmin(axis=1)
            dist = d[np.arange(open_.size), pick]
            better = dist < best[open_]  # strict: an earlier (closer-length) ring keeps its ties
            best[open_[better]] = dist[better]
            found[members[open_[better]]] = ids[pick[better]]
    return found
