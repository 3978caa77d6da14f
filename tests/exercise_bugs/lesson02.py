"""Planted bugs for lesson 2's exercises: each must be caught by the hint named beside it."""

import numpy as np


def svd_columns_of_Vt(A, k):
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    return U[:, :k], S[:k], Vt[:, :k]


def svd_smallest_values(A, k):
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    return U[:, -k:], S[-k:], Vt[-k:]


def svd_sigma_matrix(A, k):
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    return U[:, :k], np.diag(S[:k]), Vt[:k]


def rank_unsquared(singular_values, max_error):
    s = np.asarray(singular_values)
    for k in range(len(s) + 1):
        if s[k:].sum() / s.sum() <= max_error:
            return k
    return len(s)


def rank_absolute(singular_values, max_error):
    s = np.asarray(singular_values)
    for k in range(len(s) + 1):
        if np.sqrt(np.sum(s[k:] ** 2)) <= max_error:
            return k
    return len(s)


def rank_one_based(singular_values, max_error):
    s = np.asarray(singular_values)
    for k in range(len(s) + 1):
        if np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2)) <= max_error:
            return k + 1
    return len(s)


BUGS = {
    "02-truncated-svd": [
        (svd_columns_of_Vt, "keep the first k *rows* of Vt"),
        (svd_smallest_values, "you kept the smallest singular values"),
        (svd_sigma_matrix, "S_k must be a 1-D array"),
    ],
    "02-smallest-rank": [
        (rank_unsquared, "*squares*"),
        (rank_absolute, "the error is absolute"),
        (rank_one_based, "is not the smallest rank"),
    ],
    "02-compression-ratio": [
        (600 * 512 / (30 * (600 + 512)), "you did not count Sigma_k"),
        ((30 * (600 + 512) + 30) / (600 * 512), "upside down"),
    ],
}
