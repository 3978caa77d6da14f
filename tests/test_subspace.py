"""Subspace similarity, energy share and amplification (pedaPEFT.subspace, lesson 5 §9)."""

import pytest
import torch

from pedaPEFT import subspace


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    """k orthonormal columns in R^d, uniformly random (QR of a Gaussian matrix)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_identical_subspaces_give_one_whatever_the_basis():
    U = orthonormal(32, 6, seed=0)
    rotation = orthonormal(6, 6, seed=1)  # another basis of the same subspace
    for i, j in ((1, 1), (3, 6), (6, 6)):
        assert subspace.subspace_similarity(U, U, i, j) == pytest.approx(1.0, abs=1e-12)
    assert subspace.subspace_similarity(U, U @ rotation, 6, 6) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_subspaces_give_zero():
    Q = orthonormal(20, 10, seed=2)
    assert subspace.subspace_similarity(Q[:, :4], Q[:, 4:], 4, 6) == pytest.approx(0.0, abs=1e-12)


def test_nested_subspace_gives_one_and_partial_overlap_its_share():
    Q = orthonormal(16, 8, seed=3)
    assert subspace.subspace_similarity(Q[:, :2], Q, 2, 8) == pytest.approx(1.0)
    # span(e1, e2) against span(e2, e3): one shared direction of two -> 1/2
    shifted = Q[:, 1:3]
    assert subspace.subspace_similarity(Q[:, :2], shifted, 2, 2) == pytest.approx(0.5)


def test_random_subspaces_match_the_expectation():
    d, i, j, n = 48, 3, 10, 400
    fixed = orthonormal(d, j, seed=4)
    values = [subspace.subspace_similarity(orthonormal(d, i, seed=100 + s), fixed, i, j)
              for s in range(n)]
    mean = sum(values) / n
    expected = subspace.random_subspace_similarity(i, j, d)
    assert expected == pytest.approx(j / d)
    assert mean == pytest.approx(expected, rel=0.08)


def test_grid_entries_are_the_single_values():
    A, B = orthonormal(12, 4, seed=5), orthonormal(12, 5, seed=6)
    grid = subspace.subspace_similarity_grid(A, B, 4, 5)
    assert grid.shape == (4, 5)
    assert grid[2, 3] == pytest.approx(subspace.subspace_similarity(A, B, 3, 4))
    assert bool(((grid >= 0) & (grid <= 1 + 1e-12)).all())


def test_singular_directions_and_energy_share():
    U, V = orthonormal(10, 3, seed=7), orthonormal(8, 3, seed=8)
    M = U @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ V.T
    right = subspace.singular_directions(M, "right")
    assert subspace.subspace_similarity(right[:, :3], V, 3, 3) == pytest.approx(1.0)
    assert abs(float(right[:, 0] @ V[:, 0])) == pytest.approx(1.0)
    left = subspace.singular_directions(M, "left")
    assert abs(float(left[:, 0] @ U[:, 0])) == pytest.approx(1.0)
    assert subspace.energy_share(M, 1) == pytest.approx(9 / 14)
    assert subspace.energy_share(M, 3) == pytest.approx(1.0)


def test_amplification_of_a_scaled_copy_of_the_top_directions():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(16, 12, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    # ΔW = c * (W's own top-2 part): U^T W V is exactly that part, so the factor is c.
    assert subspace.amplification_factor(5.0 * top, W, 2) == pytest.approx(5.0)
    assert subspace.projected_norm(W, U[:, :2], Vh[:2].T) == pytest.approx(float(S[:2].norm()))
    # The same size of update in W's weakest directions is amplified far more.
    weak = U[:, -2:] @ torch.diag(S[:2]) @ Vh[-2:]
    assert subspace.amplification_factor(5.0 * weak, W, 2) > 5.0 * float(S[0] / S[-1]) / 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: subspace.subspace_similarity(torch.eye(4), torch.eye(5), 1, 1), "same space"),
        (lambda: subspace.subspace_similarity(torch.eye(4), torch.eye(4), 0, 1), "i must be"),
        (lambda: subspace.subspace_similarity(torch.eye(4), torch.eye(4)[:, :2], 1, 3),
         "j must be"),
        (lambda: subspace.singular_directions(torch.eye(3), "up"), "side must be"),
        (lambda: subspace.energy_share(torch.zeros(3, 3), 1), "all zeros"),
        (lambda: subspace.energy_share(torch.ones(3), 1), "2-D"),
        (lambda: subspace.amplification_factor(torch.eye(3), torch.eye(4), 1), "same shape"),
        (lambda: subspace.amplification_factor(torch.eye(3) * float("nan"), torch.eye(3), 1),
         "finite"),
        (lambda: subspace.random_subspace_similarity(5, 1, 4), "i must be"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
