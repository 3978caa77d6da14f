"""Lesson 1's exercises: row reduction, rank factorization, the break-even rank.

The matrices are built with a known rank (products of integer or Gaussian factors, a zero
column, repeated columns), so each check can tell *which* property of the answer is off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pedaPEFT import linalg
from pedaPEFT.exercise_bank.base import Exercise, Mistake, as_float_array, as_int, call

TOL = 1e-9


def _test_matrices() -> list[np.ndarray]:
    """Matrices whose pivots are not simply the first columns, of known ranks 0..4."""
    rng = np.random.default_rng(2024)
    integer_low_rank = rng.integers(-3, 4, (5, 2)) @ rng.integers(-3, 4, (2, 6))
    integer_low_rank[:, 0] = 0  # a zero first column: the first pivot is further right
    gaussian_low_rank = rng.standard_normal((6, 3)) @ rng.standard_normal((3, 7))
    gaussian_low_rank[:, 1] = 2 * gaussian_low_rank[:, 0]  # a dependent column up front
    lecture = np.array([[1, 2, 0, 3, 1], [2, 4, 1, 7, 3], [3, 6, 1, 10, 4], [0, 0, 1, 1, 1]])
    return [
        lecture,
        integer_low_rank,
        gaussian_low_rank,
        rng.standard_normal((4, 4)),
        rng.standard_normal((3, 5)) @ rng.standard_normal((5, 2)),
        np.zeros((3, 4)),
        np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [1.0, 3.0, 0.0]]),
    ]


def _pair(result: Any, what: str) -> tuple[Any, Any]:
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise Mistake(f"{what} must return a pair, got {type(result).__name__}.")
    return result[0], result[1]


def _run_rref(rref: Any) -> None:
    for A in _test_matrices():
        given = A.astype(float)
        R, pivots = _pair(call(rref, given, name="rref(A)"), "rref(A)")
        if not np.array_equal(given, A.astype(float)):
            raise Mistake("your rref changed its input A: work on a float copy "
                          "(np.array(A, dtype=float)).")
        R = as_float_array(R, "R")
        try:
            pivots = [int(p) for p in pivots]
        except (TypeError, ValueError):
            raise Mistake("pivots must be a sequence of column indices (integers).") from None
        R_ref, pivots_ref = linalg.rref(A, tol=TOL)
        shape = f"a {A.shape[0]}x{A.shape[1]} matrix of rank {len(pivots_ref)}"
        if R.shape != A.shape:
            raise Mistake(f"R must have A's shape {A.shape}, got {R.shape}.")
        if len(pivots) > len(pivots_ref):
            raise Mistake(f"more pivots than the rank on {shape}: an entry with |x| <= tol is "
                          "round-off, not a pivot; treat it as zero.")
        if len(pivots) < len(pivots_ref):
            raise Mistake(f"fewer pivots than the rank on {shape}: when the current row has a "
                          "zero in a column, look below it for a nonzero entry and swap it up.")
        for row, col in enumerate(pivots):
            if abs(R[row, col] - 1.0) > 1e-8:
                raise Mistake(f"pivot entries are not 1 (on {shape}): divide each pivot row "
                              "by its pivot.")
            if np.any(np.abs(np.delete(R[:, col], row)) > 1e-8):
                raise Mistake(f"entries above a pivot are not zero (on {shape}): clear the "
                              "pivot column in every other row, above as well as below.")
        if tuple(pivots) != pivots_ref:
            raise Mistake(f"the pivot columns are wrong on {shape}.")
        if not np.allclose(R, R_ref, atol=1e-8):
            raise Mistake(f"R is not the reduced row echelon form of {shape}.")


def _run_rank_factorization(factorize: Any) -> None:
    for A in _test_matrices():
        if not A.any():
            continue  # rank 0 has no factors to speak of
        C, F = _pair(call(factorize, A.astype(float), name="rank_factorization(A)"),
                     "rank_factorization(A)")
        C, F = as_float_array(C, "C"), as_float_array(F, "F")
        R_ref, pivots = linalg.rref(A, tol=TOL)
        r, (m, n) = len(pivots), A.shape
        shape = f"a {m}x{n} matrix of rank {r}"
        if C.ndim != 2 or F.ndim != 2:
            raise Mistake(f"C and F must be matrices, got shapes {C.shape} and {F.shape}.")
        if C.shape[1] != r or F.shape[0] != r:
            raise Mistake(f"C has {C.shape[1]} columns and F {F.shape[0]} rows for {shape}: "
                          "both must be rank(A): keep A's pivot columns and only the nonzero "
                          "rows of rref(A).")
        if C.shape[0] != m or F.shape[1] != n:
            raise Mistake(f"C must have A's rows and F A's columns, got {C.shape} and {F.shape} "
                          f"for {shape}.")
        if np.allclose(C @ F, A, atol=1e-8):
            continue
        if np.allclose(C, R_ref[:, list(pivots)], atol=1e-8):
            raise Mistake(f"C holds columns of rref(A) (on {shape}): take C's columns from A "
                          "itself; row operations change columns but keep their relations.")
        if np.allclose(C, A[:, :r], atol=1e-8):
            raise Mistake(f"C holds the first r columns of A (on {shape}): take the pivot "
                          "columns, which are not always the first ones.")
        raise Mistake(f"C @ F does not reproduce A (on {shape}).")


M, N = 768, 3072  # GPT-2's MLP weight


def _break_even_rank() -> int:
    return max(r for r in range(1, min(M, N) + 1) if linalg.factorized_param_count(M, N, r) < M * N)


def _run_break_even(answer: Any) -> None:
    rank = as_int(answer, "break_even_rank")
    expected = _break_even_rank()
    if rank == expected:
        return
    if linalg.factorized_param_count(M, N, rank) >= M * N:
        raise Mistake("at this rank the factors store at least as many numbers as the dense "
                      "matrix: solve r (m + n) < m n.")
    raise Mistake("a rank-r factorization still saves numbers above this r: find the *largest* "
                  "integer r with r (m + n) < m n.")


EXERCISES = [
    Exercise("01-rref", 1, "rref(A): the reduced row echelon form and the pivot columns",
             "code", _run_rref),
    Exercise("01-rank-factorization", 1,
             "rank_factorization(A): C (m x r) and F (r x n) with C @ F == A", "code",
             _run_rank_factorization),
    Exercise("01-break-even-rank", 1,
             "break_even_rank: the largest rank at which factors of a 768 x 3072 matrix save "
             "numbers", "number", _run_break_even, lambda: [str(_break_even_rank())]),
]
