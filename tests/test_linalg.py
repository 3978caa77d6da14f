"""Tests for pedaPEFT.linalg: rank two ways, rank factorization, truncated SVD, counts."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pedaPEFT import linalg

# The lecture's three 3×3 matrices (ranks 1, 2, 3).
RANK_1 = np.array([[2, 10, 1], [4, 20, 2], [6, 30, 3]])
RANK_2 = np.array([[2, 10, 1], [7, 20, 2], [6, 30, 3]])
RANK_3 = np.array([[2, 3, 1], [7, 5, 2], [6, 1, 3]])


def random_low_rank(seed: int, m: int, n: int, r: int, scale: float = 1.0) -> np.ndarray:
    """A product of a random m×r and a random r×n Gaussian matrix (rank r almost surely)."""
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal((m, r)) @ rng.standard_normal((r, n))


low_rank_cases = st.integers(1, 14).flatmap(
    lambda m: st.integers(1, 14).flatmap(
        lambda n: st.tuples(
            st.integers(0, 2**32 - 1),
            st.just(m),
            st.just(n),
            st.integers(1, min(m, n)),
            st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]),
        )
    )
)


# --- rref ---------------------------------------------------------------------------------


def test_rref_of_lecture_matrices_by_hand():
    R, pivots = linalg.rref(RANK_1)
    np.testing.assert_allclose(R, [[1, 5, 0.5], [0, 0, 0], [0, 0, 0]], atol=1e-15)
    assert pivots == (0,)
    R, pivots = linalg.rref(RANK_2)
    assert pivots == (0, 1)
    # Column 2 = 0·col0 + 0.1·col1 in RANK_2 (2 = 0.1·20, 1 = 0.1·10, 3 = 0.1·30).
    np.testing.assert_allclose(R, [[1, 0, 0], [0, 1, 0.1], [0, 0, 0]], atol=1e-15)
    R, pivots = linalg.rref(RANK_3)
    assert pivots == (0, 1, 2)
    np.testing.assert_allclose(R, np.eye(3), atol=1e-15)


def test_rref_structure_on_wide_and_tall_matrices():
    for shape, r in [((4, 9), 2), ((9, 4), 3), ((6, 6), 6), ((1, 5), 1), ((5, 1), 1)]:
        A = random_low_rank(7, *shape, r)
        R, pivots = linalg.rref(A)
        assert len(pivots) == r
        assert list(pivots) == sorted(pivots)
        np.testing.assert_array_equal(R[len(pivots) :], 0.0)
        for i, j in enumerate(pivots):
            expected_column = np.zeros(shape[0])
            expected_column[i] = 1.0
            np.testing.assert_array_equal(R[:, j], expected_column)
            np.testing.assert_array_equal(R[i, :j], 0.0)  # leading entry of row i


def test_rref_uses_partial_pivoting():
    # Without row swaps the tiny 1e-20 would be the pivot and 1 - 1e20 would swamp the answer.
    A = np.array([[1e-20, 1.0], [1.0, 1.0]])
    R, pivots = linalg.rref(A)
    assert pivots == (0, 1)
    np.testing.assert_allclose(R, np.eye(2), atol=1e-15)


def test_rref_does_not_modify_its_input():
    A = RANK_2.astype(float)
    before = A.copy()
    linalg.rref(A)
    np.testing.assert_array_equal(A, before)


def test_rref_zero_matrix_has_no_pivots():
    R, pivots = linalg.rref(np.zeros((3, 4)))
    assert pivots == ()
    np.testing.assert_array_equal(R, 0.0)


def test_rref_explicit_tolerance_decides_small_pivots():
    A = np.array([[1.0, 1.0], [1.0, 1.0 + 1e-6]])  # second pivot is exactly 1e-6 - round-off
    assert linalg.rref(A, tol=1e-7)[1] == (0, 1)
    assert linalg.rref(A, tol=1e-5)[1] == (0,)


def test_rref_fixed_threshold_is_fragile_where_default_is_not():
    """The reason for the coefficient factor in rref's default tolerance.

    With the bare ``max(m, n)·eps·‖A‖_∞`` threshold some random low-rank products get a
    spurious pivot from amplified round-off; the default tolerance gets every one right.
    The factors are multiples of 1/64, so every product is exact (the same on any machine)
    and has exactly rank r.
    """
    eps = np.finfo(np.float64).eps
    fixed_wrong = default_wrong = 0
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        m, n = (int(v) for v in rng.integers(2, 13, size=2))
        r = int(rng.integers(1, min(m, n)))
        X = np.round(64 * rng.standard_normal((m, r))) / 64
        Y = np.round(64 * rng.standard_normal((r, n))) / 64
        A = X @ Y
        assert np.linalg.matrix_rank(A) == r
        fixed = max(m, n) * eps * np.abs(A).sum(axis=1).max()
        fixed_wrong += len(linalg.rref(A, tol=fixed)[1]) != r
        default_wrong += len(linalg.rref(A)[1]) != r
    assert default_wrong == 0
    assert fixed_wrong > 0


@settings(max_examples=300, deadline=None)
@given(low_rank_cases)
def test_rref_rank_agrees_with_svd_rank_on_random_low_rank_matrices(case):
    seed, m, n, r, scale = case
    A = random_low_rank(seed, m, n, r, scale)
    assert linalg.matrix_rank(A, method="svd") == r
    assert linalg.matrix_rank(A, method="rref") == r


# --- matrix_rank --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "rref"])
def test_matrix_rank_of_lecture_matrices(method):
    assert [linalg.matrix_rank(M, method=method) for M in (RANK_1, RANK_2, RANK_3)] == [1, 2, 3]


def test_matrix_rank_svd_matches_numpy_default():
    rng = np.random.default_rng(3)
    for _ in range(50):
        m, n = rng.integers(1, 12, size=2)
        r = int(rng.integers(1, min(m, n) + 1))
        A = random_low_rank(int(rng.integers(1 << 30)), int(m), int(n), r)
        assert linalg.matrix_rank(A) == np.linalg.matrix_rank(A)


def test_matrix_rank_uses_the_precision_of_the_input_dtype():
    # A rank-1 product rounded to float32 has round-off of float32 size, far above
    # float64's epsilon; judged with float32's epsilon it is rank 1.
    rng = np.random.default_rng(4)
    A32 = np.outer(rng.standard_normal(20), rng.standard_normal(15)).astype(np.float32)
    A32 = (A32 * np.float32(1.1)) / np.float32(1.1)
    assert linalg.matrix_rank(A32) == 1
    assert linalg.matrix_rank(A32, method="rref") == 1
    assert linalg.matrix_rank(torch.from_numpy(A32)) == 1


def test_matrix_rank_accepts_torch_tensors_and_lists():
    assert linalg.matrix_rank(torch.tensor(RANK_2, dtype=torch.float64)) == 2
    assert linalg.matrix_rank(torch.tensor(RANK_1), method="rref") == 1
    assert linalg.matrix_rank(RANK_3.tolist()) == 3


def test_matrix_rank_is_scale_invariant():
    A = random_low_rank(5, 8, 6, 3)
    for scale in (1e-200, 1e-8, 1.0, 1e8, 1e200):
        assert linalg.matrix_rank(scale * A) == 3
        assert linalg.matrix_rank(scale * A, method="rref") == 3


def test_nearly_singular_matrix_ranks_can_differ_at_a_given_tolerance():
    # [[1, 1], [1, 1 + d]]: the second pivot is d, the smallest singular value about d/2.
    A = np.array([[1.0, 1.0], [1.0, 1.0015]])
    assert linalg.matrix_rank(A, tol=1e-3, method="rref") == 2
    assert linalg.matrix_rank(A, tol=1e-3, method="svd") == 1


# --- rank_factorization -------------------------------------------------------------------


def test_rank_factorization_of_lecture_rank_1_matrix():
    C, F = linalg.rank_factorization(RANK_1)
    np.testing.assert_array_equal(C, [[2], [4], [6]])
    np.testing.assert_allclose(F, [[1, 5, 0.5]])
    np.testing.assert_allclose(C @ F, RANK_1)


def test_rank_factorization_of_zero_matrix():
    C, F = linalg.rank_factorization(np.zeros((3, 5)))
    assert C.shape == (3, 0) and F.shape == (0, 5)
    np.testing.assert_array_equal(C @ F, np.zeros((3, 5)))


@settings(max_examples=200, deadline=None)
@given(low_rank_cases)
def test_rank_factorization_reproduces_a(case):
    seed, m, n, r, scale = case
    A = random_low_rank(seed, m, n, r, scale)
    C, F = linalg.rank_factorization(A)
    assert C.shape == (m, r) and F.shape == (r, n)
    np.testing.assert_allclose(C @ F, A, rtol=0, atol=1e-9 * np.abs(A).max())


# --- truncated_svd and low_rank_approx ----------------------------------------------------


def test_truncated_svd_shapes_orthonormality_and_order():
    A = np.random.default_rng(6).standard_normal((9, 7))
    U_k, S_k, Vt_k = linalg.truncated_svd(A, 4)
    assert U_k.shape == (9, 4) and S_k.shape == (4,) and Vt_k.shape == (4, 7)
    np.testing.assert_allclose(U_k.T @ U_k, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(Vt_k @ Vt_k.T, np.eye(4), atol=1e-12)
    assert np.all(np.diff(S_k) <= 0)
    np.testing.assert_allclose(S_k, np.linalg.svd(A, compute_uv=False)[:4])


def test_full_rank_truncation_reproduces_a():
    A = np.random.default_rng(7).standard_normal((5, 8))
    np.testing.assert_allclose(linalg.low_rank_approx(A, 5), A, atol=1e-12)


def test_low_rank_approx_of_a_low_rank_matrix_is_exact_at_its_rank():
    A = random_low_rank(8, 10, 12, 3)
    np.testing.assert_allclose(linalg.low_rank_approx(A, 3), A, atol=1e-10)
    assert linalg.matrix_rank(linalg.low_rank_approx(A, 2)) == 2


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 12),
    st.integers(1, 12),
    st.data(),
)
def test_eckart_young_error_is_root_of_dropped_squared_singular_values(seed, m, n, data):
    k = data.draw(st.integers(1, min(m, n)))
    A = np.random.default_rng(seed).standard_normal((m, n))
    singular_values = np.linalg.svd(A, compute_uv=False)
    error = np.linalg.norm(A - linalg.low_rank_approx(A, k))
    np.testing.assert_allclose(error, np.sqrt(np.sum(singular_values[k:] ** 2)), atol=1e-10)
    spectral_error = np.linalg.norm(A - linalg.low_rank_approx(A, k), ord=2)
    expected_spectral = singular_values[k] if k < min(m, n) else 0.0
    np.testing.assert_allclose(spectral_error, expected_spectral, atol=1e-10)


def test_truncated_svd_beats_other_rank_k_matrices():
    rng = np.random.default_rng(9)
    A = rng.standard_normal((8, 8))
    best = np.linalg.norm(A - linalg.low_rank_approx(A, 2))
    for _ in range(200):
        other = rng.standard_normal((8, 2)) @ rng.standard_normal((2, 8))
        # Also try the best fit of A within a random 2-D column space.
        Q, _ = np.linalg.qr(rng.standard_normal((8, 2)))
        assert best <= np.linalg.norm(A - other)
        assert best <= np.linalg.norm(A - Q @ (Q.T @ A)) + 1e-12


# --- parameter counts ---------------------------------------------------------------------


def test_factorized_param_count():
    assert linalg.factorized_param_count(3, 3, 1) == 6  # the lecture's 9 -> 6
    assert linalg.factorized_param_count(1024, 1024, 8) == 2 * 8 * 1024
    C, F = linalg.rank_factorization(RANK_2)
    assert C.size + F.size == linalg.factorized_param_count(3, 3, 2)


def test_svd_param_count_counts_sigma_as_a_diagonal():
    U_k, S_k, Vt_k = linalg.truncated_svd(np.random.default_rng(10).standard_normal((32, 16)), 5)
    assert U_k.size + S_k.size + Vt_k.size == linalg.svd_param_count(32, 16, 5)
    assert linalg.svd_param_count(1024, 1024, 9) == 2 * 1024 * 9 + 9


# --- bad input ----------------------------------------------------------------------------

MATRIX_FUNCTIONS = [
    ("rref", lambda A: linalg.rref(A)),
    ("matrix_rank svd", lambda A: linalg.matrix_rank(A)),
    ("matrix_rank rref", lambda A: linalg.matrix_rank(A, method="rref")),
    ("rank_factorization", lambda A: linalg.rank_factorization(A)),
    ("truncated_svd", lambda A: linalg.truncated_svd(A, 1)),
    ("low_rank_approx", lambda A: linalg.low_rank_approx(A, 1)),
]


@pytest.mark.parametrize("name, call", MATRIX_FUNCTIONS)
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.ones(3), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        (np.float64(1.0), "2-D"),
        (np.ones((0, 3)), "at least one row"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "finite"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "finite"),
        (torch.full((2, 2), float("nan")), "finite"),
        (torch.ones(4), "2-D"),
    ],
)
def test_matrix_functions_reject_bad_shapes_and_values(name, call, bad, message):
    with pytest.raises(ValueError, match=rf"A must .*{message}"):
        call(bad)


@pytest.mark.parametrize("name, call", MATRIX_FUNCTIONS)
@pytest.mark.parametrize(
    "bad", [np.ones((2, 2), dtype=complex), np.array([["a", "b"]]), torch.ones(2, 2) * 1j]
)
def test_matrix_functions_reject_non_real_input(name, call, bad):
    with pytest.raises(TypeError, match="A must"):
        call(bad)


@pytest.mark.parametrize("bad_tol", [-1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["svd", "rref"])
def test_bad_tolerance_is_rejected(bad_tol, method):
    with pytest.raises(ValueError, match=r"tol must be None or a finite number >= 0"):
        linalg.matrix_rank(RANK_2, tol=bad_tol, method=method)
    with pytest.raises(ValueError, match=r"tol must"):
        linalg.rref(RANK_2, tol=bad_tol)
    with pytest.raises(ValueError, match=r"tol must"):
        linalg.rank_factorization(RANK_2, tol=bad_tol)


def test_non_numeric_tolerance_and_unknown_method_are_rejected():
    with pytest.raises(TypeError, match="tol must be None or a real number"):
        linalg.rref(RANK_2, tol="1e-3")
    with pytest.raises(ValueError, match=r"method must be one of \('svd', 'rref'\); got 'qr'"):
        linalg.matrix_rank(RANK_2, method="qr")


@pytest.mark.parametrize("k", [0, -1, 4, 100])
def test_out_of_range_truncation_rank_is_rejected(k):
    for function in (linalg.truncated_svd, linalg.low_rank_approx):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3\]; got"):
            function(RANK_3, k)


@pytest.mark.parametrize("k", [1.0, 2.5, True, "2", None])
def test_non_integer_truncation_rank_is_rejected(k):
    with pytest.raises(TypeError, match=r"k must be an integer in \[1, 3\]"):
        linalg.truncated_svd(RANK_3, k)


def test_numpy_integer_rank_is_accepted():
    assert linalg.low_rank_approx(RANK_3, np.int64(2)).shape == (3, 3)


@pytest.mark.parametrize(
    "function, rank_name", [(linalg.factorized_param_count, "r"), (linalg.svd_param_count, "k")]
)
def test_param_counts_reject_bad_arguments(function, rank_name):
    with pytest.raises(ValueError, match=rf"{rank_name} must be an integer in \[1, 4\]; got 5"):
        function(4, 9, 5)
    with pytest.raises(ValueError, match=rf"{rank_name} must be an integer in \[1, 4\]; got 0"):
        function(9, 4, 0)
    with pytest.raises(ValueError, match=r"m must be a positive integer \(>= 1\); got 0"):
        function(0, 4, 1)
    with pytest.raises(ValueError, match=r"n must be a positive integer \(>= 1\); got -3"):
        function(4, -3, 1)
    with pytest.raises(TypeError, match="m must be a positive integer"):
        function(4.0, 4, 1)
    with pytest.raises(TypeError, match=rf"{rank_name} must be an integer"):
        function(4, 4, 1.5)


# --- the planted low-rank update experiment -----------------------------------------------


def test_planted_task_has_the_requested_shapes_and_update_rank():
    task = linalg.planted_update_task(d_out=10, d_in=14, update_rank=2, n_samples=30, seed=3)
    assert task.W_before.shape == (10, 14) and task.update.shape == (10, 14)
    assert task.X.shape == (30, 14) and task.Y.shape == (30, 10)
    assert linalg.matrix_rank(task.update) == 2
    assert linalg.matrix_rank(task.W_before) == 10
    again = linalg.planted_update_task(d_out=10, d_in=14, update_rank=2, n_samples=30, seed=3)
    np.testing.assert_array_equal(task.Y, again.Y)


def test_finetune_linear_reaches_the_least_squares_solution():
    task = linalg.planted_update_task(d_out=6, d_in=8, update_rank=2, n_samples=200, seed=1)
    W_after = linalg.finetune_linear(task.W_before, task.X, task.Y, learning_rate=0.3, steps=500)
    least_squares = np.linalg.lstsq(task.X, task.Y, rcond=None)[0].T
    np.testing.assert_allclose(W_after, least_squares, atol=1e-8)


def test_without_noise_the_update_has_exactly_the_planted_rank():
    task = linalg.planted_update_task(d_out=12, d_in=20, update_rank=3, noise=0.0, seed=2)
    for steps in (1, 5, 50):
        update = linalg.finetune_linear(task.W_before, task.X, task.Y, steps=steps) - task.W_before
        assert linalg.matrix_rank(update, tol=1e-10) == 3


def test_with_noise_truncating_the_update_to_the_planted_rank_removes_noise():
    task = linalg.planted_update_task(seed=4)
    update = linalg.finetune_linear(task.W_before, task.X, task.Y) - task.W_before
    singular_values = np.linalg.svd(update, compute_uv=False)
    assert singular_values[2] > 5 * singular_values[3]
    truncated = linalg.low_rank_approx(update, 3)
    assert np.linalg.norm(truncated - task.update) < 0.5 * np.linalg.norm(update - task.update)


def test_finetune_linear_with_zero_steps_returns_the_start():
    task = linalg.planted_update_task(d_out=3, d_in=4, update_rank=1, n_samples=5)
    W = linalg.finetune_linear(torch.from_numpy(task.W_before), task.X, task.Y, steps=0)
    np.testing.assert_array_equal(W, task.W_before)


def test_planted_task_and_finetune_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"update_rank must be an integer in \[1, 4\]; got 5"):
        linalg.planted_update_task(d_out=4, d_in=9, update_rank=5)
    with pytest.raises(ValueError, match="d_in must be a positive integer"):
        linalg.planted_update_task(d_in=0)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        linalg.planted_update_task(noise=-0.1)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        linalg.planted_update_task(seed=-1)
    task = linalg.planted_update_task(d_out=3, d_in=4, update_rank=1, n_samples=5)
    with pytest.raises(ValueError, match=r"shapes must be W_before \(d_out, d_in\)"):
        linalg.finetune_linear(task.W_before, task.X[:, :3], task.Y)
    with pytest.raises(ValueError, match=r"shapes must be"):
        linalg.finetune_linear(task.W_before, task.X, task.Y[:4])
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        linalg.finetune_linear(task.W_before, task.X, task.Y, learning_rate=0.0)
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        linalg.finetune_linear(task.W_before, task.X, task.Y, steps=2.5)
    with pytest.raises(ValueError, match="X must be a 2-D matrix"):
        linalg.finetune_linear(task.W_before, task.X[0], task.Y)
    with pytest.raises(ValueError, match="Y must have finite entries"):
        linalg.finetune_linear(task.W_before, task.X, np.full_like(task.Y, np.nan))
