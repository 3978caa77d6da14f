"""Lesson 2's exercises: the truncated SVD, the smallest rank for a target error, a ratio.

Singular vectors are unique only up to sign, so the truncated SVD is checked on what is
unique: the singular values, orthonormality and the rank-k reconstruction (Eckart–Young's
best approximation, ``linalg.low_rank_approx``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pedaPEFT import linalg
from pedaPEFT.exercise_bank.base import (
    Exercise,
    Mistake,
    as_float_array,
    as_int,
    as_real,
    call,
)


def _run_truncated_svd(truncated_svd: Any) -> None:
    rng = np.random.default_rng(11)
    for (m, n), k in (((7, 5), 2), ((4, 9), 3), ((6, 6), 6), ((10, 8), 1)):
        A = rng.standard_normal((m, n))
        result = call(truncated_svd, A.copy(), k, name="truncated_svd(A, k)")
        if not (isinstance(result, (tuple, list)) and len(result) == 3):
            raise Mistake("truncated_svd must return three things: U_k, S_k, Vt_k.")
        U, S, Vt = (as_float_array(part, label)
                    for part, label in zip(result, ("U_k", "S_k", "Vt_k"), strict=True))
        case = f"(A of shape {A.shape}, k = {k})"
        S_all = np.linalg.svd(A, compute_uv=False)
        if S.ndim == 2 and S.shape == (k, k):
            raise Mistake(f"S_k must be a 1-D array of the k singular values, not the diagonal "
                          f"matrix {case}.")
        if S.shape != (k,):
            raise Mistake(f"S_k must have shape (k,) {case}, got {S.shape}.")
        if U.shape != (m, k):
            raise Mistake(f"U_k must have shape (m, k) {case}, got {U.shape}: keep the first k "
                          "*columns* of U.")
        if Vt.shape != (k, n):
            raise Mistake(f"Vt_k must have shape (k, n) {case}, got {Vt.shape}: keep the first "
                          "k *rows* of Vt.")
        if np.allclose(S, S_all[-k:]) and k < len(S_all):
            raise Mistake(f"you kept the smallest singular values {case}: they come in "
                          "decreasing order, keep the first k.")
        if not np.allclose(S, S_all[:k]):
            raise Mistake(f"S_k are not the k largest singular values of A {case}.")
        if not (np.allclose(U.T @ U, np.eye(k), atol=1e-8)
                and np.allclose(Vt @ Vt.T, np.eye(k), atol=1e-8)):
            raise Mistake(f"the columns of U_k (rows of Vt_k) must be orthonormal {case}.")
        if not np.allclose((U * S) @ Vt, linalg.low_rank_approx(A, k), atol=1e-8):
            raise Mistake(f"U_k diag(S_k) Vt_k is not the best rank-k approximation {case}: "
                          "keep matching singular triplets together.")


def _relative_errors(sigma: np.ndarray) -> np.ndarray:
    """err[k] = ||A - A_k||_F / ||A||_F for k = 0..p, from the singular values."""
    tail = np.concatenate([np.cumsum((sigma**2)[::-1])[::-1], [0.0]])
    return np.sqrt(tail / tail[0])


def smallest_rank_reference(sigma: np.ndarray, max_error: float) -> int:
    """The smallest k (0..p) with relative Frobenius error <= max_error."""
    return int(np.argmax(_relative_errors(sigma) <= max_error))


def _spectra() -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(5)
    cases = []
    for size, decay, target in ((40, 0.8, 0.05), (25, 0.95, 0.2), (60, 0.9, 0.01),
                                (12, 0.5, 0.3), (30, 0.97, 0.1)):
        sigma = np.sort(decay ** np.arange(size) * rng.uniform(0.5, 1.5, size))[::-1]
        cases.append((sigma, target))
    return cases


def _run_smallest_rank(smallest_rank: Any) -> None:
    cases = _spectra()
    answers = []
    for sigma, target in cases:
        answers.append(as_int(call(smallest_rank, sigma.copy(), target,
                                   name="smallest_rank(singular_values, max_error)"), "k"))
    expected = [smallest_rank_reference(sigma, target) for sigma, target in cases]
    if answers == expected:
        return

    def matches(error_of_k) -> bool:  # the answers are what this (wrong) error curve gives
        return all(k == int(np.argmax(error_of_k(sigma) <= target))
                   for k, (sigma, target) in zip(answers, cases, strict=True))

    def unsquared(sigma):
        tail = np.concatenate([np.cumsum(sigma[::-1])[::-1], [0.0]])
        return tail / tail[0]

    def absolute(sigma):
        return np.sqrt(np.concatenate([np.cumsum((sigma**2)[::-1])[::-1], [0.0]]))

    if matches(unsquared):
        raise Mistake("the error uses the singular values themselves: Eckart-Young sums the "
                      "*squares* of the dropped sigma_i, then takes the square root.")
    if matches(absolute):
        raise Mistake("the error is absolute: divide by ||A||_F = sqrt(sum of all sigma_i^2) "
                      "for the relative error.")
    for (sigma, _), k, right in zip(cases, answers, expected, strict=True):
        if k == right:
            continue
        if k < right:
            raise Mistake(f"with k = {k} the relative error is still above max_error "
                          f"({len(sigma)} singular values): mind 0- versus 1-based indexing "
                          "(keeping k values drops sigma[k:]).")
        raise Mistake(f"k = {k} is not the smallest rank that meets max_error ({len(sigma)} "
                      "singular values): a smaller k already does; mind 0- versus 1-based "
                      "indexing.")


PHOTO_M, PHOTO_N, PHOTO_K = 600, 512, 30


def _ratio() -> float:
    return PHOTO_M * PHOTO_N / linalg.svd_param_count(PHOTO_M, PHOTO_N, PHOTO_K)


def _run_ratio(answer: Any) -> None:
    ratio = as_real(answer, "ratio_30")
    expected = _ratio()
    if abs(ratio - expected) <= 1e-6 * expected:
        return
    if abs(ratio - PHOTO_M * PHOTO_N / (PHOTO_K * (PHOTO_M + PHOTO_N))) <= 1e-6 * expected:
        raise Mistake("you did not count Sigma_k: store its k diagonal entries too.")
    if abs(ratio - 1 / expected) <= 1e-6 / expected:
        raise Mistake("the ratio is upside down: dense numbers divided by stored numbers.")
    raise Mistake("the ratio is " + ("too large" if ratio > expected else "too small") + ": "
                  "dense numbers m n divided by k (m + n) + k.")


EXERCISES = [
    Exercise("02-truncated-svd", 2, "truncated_svd(A, k): U_k, S_k, Vt_k of the best rank-k "
             "approximation", "code", _run_truncated_svd),
    Exercise("02-smallest-rank", 2, "smallest_rank(singular_values, max_error): the smallest k "
             "whose relative Frobenius error is at most max_error", "code", _run_smallest_rank),
    Exercise("02-compression-ratio", 2, "ratio_30: how many times smaller a rank-30 truncated "
             "SVD of the 600 x 512 photograph is", "number", _run_ratio,
             lambda: [f"{_ratio():.{digits}f}" for digits in (4, 6)]),
]
