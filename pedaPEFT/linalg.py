"""Matrix rank, rank factorization and low-rank approximation.

LoRA rests on one fact of linear algebra: a matrix of rank ``r`` is a product of an
``m × r`` and an ``r × n`` matrix, so it can be stored with ``r(m + n)`` numbers instead
of ``m·n``. This module computes the rank two ways (row reduction and the singular value
decomposition), builds that factorization, and gives the best rank-``k`` approximation of
any matrix (Eckart–Young). Last, a small experiment shows why a fine-tuning *update* can be
low rank even when the weights are not: :func:`planted_update_task` builds a regression task
whose answer differs from a "pretrained" weight by a low-rank matrix, and
:func:`finetune_linear` fine-tunes the weight on it by gradient descent.

All functions take a 2-D NumPy array (or anything ``np.asarray`` accepts, or a torch
tensor, which is copied to a NumPy array) with finite real entries, compute in float64
and return NumPy arrays.

Tolerances. Floating-point data are only known to about ``eps`` relative precision, where
``eps`` is the machine epsilon of the *input* dtype (``2.2e-16`` for float64, ``1.2e-7``
for float32; integer and boolean input counts as float64). A quantity is treated as zero
when it is below ``max(m, n) · eps · ‖A‖``:

* by SVD, singular values are compared with ``max(m, n) · eps · σ_max`` (``σ_max = ‖A‖₂``),
  NumPy's ``matrix_rank`` default;
* by row reduction, the candidate pivot of column ``j`` is compared with
  ``max(m, n) · eps · ‖A‖_∞ · (1 + Σ_i |R_ij|)``: ``‖A‖_∞`` is the largest absolute row sum
  (cheap, no SVD needed) and the sum runs over the pivot rows found so far (see :func:`rref`
  for why). Before the first pivot this is MATLAB's ``rref`` default.

The factor ``max(m, n)`` allows for the round-off that accumulates over a row or column;
``‖A‖`` makes the test scale-invariant (multiplying ``A`` by 1000 does not change its rank).
The two rules compare different numbers (singular values versus pivots), so near the
threshold the two ranks can disagree; lesson 1 shows an example.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "PlantedUpdateTask",
    "factorized_param_count",
    "finetune_linear",
    "low_rank_approx",
    "matrix_rank",
    "planted_update_task",
    "rank_factorization",
    "rref",
    "svd_param_count",
    "truncated_svd",
]

_METHODS = ("svd", "rref")
_F64_EPS = float(np.finfo(np.float64).eps)


def _as_matrix(A: Any, name: str = "A") -> tuple[np.ndarray, float]:
    """Return ``A`` as a float64 2-D array and the machine epsilon of its original dtype.

    Raises ``TypeError`` for complex or non-numeric input and ``ValueError`` for input
    that is not 2-D, is empty or holds NaN/inf.
    """
    if hasattr(A, "detach") and hasattr(A, "is_complex"):  # a torch tensor
        import torch

        if A.is_complex():
            raise TypeError(f"{name} must be real; got a complex tensor of dtype {A.dtype}")
        if A.is_meta:
            raise ValueError(f"{name} is on the meta device (a shape without values)")
        eps = float(torch.finfo(A.dtype).eps) if A.dtype.is_floating_point else _F64_EPS
        array = A.detach().cpu().double().numpy()
    else:
        array = np.asarray(A)
        if array.dtype.kind == "c":
            raise TypeError(f"{name} must be real; got complex dtype {array.dtype}")
        if array.dtype.kind not in "biuf":
            raise TypeError(
                f"{name} must hold real numbers (bool, int or float); got dtype {array.dtype}"
            )
        eps = float(np.finfo(array.dtype).eps) if array.dtype.kind == "f" else _F64_EPS
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix (ndim == 2); got ndim == {array.ndim}")
    if array.size == 0:
        raise ValueError(f"{name} must have at least one row and one column; got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must have finite entries; it holds NaN or inf")
    return array, eps


def _power_of_two_scaled(array: np.ndarray) -> tuple[np.ndarray, float]:
    """``(array / s, s)`` with ``s`` the power of two with ``s <= max |a_ij| < 2 s`` (1 for zeros).

    Rank, pivots and the reduced row echelon form do not change when ``A`` is multiplied by a
    nonzero number, and dividing by a power of two is exact; afterwards every entry is below
    2 in magnitude, so sums of magnitudes and tolerances can neither overflow (entries near
    1e308) nor underflow (entries near 1e-308).
    """
    largest = float(np.abs(array).max())
    if largest == 0.0:
        return array, 1.0
    scale = float(np.ldexp(1.0, np.frexp(largest)[1] - 1))
    return array / scale, scale


def _check_tol(tol: Any) -> float | None:
    """Return ``tol`` as a float, or None; it must be a finite number ``>= 0``."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be None or a real number >= 0; got {type(tol).__name__}")
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be None or a finite number >= 0; got {tol}")
    return float(tol)


def _check_rank(value: Any, name: str, upper: int) -> int:
    """Return ``value`` as an int, checking ``1 <= value <= upper``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [1, {upper}]; got {type(value).__name__}")
    if not 1 <= value <= upper:
        raise ValueError(f"{name} must be an integer in [1, {upper}]; got {value}")
    return int(value)


def _check_dimension(value: Any, name: str) -> int:
    """Return ``value`` as an int, checking it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1); got {value}")
    return int(value)


def rref(A: Any, tol: float | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Reduced row echelon form of ``A`` by Gauss–Jordan elimination with partial pivoting.

    Column by column, the entry of largest magnitude at or below the current row is swapped
    up (partial pivoting keeps the multipliers ``|l| <= 1``, so they do not magnify
    round-off).
    If that entry is not above the tolerance the column has no pivot: its remaining entries
    are set to zero. Otherwise the pivot row is divided by the pivot and the column is
    cleared in every other row. The result ``R`` has, in each of its first ``r`` rows, a
    leading 1 in a pivot column that is zero elsewhere, and its last ``m - r`` rows are
    zero; ``r`` is the rank.

    Default tolerance. When column ``j`` is reached, the entries ``R_ij`` of the ``k`` pivot
    rows found so far are the coefficients that write column ``j`` (restricted to those rows)
    as a combination of the ``k`` pivot columns, and the entries below them are what is left
    over. Round-off of relative size ``eps`` in every entry of ``A`` reaches that remainder
    amplified by those coefficients, so a remainder is only trusted above
    ``tol_j = max(m, n) · eps · ‖A‖_∞ · (1 + Σ_{i<k} |R_ij|)``, with
    ``‖A‖_∞ = max_i Σ_j |a_ij|`` and ``eps`` the machine epsilon of ``A``'s dtype. The
    ``(1 + Σ|R_ij|)`` factor matters: with the fixed threshold ``max(m, n) · eps · ‖A‖_∞``
    alone, about one random low-rank product in two hundred gets a spurious pivot.

    Parameters
    ----------
    A : (m, n) real matrix.
    tol : if given, a fixed threshold: pivots with magnitude ``<= tol`` count as zero.

    Returns
    -------
    R : (m, n) float64 array, the reduced row echelon form.
    pivots : indices of the pivot columns, increasing; ``len(pivots)`` is the rank.

    Introduced in lesson 1, section "3. Rank by row reduction".
    """
    R, eps = _as_matrix(A)
    tol = _check_tol(tol)
    R, scale = _power_of_two_scaled(R)
    tol = None if tol is None else tol / scale
    m, n = R.shape
    round_off = max(m, n) * eps * float(np.abs(R).sum(axis=1).max())
    pivots: list[int] = []
    row = 0
    for col in range(n):
        if row == m:
            break
        best = row + int(np.argmax(np.abs(R[row:, col])))
        threshold = round_off * (1.0 + float(np.abs(R[:row, col]).sum())) if tol is None else tol
        if abs(R[best, col]) <= threshold:
            R[row:, col] = 0.0
            continue
        R[[row, best]] = R[[best, row]]
        R[row] /= R[row, col]
        others = np.arange(m) != row
        R[others] -= np.outer(R[others, col], R[row])
        R[others, col] = 0.0
        pivots.append(col)
        row += 1
    return R, tuple(pivots)


def matrix_rank(A: Any, tol: float | None = None, method: str = "svd") -> int:
    """Rank of ``A``: the number of linearly independent columns (equally, rows).

    ``method="svd"`` counts singular values ``σ_i > tol`` (default tolerance
    ``max(m, n) · eps · σ_max``, as ``numpy.linalg.matrix_rank``). The SVD rank is the
    robust one: the distance from ``A`` to the nearest matrix of rank ``< k`` is exactly
    ``σ_k`` (in the spectral norm), so ``σ_k`` below the tolerance means ``A`` is, within
    its precision, of lower rank.

    ``method="rref"`` counts the pivots of :func:`rref` (default tolerance
    ``max(m, n) · eps · ‖A‖_∞ · (1 + Σ_i |R_ij|)``, see :func:`rref`). Exact in exact
    arithmetic, and how rank is taught by hand; in floating point a pivot is not a distance
    to singularity, so near the tolerance the two methods can disagree.

    ``tol``, if given, is an absolute threshold on singular values or on pivots.

    Introduced in lesson 1, section "4. Rank by the singular value decomposition";
    used again in lessons 2 and 5.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    if method == "rref":
        return len(rref(A, tol)[1])
    array, eps = _as_matrix(A)
    tol = _check_tol(tol)
    array, scale = _power_of_two_scaled(array)
    tol = None if tol is None else tol / scale
    singular_values = np.linalg.svd(array, compute_uv=False)
    if tol is None:
        tol = max(array.shape) * eps * float(singular_values[0])
    return int((singular_values > tol).sum())


def rank_factorization(A: Any, tol: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Factor a rank-``r`` matrix as ``A = C @ F`` with ``C`` (m × r) and ``F`` (r × n).

    ``C`` holds the pivot columns of ``A`` (a basis of its column space) and ``F`` the ``r``
    nonzero rows of ``rref(A)``. This works because column ``j`` of ``rref(A)`` lists the
    coefficients that write column ``j`` of ``A`` as a combination of the pivot columns
    (row operations preserve linear relations between columns). Storing ``C`` and ``F``
    takes ``r(m + n)`` numbers instead of ``m·n``.

    A zero matrix (rank 0) gives ``C`` of shape (m, 0) and ``F`` of shape (0, n).
    ``tol`` is passed to :func:`rref`.

    Introduced in lesson 1, section "5. Rank factorization: the rank-1 case and the lecture's slip".
    """
    array, _ = _as_matrix(A)
    R, pivots = rref(A, tol)
    return array[:, list(pivots)], R[: len(pivots)]


def truncated_svd(A: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` leading singular triplets of ``A = U Σ Vᵀ``.

    Returns ``U_k`` (m × k, orthonormal columns), ``S_k`` (the ``k`` largest singular values,
    a 1-D array in decreasing order: Σ_k is diagonal, so only its diagonal is stored) and
    ``Vt_k`` (k × n, orthonormal rows). ``k`` must be an integer in ``[1, min(m, n)]``.

    Introduced in lesson 2, section "2. Truncation".
    """
    array, _ = _as_matrix(A)
    k = _check_rank(k, "k", min(array.shape))
    U, S, Vt = np.linalg.svd(array, full_matrices=False)
    return U[:, :k], S[:k], Vt[:k]


def low_rank_approx(A: Any, k: int) -> np.ndarray:
    """Best rank-``k`` approximation ``A_k = U_k Σ_k V_kᵀ`` of ``A``.

    Eckart–Young(–Mirsky): among all matrices ``B`` of rank ``<= k``,
    ``‖A − B‖_F`` is smallest for ``B = A_k``, and the error is
    ``‖A − A_k‖_F = sqrt(σ_{k+1}² + … + σ_p²)``, ``p = min(m, n)`` (in the spectral norm the
    error is ``σ_{k+1}``). ``k`` must be an integer in ``[1, min(m, n)]``.

    Introduced in lesson 2, section "2. Truncation".
    """
    U_k, S_k, Vt_k = truncated_svd(A, k)
    return (U_k * S_k) @ Vt_k


def factorized_param_count(m: int, n: int, r: int) -> int:
    """Numbers stored by a rank-``r`` factorization ``C @ F`` of an ``m × n`` matrix.

    ``C`` is ``m × r`` and ``F`` is ``r × n``: ``r(m + n)`` numbers, against ``m·n`` dense.
    For a square ``n × n`` matrix this is the ``n² → 2rn`` reduction LoRA exploits; it saves
    storage only while ``r < mn / (m + n)``. ``r`` must be an integer in ``[1, min(m, n)]``.

    Introduced in lesson 1, section "5. Rank factorization: the rank-1 case and the lecture's slip";
    used again in lesson 2.
    """
    m = _check_dimension(m, "m")
    n = _check_dimension(n, "n")
    r = _check_rank(r, "r", min(m, n))
    return r * (m + n)


def svd_param_count(m: int, n: int, k: int) -> int:
    """Numbers stored by a truncated SVD ``U_k Σ_k V_kᵀ`` of an ``m × n`` matrix.

    ``U_k`` is ``m × k``, ``V_kᵀ`` is ``k × n`` and ``Σ_k`` is diagonal, so it needs only its
    ``k`` diagonal entries: ``k(m + n) + k`` numbers (``k(m + n)`` if ``Σ_k`` is folded into
    ``U_k``). Counting ``Σ_k`` as a full ``k × k`` matrix (``k²``) over-counts.
    ``k`` must be an integer in ``[1, min(m, n)]``.

    Introduced in lesson 2, section "4. A photograph at low rank".
    """
    m = _check_dimension(m, "m")
    n = _check_dimension(n, "n")
    k = _check_rank(k, "k", min(m, n))
    return k * (m + n) + k


class PlantedUpdateTask(NamedTuple):
    """A linear regression task whose solution is ``W_before + update``, ``rank(update) = r``.

    ``X`` is (n_samples, d_in), ``Y`` is (n_samples, d_out) with
    ``Y = X (W_before + update)ᵀ + noise``.
    """

    W_before: np.ndarray
    update: np.ndarray
    X: np.ndarray
    Y: np.ndarray


def planted_update_task(
    d_out: int = 64,
    d_in: int = 96,
    update_rank: int = 3,
    n_samples: int = 512,
    noise: float = 0.1,
    seed: int = 0,
) -> PlantedUpdateTask:
    """A "pretrained" weight and a new task that needs only a rank-``update_rank`` change.

    ``W_before`` (d_out × d_in) has i.i.d. ``N(0, 1/d_in)`` entries: a generic, full-rank
    weight. The planted change is ``update = B A`` with ``B`` (d_out × r) and ``A``
    (r × d_in) i.i.d. ``N(0, 1/d_in)``, so its rank is ``r`` and its size is comparable to
    ``W_before``'s. Inputs ``X`` are i.i.d. ``N(0, 1)``; targets are
    ``Y = X (W_before + update)ᵀ + noise · N(0, 1)``. Everything is drawn from
    ``np.random.default_rng(seed)`` in the order W_before, B, A, X, noise.

    Introduced in lesson 2, section "6. Why a weight *update* can have low intrinsic rank".
    """
    d_out = _check_dimension(d_out, "d_out")
    d_in = _check_dimension(d_in, "d_in")
    update_rank = _check_rank(update_rank, "update_rank", min(d_out, d_in))
    n_samples = _check_dimension(n_samples, "n_samples")
    if (
        isinstance(noise, bool)
        or not isinstance(noise, numbers.Real)
        or not (np.isfinite(noise) and noise >= 0)
    ):
        raise ValueError(f"noise must be a finite number >= 0; got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    rng = np.random.default_rng(int(seed))
    scale = 1.0 / np.sqrt(d_in)
    W_before = scale * rng.standard_normal((d_out, d_in))
    B = scale * rng.standard_normal((d_out, update_rank))
    A = scale * rng.standard_normal((update_rank, d_in))
    update = B @ A
    X = rng.standard_normal((n_samples, d_in))
    Y = X @ (W_before + update).T + float(noise) * rng.standard_normal((n_samples, d_out))
    return PlantedUpdateTask(W_before, update, X, Y)


def finetune_linear(
    W_before: Any, X: Any, Y: Any, learning_rate: float = 0.2, steps: int = 100
) -> np.ndarray:
    """Fine-tune a linear layer ``y = W x`` from ``W_before`` by full-batch gradient descent.

    The loss is the mean squared error ``L(W) = ‖X Wᵀ − Y‖²_F / (2N)`` over the ``N`` rows
    of ``X`` (N × d_in) and ``Y`` (N × d_out); its gradient is
    ``∇L(W) = (W Xᵀ − Yᵀ) X / N``, and each step is ``W ← W − learning_rate · ∇L(W)``.

    Why the update comes out low rank: if ``Y = X W*ᵀ + E`` with ``W* = W_before + Δ``, then
    with ``Σ = XᵀX / N`` and ``η`` the learning rate, after ``t`` steps
    ``W_t − W_before = Δ (I − (I − ηΣ)ᵗ) + η (EᵀX / N) Σ_{s<t} (I − ηΣ)ˢ``:
    the first term has rank ``<= rank(Δ)``, the second is fitted noise, small when ``N`` is
    large. Returns ``W_after`` (d_out × d_in).

    Introduced in lesson 2, section "6. Why a weight *update* can have low intrinsic rank".
    """
    W, _ = _as_matrix(W_before, "W_before")
    X, _ = _as_matrix(X, "X")
    Y, _ = _as_matrix(Y, "Y")
    if X.shape[1] != W.shape[1] or Y.shape != (X.shape[0], W.shape[0]):
        raise ValueError(
            f"shapes must be W_before (d_out, d_in), X (N, d_in), Y (N, d_out); got "
            f"W_before {W.shape}, X {X.shape}, Y {Y.shape}"
        )
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, numbers.Real)
        or not (np.isfinite(learning_rate) and learning_rate > 0)
    ):
        raise ValueError(f"learning_rate must be a finite number > 0; got {learning_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0; got {steps!r}")
    n_samples = X.shape[0]
    for _ in range(int(steps)):
        gradient = (W @ X.T - Y.T) @ X / n_samples
        W = W - learning_rate * gradient
    return W
