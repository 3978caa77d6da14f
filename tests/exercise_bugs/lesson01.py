"""Planted bugs for lesson 1's exercises: each must be caught by the hint named beside it."""

import numpy as np

from pedaPEFT import linalg


def _rref(A, tol=1e-9, normalise=True, above=True, zero_test=None, copy=True):
    R = np.array(A, dtype=float) if copy else A
    m, n = R.shape
    pivots, row = [], 0
    for col in range(n):
        if row == m:
            break
        best = row + int(np.argmax(np.abs(R[row:, col])))
        small = R[best, col] == 0 if zero_test == "exact" else abs(R[best, col]) <= tol
        if small:
            continue
        R[[row, best]] = R[[best, row]]
        if normalise:
            R[row] = R[row] / R[row, col]
        for other in range(m):
            if other != row and (above or other > row):
                R[other] = R[other] - R[other, col] / R[row, col] * R[row]
        pivots.append(col)
        row += 1
    return R, tuple(pivots)


def rref_not_normalised(A, tol=1e-9):
    return _rref(A, tol, normalise=False)


def rref_only_below(A, tol=1e-9):
    return _rref(A, tol, above=False)


def rref_no_tolerance(A, tol=1e-9):
    return _rref(A, tol, zero_test="exact")


def rref_in_place(A, tol=1e-9):
    return _rref(A, tol, copy=False)


def factors_all_rows(A):
    R, pivots = linalg.rref(A)
    return np.asarray(A, dtype=float)[:, list(pivots)], R


def factors_columns_of_R(A):
    R, pivots = linalg.rref(A)
    return R[:, list(pivots)], R[: len(pivots)]


def factors_first_columns(A):
    R, pivots = linalg.rref(A)
    return np.asarray(A, dtype=float)[:, : len(pivots)], R[: len(pivots)]


BUGS = {
    "01-rref": [
        (rref_not_normalised, "pivot entries are not 1"),
        (rref_only_below, "entries above a pivot are not zero"),
        (rref_no_tolerance, "round-off, not a pivot"),
        (rref_in_place, "changed its input A"),
    ],
    "01-rank-factorization": [
        (factors_all_rows, "both must be rank(A)"),
        (factors_columns_of_R, "C holds columns of rref(A)"),
        (factors_first_columns, "C holds the first r columns of A"),
    ],
    "01-break-even-rank": [
        (768 * 3072 // (768 + 3072) + 1, "at least as many numbers"),
        (100, "find the *largest*"),
    ],
}
