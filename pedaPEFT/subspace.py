"""What a learned update looks like: singular directions, subspace overlap, amplification.

The LoRA paper (Hu et al., 2021, section 7) asks three questions of a learned update
``ΔW`` and answers each with one formula, computed here on any matrices:

* **Spectrum.** How much of ``‖ΔW‖_F² = Σ σ_i²`` do the top ``k`` singular directions hold
  (:func:`energy_share`)?
* **Subspace similarity.** With ``U_a`` and ``U_b`` the top singular vectors (orthonormal
  columns) of two matrices, ``φ(a, b, i, j) = ‖U_a[:, :i]ᵀ U_b[:, :j]‖_F² / min(i, j)``
  (:func:`subspace_similarity`): 1 when the smaller subspace lies inside the larger one,
  0 when they are orthogonal, ``max(i, j) / d`` on average for random subspaces of ``R^d``
  (:func:`random_subspace_similarity`).
* **Amplification.** With ``U``, ``V`` the top ``r`` left and right singular vectors of
  ``ΔW``, ``‖Uᵀ W V‖_F`` is how much of the pretrained ``W`` lies in the directions ``ΔW``
  changes, and ``‖ΔW‖_F / ‖Uᵀ W V‖_F`` (:func:`amplification_factor`) how strongly the
  update amplifies them.
"""

from __future__ import annotations

import torch


def _check_matrix(matrix: object, name: str) -> torch.Tensor:
    """``matrix`` as a float64 2-D tensor, or a ValueError naming ``name``."""
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.dim() != 2 or 0 in matrix.shape:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(matrix.shape)}")
    matrix = matrix.detach().to(torch.float64)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name} must hold finite values only")
    return matrix


def _check_count(value: object, name: str, high: int) -> int:
    """``value`` as an int in [1, high], or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an integer in [1, {high}], got {value!r}")
    return value


def singular_directions(matrix: torch.Tensor, side: str = "right") -> torch.Tensor:
    """The singular vectors of ``matrix = U Σ Vᵀ`` as orthonormal columns, largest σ first:
    ``V`` (``side="right"``, the input space, what the LoRA paper uses for ``A``) or ``U``
    (``side="left"``, the output space). Float64.

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    matrix = _check_matrix(matrix, "matrix")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return Vh.T if side == "right" else U


def top_singular_vectors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U[:, :r], V[:, :r])``: the top ``r`` left and right singular vectors of
    ``matrix = U Σ Vᵀ`` as orthonormal columns, from one SVD. Float64."""
    matrix = _check_matrix(matrix, "matrix")
    _check_count(r, "r", min(matrix.shape))
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :r], Vh[:r].T


def energy_share(matrix: torch.Tensor, k: int) -> float:
    """``Σ_{i≤k} σ_i² / Σ_i σ_i²``: the share of ``‖matrix‖_F²`` in the top ``k`` singular
    directions (1 for ``k ≥ rank``).

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    matrix = _check_matrix(matrix, "matrix")
    sigma = torch.linalg.svdvals(matrix)
    _check_count(k, "k", sigma.numel())
    total = float(sigma.square().sum())
    if total == 0.0:
        raise ValueError("matrix must not be all zeros (its energy would be 0 / 0)")
    return float(sigma[:k].square().sum()) / total


def subspace_similarity(U_a: torch.Tensor, U_b: torch.Tensor, i: int, j: int) -> float:
    """The LoRA paper's normalized subspace similarity (section 7.2),

        φ(a, b, i, j) = ‖U_a[:, :i]ᵀ U_b[:, :j]‖_F² / min(i, j)  ∈ [0, 1],

    for ``U_a``, ``U_b`` with orthonormal columns (e.g. :func:`singular_directions`). It is the
    mean squared cosine of the principal angles between the two subspaces: 1 when the
    smaller one lies inside the larger, 0 when they are orthogonal.

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    U_a, U_b = _check_matrix(U_a, "U_a"), _check_matrix(U_b, "U_b")
    if U_a.shape[0] != U_b.shape[0]:
        raise ValueError(
            f"U_a and U_b must live in the same space (same number of rows), got "
            f"{U_a.shape[0]} and {U_b.shape[0]}"
        )
    _check_count(i, "i", U_a.shape[1])
    _check_count(j, "j", U_b.shape[1])
    overlap = U_a[:, :i].T @ U_b[:, :j]
    return float(overlap.square().sum()) / min(i, j)


def subspace_similarity_grid(
    U_a: torch.Tensor, U_b: torch.Tensor, max_i: int, max_j: int
) -> torch.Tensor:
    """``φ(a, b, i, j)`` for ``i = 1..max_i`` (rows) and ``j = 1..max_j`` (columns), float64.

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    return torch.tensor(
        [[subspace_similarity(U_a, U_b, i, j) for j in range(1, max_j + 1)]
         for i in range(1, max_i + 1)],
        dtype=torch.float64,
    )


def random_subspace_similarity(i: int, j: int, d: int) -> float:
    """The expected ``φ`` of a uniformly random ``i``-dimensional and a fixed
    ``j``-dimensional subspace of ``R^d``: ``E‖PᵀQ‖_F² = i j / d`` (because ``E[P Pᵀ] =
    (i/d) I``), so ``E φ = i j / (d min(i, j)) = max(i, j) / d``.

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    _check_count(d, "d", 2**62)
    _check_count(i, "i", d)
    _check_count(j, "j", d)
    return max(i, j) / d


def projected_norm(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """``‖Uᵀ W V‖_F``: the size of ``W`` restricted to the column spaces of ``U`` (outputs)
    and ``V`` (inputs), both with orthonormal columns.

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    weight = _check_matrix(weight, "weight")
    U, V = _check_matrix(U, "U"), _check_matrix(V, "V")
    if U.shape[0] != weight.shape[0] or V.shape[0] != weight.shape[1]:
        raise ValueError(
            f"U must have {weight.shape[0]} rows and V {weight.shape[1]} (the weight's shape "
            f"{tuple(weight.shape)}), got {U.shape[0]} and {V.shape[0]}"
        )
    return float((U.T @ weight @ V).norm())


def amplification_factor(delta_weight: torch.Tensor, weight: torch.Tensor, r: int) -> float:
    """The LoRA paper's amplification factor (section 7.3),

        ‖ΔW‖_F / ‖Uᵀ W V‖_F,

    where ``U`` and ``V`` hold the top ``r`` left and right singular vectors of ``ΔW``: how
    much larger the update is than what the pretrained ``W`` already had in the directions
    the update changes.

    Introduced in lesson 5, section "9. What LoRA learns".
    """
    delta_weight = _check_matrix(delta_weight, "delta_weight")
    weight = _check_matrix(weight, "weight")
    if delta_weight.shape != weight.shape:
        raise ValueError(
            f"delta_weight and weight must have the same shape, got "
            f"{tuple(delta_weight.shape)} and {tuple(weight.shape)}"
        )
    _check_count(r, "r", min(weight.shape))
    projected = projected_norm(weight, *top_singular_vectors(delta_weight, r))
    if projected == 0.0:
        raise ValueError("weight has no component in the directions of delta_weight")
    return float(delta_weight.norm()) / projected
