# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 1 — Matrix rank
#
# LoRA fine-tunes a weight matrix $W_0 \in \mathbb{R}^{d \times k}$ by learning a change
# $\Delta W = BA$ with $B \in \mathbb{R}^{d \times r}$, $A \in \mathbb{R}^{r \times k}$ and a
# small $r$. Two facts make this worth doing, and both are about **rank**:
#
# 1. a matrix of rank $r$ *is* such a product, so it can be stored with $r(d + k)$ numbers
#    instead of $dk$;
# 2. the change that fine-tuning makes to a weight tends to have low rank (lesson 2).
#
# This lesson makes the first fact precise. We compute ranks two ways — by row reduction, as
# by hand, and by the singular value decomposition, as numerical software does — build the
# factorization, count what it saves, and see why "is this number zero?" needs a tolerance in
# floating point. Along the way every number on the lecture's rank slides is recomputed; two of
# its statements turn out wrong.
#
# **You will learn:** the definition of rank; Gauss–Jordan elimination with partial pivoting;
# rank factorization $A = CF$; the count $n^2 \to 2rn$ and when it actually saves; why the SVD
# rank and the row-reduction rank can disagree near the tolerance.

# %%
# Setup, the same in every lesson: install pedaPEFT if this Python lacks it (Colab, JupyterHub),
# check that it is a version this lesson was written for, and seed every random generator.
# To install from elsewhere than the course repository, set PEDAPEFT_INSTALL_SOURCE to a
# wheel file, a folder of wheels or any pip requirement (a school's mirror, a pinned version).
import importlib.util
import os
import subprocess
import sys

LESSON_VERSION = "0.1.0"
if importlib.util.find_spec("pedaPEFT") is None:
    install_source = os.environ.get(
        "PEDAPEFT_INSTALL_SOURCE", f"git+https://github.com/pedapeft/pedaPEFT@v{LESSON_VERSION}"
    )
    install_args = [install_source]
    if os.path.isdir(install_source):
        install_args = ["--find-links", install_source, f"pedapeft=={LESSON_VERSION}"]
    print(f"installing pedaPEFT {LESSON_VERSION} from {install_source} ...", flush=True)
    pip_run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *install_args],
                             capture_output=True, text=True)
    if pip_run.returncode != 0:
        raise RuntimeError(f"pip could not install pedaPEFT:\n{pip_run.stderr}")
    importlib.invalidate_caches()
    if importlib.util.find_spec("pedaPEFT") is None:
        raise RuntimeError("pedaPEFT was installed: restart the kernel and run this cell again")

import pedaPEFT
from pedaPEFT.course import check_version, seed_everything

check_version(LESSON_VERSION)
seed_everything(0)
print(f"pedaPEFT {pedaPEFT.__version__}")

# %%
import matplotlib.pyplot as plt
import numpy as np

from pedaPEFT import exercises, figures, linalg

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. What rank is
#
# The **rank** of $A \in \mathbb{R}^{d \times k}$ is the **largest** number of linearly
# independent columns of $A$ — the dimension of the space its columns span. A theorem of
# linear algebra says the same number counts independent *rows* (row rank = column rank), so
#
# $$\operatorname{rank}(A) \le \min(d, k).$$
#
# $A$ is **full rank** when equality holds and **low rank** when $\operatorname{rank}(A) \ll
# \min(d, k)$.
#
# > **Erratum.** The lecture defines rank as "the *minimum* number of linearly independent
# > columns or rows". The minimum is not a useful notion (any single nonzero column is an
# > independent set of size 1); rank is the **maximum**.
#
# ## 2. The lecture's three matrices
#
# The lecture states these ranks:
#
# $$\operatorname{rank}\begin{bmatrix} 2 & 10 & 1 \\ 4 & 20 & 2 \\ 6 & 30 & 3 \end{bmatrix} = 1,
# \quad
# \operatorname{rank}\begin{bmatrix} 2 & 10 & 1 \\ 7 & 20 & 2 \\ 6 & 30 & 3 \end{bmatrix} = 2,
# \quad
# \operatorname{rank}\begin{bmatrix} 2 & 3 & 1 \\ 7 & 5 & 2 \\ 6 & 1 & 3 \end{bmatrix} = 3.$$
#
# Before any algorithm, look at the rows. In $M_1$ rows 2 and 3 are 2× and 3× row 1. In $M_2$
# row 3 is 3× row 1, but row 2 is not a multiple of row 1. For $M_3$ a nonzero determinant
# proves full rank.

# %%
M1 = np.array([[2, 10, 1], [4, 20, 2], [6, 30, 3]])
M2 = np.array([[2, 10, 1], [7, 20, 2], [6, 30, 3]])
M3 = np.array([[2, 3, 1], [7, 5, 2], [6, 1, 3]])

print("M1: row 2 == 2 * row 1:", np.array_equal(M1[1], 2 * M1[0]))
print("M1: row 3 == 3 * row 1:", np.array_equal(M1[2], 3 * M1[0]))
print("M2: row 3 == 3 * row 1:", np.array_equal(M2[2], 3 * M2[0]))
print("M2: row 2 / row 1 =", M2[1] / M2[0], "(not constant, so not a multiple)")
det_M3 = 2 * (5 * 3 - 2 * 1) - 3 * (7 * 3 - 2 * 6) + 1 * (7 * 1 - 5 * 6)  # cofactors, row 1
print("det M3 by cofactors =", det_M3, "| by NumPy =", round(np.linalg.det(M3), 9))

# %% [markdown]
# ## 3. Rank by row reduction
#
# Row operations — swapping rows, scaling a row by a nonzero number, adding a multiple of one
# row to another — do not change which combinations of *columns* vanish, so they do not change
# the rank. **Gauss–Jordan elimination** applies them until the matrix is in *reduced row
# echelon form* (RREF): each nonzero row starts with a 1 (a **pivot**), a pivot's column is
# zero everywhere else, and zero rows sit at the bottom. The rank is the number of pivots.
#
# In floating point we also use **partial pivoting**: in each column we swap up the entry of
# largest magnitude, so that every multiplier we subtract with has $|l| \le 1$ and round-off is
# not magnified by large multipliers. Here are the steps on $M_2$, written out:

# %%
R = M2.astype(float)
R[[0, 1]] = R[[1, 0]]  # column 0: the largest entry, 7, is in row 1; swap it up
R[0] /= R[0, 0]  # scale the pivot to 1
R[1] -= R[1, 0] * R[0]  # clear column 0 below the pivot
R[2] -= R[2, 0] * R[0]
print("after column 0:\n", R)
R[[1, 2]] = R[[2, 1]]  # column 1: |90/7| > |30/7|, swap row 2 up
R[1] /= R[1, 1]
R[0] -= R[0, 1] * R[1]  # clear column 1 above ...
R[2] -= R[2, 1] * R[1]  # ... and below the pivot
print("after column 1:\n", R)
print("column 2: the only candidate left is", f"{abs(R[2, 2]):.4f}", "-> no pivot")

# %% [markdown]
# Two pivots, so $\operatorname{rank}(M_2) = 2$. `linalg.rref` does exactly these steps for any
# matrix (and decides "is this zero?" with a tolerance, section 7). Its result must equal ours:

# %%
R_package, pivots = linalg.rref(M2)
print("linalg.rref(M2):\n", R_package, "\npivot columns:", pivots)
print("same as the steps above:", np.allclose(R_package, R, atol=1e-12))

# %% [markdown]
# (The `-0.` is not a typo. That entry should be $2/7 - (20/7)(0.1) = 0$, but in floating
# point it comes out as a tiny negative remainder, about $-6 \times 10^{-17}$, shown with four
# decimals: a first sign that "is it zero?" needs a tolerance, section 7.)
#
# The RREF also *explains* the dependency. Column $j$ of the RREF holds the coefficients that
# write column $j$ of the original matrix as a combination of the pivot columns (row operations
# keep such relations). Column 2 of $R$ is $(0, 0.1, 0)^\top$, so column 2 of $M_2$ is
# $0.1 \times$ column 1:

# %%
print("M2[:, 2] == 0.1 * M2[:, 1]:", np.allclose(M2[:, 2], 0.1 * M2[:, 1]))
for name, M in (("M1", M1), ("M2", M2), ("M3", M3)):
    _, pivots = linalg.rref(M)
    print(f"{name}: pivot columns {pivots} -> rank {len(pivots)}")

# %% [markdown]
# ## 4. Rank by the singular value decomposition
#
# Every real matrix factors as $A = U \Sigma V^\top$ with orthonormal columns in $U$ and $V$
# and a diagonal $\Sigma$ of **singular values** $\sigma_1 \ge \sigma_2 \ge \dots \ge 0$
# (lesson 2 studies it). Orthogonal factors do not change rank, so the rank is the number of
# nonzero singular values. This is how `numpy.linalg.matrix_rank` and
# `linalg.matrix_rank(A, method="svd")` (the default) count.

# %%
print("matrix  lecture  by rref  by svd  singular values")
for name, M, claimed in (("M1", M1, 1), ("M2", M2, 2), ("M3", M3, 3)):
    by_rref = linalg.matrix_rank(M, method="rref")
    by_svd = linalg.matrix_rank(M, method="svd")
    sigma = np.linalg.svd(M, compute_uv=False)
    print(f"{name:>6}  {claimed:>7}  {by_rref:>7}  {by_svd:>6}  {np.round(sigma, 4)}")
    assert by_rref == by_svd == claimed

# %% [markdown]
# All three ranks on the slides are right. The zero singular values print as `0.` only after
# rounding: in floating point they come out as tiny numbers like $10^{-16}$, which is why
# every rank computation needs a tolerance (section 7).
#
# ## 5. Rank factorization: the rank-1 case and the lecture's slip
#
# If $\operatorname{rank}(A) = 1$, every row is a multiple $c_i$ of one row $f$, so
# $A = c f$ — a column times a row. The lecture writes
#
# $$\begin{bmatrix} 2 & 10 & 1 \\ 4 & 20 & 2 \\ 6 & 30 & 3 \end{bmatrix}
# = \begin{bmatrix} 1 \\ 2 \\ 3 \end{bmatrix} \times [\,2 \;\; 20 \;\; 30\,].$$
#
# Multiply it out:

# %%
lecture_column = np.array([[1], [2], [3]])
lecture_row = np.array([[2, 20, 30]])
print("lecture's product:\n", lecture_column @ lecture_row)
print("equals M1:", np.array_equal(lecture_column @ lecture_row, M1))
print("entries that differ:", int((lecture_column @ lecture_row != M1).sum()), "of 9")

# %% [markdown]
# > **Erratum.** $[1, 2, 3]^\top \times [2, 20, 30]$ is
# > $\begin{bmatrix} 2 & 20 & 30 \\ 4 & 40 & 60 \\ 6 & 60 & 90\end{bmatrix} \ne M_1$. With
# > $c = [1, 2, 3]^\top$ the row must be $f = [2, 10, 1]$, the first row of $M_1$ (because
# > $c_1 = 1$).

# %%
correct_row = M1[:1]  # the first row, as a 1×3 matrix
print("[1, 2, 3]^T x [2, 10, 1] equals M1:", np.array_equal(lecture_column @ correct_row, M1))

# %% [markdown]
# The factorization is not unique: $c f = (s\,c)(f / s)$ for any $s \ne 0$.
# `linalg.rank_factorization` makes a canonical choice for any rank $r$: $C$ = the $r$ pivot
# columns of $A$, $F$ = the $r$ nonzero rows of the RREF. Then $A = CF$ because column $j$
# of $F$ holds the coefficients of column $j$ of $A$ in terms of the pivot columns
# (section 3).

# %%
C, F = linalg.rank_factorization(M1)
print("C =\n", C, "\nF =", F)
print("C @ F equals M1:", np.allclose(C @ F, M1))
print("same line as the lecture's c, scaled by", (C / lecture_column).ravel())

# %% [markdown]
# **The count.** The dense $3 \times 3$ matrix stores 9 numbers; $C$ and $F$ store
# $3 \times 1 + 1 \times 3 = 6$ (the lecture's "9 to 6" is right). In general a rank-$r$
# $m \times n$ matrix needs $r(m + n)$ numbers, `linalg.factorized_param_count`:

# %%
print(
    "dense M1:",
    M1.size,
    "| factorized:",
    C.size + F.size,
    "| r(m + n):",
    linalg.factorized_param_count(3, 3, 1),
)
C2, F2 = linalg.rank_factorization(M2)
print("M2 = C2 @ F2:", np.allclose(C2 @ F2, M2), "| shapes", C2.shape, F2.shape)
print("dense M2:", M2.size, "| factorized:", C2.size + F2.size)

# %% [markdown]
# For $M_2$ the factorization stores **12** numbers, *more* than the 9 of the dense matrix.
# Factorizing saves only when $r(m + n) < mn$, that is
#
# $$r < \frac{mn}{m + n} \qquad (= n/2 \text{ for a square } n \times n \text{ matrix}).$$
#
# A $3 \times 3$ matrix is too small for rank 2 to pay. The weight matrices of language
# models are large, and there the saving is dramatic.
#
# ## 6. From $n^2$ to $2rn$
#
# For an $n \times n$ matrix of rank $r$ the count goes from $n^2$ to $2rn$ (the lecture's
# "$n^2 \Rightarrow 2n$" for $r = 1$ and "$n^2 \Rightarrow 2rn$" are both right), a fraction
# $2r/n$ of the dense storage. For a $1024 \times 1024$ weight:

# %%
n = 1024
print(f"{'r':>4} {'2rn':>9} {'% of n^2':>9}")
for r in (1, 2, 4, 8, 16, 64, 256, 512):
    stored = linalg.factorized_param_count(n, n, r)
    print(f"{r:>4} {stored:>9} {100 * stored / n**2:>8.2f}%")

# %% [markdown]
# The same holds for any matrix that *is* low rank, however it was made. Here is a
# $256 \times 512$ matrix of rank 8 built as a product of random factors; both rank methods
# find 8, and the rank factorization reproduces it from 6 144 numbers instead of 131 072.

# %%
rng = np.random.default_rng(0)
big = rng.standard_normal((256, 8)) @ rng.standard_normal((8, 512))
big_C, big_F = linalg.rank_factorization(big)
print("rank by svd:", linalg.matrix_rank(big))
print("rank by rref:", linalg.matrix_rank(big, method="rref"))
print(
    "C, F shapes:",
    big_C.shape,
    big_F.shape,
    "| numbers:",
    big_C.size + big_F.size,
    "instead of",
    big.size,
)
print(
    "max |C F - A| / max |A| < 1e-12:",
    bool(np.abs(big_C @ big_F - big).max() / np.abs(big).max() < 1e-12),
)

# %%
fig = figures.rank_parameter_counts()
plt.show()

# %% [markdown]
# Left: the dense count grows like $n^2$, a rank-$r$ factorization like $n$. Right: the
# factorized fraction $2r/n$ falls below 100% once $n > 2r$.
#
# ## 7. Zero is never exactly zero: tolerances
#
# Scale $M_1$ by $0.1$. The result is still rank 1 in exact arithmetic, but $0.1$ has no exact
# binary representation, so the scaled entries carry round-off and elimination leaves a
# remainder of order $10^{-16}$ where a zero should be. Asked whether that is *exactly* zero
# (`tol=0`), row reduction finds a spurious second pivot:

# %%
M1_scaled = 0.1 * M1
print("rref, tol=0:      pivots", linalg.rref(M1_scaled, tol=0.0)[1])
print("rref, default tol: pivots", linalg.rref(M1_scaled)[1])
print("svd rank, default tol:", linalg.matrix_rank(M1_scaled))

# %% [markdown]
# Data in float64 are known only to a relative precision
# $\varepsilon = 2^{-52} \approx 2.2 \times 10^{-16}$ (`np.finfo(np.float64).eps`; for
# float32 input the package uses float32's $\varepsilon \approx 1.2 \times 10^{-7}$). A number
# is treated as zero when it is below a tolerance of the form $\max(m, n)\,\varepsilon\,\|A\|$:
#
# * **SVD:** $\sigma_i$ counts when $\sigma_i > \max(m, n)\,\varepsilon\,\sigma_1$ (NumPy's
#   default). $\sigma_1 = \|A\|_2$ makes the test scale-free; the factor $\max(m, n)$ allows
#   for round-off accumulated across a row or column.
# * **Row reduction:** a pivot in column $j$ counts when it exceeds
#   $\max(m, n)\,\varepsilon\,\|A\|_\infty\,(1 + \sum_i |R_{ij}|)$, where $\|A\|_\infty$ is
#   the largest absolute row sum and $R_{ij}$ are the current coefficients of column $j$ in
#   terms of the pivot columns found so far. Round-off in the pivot columns reaches the
#   remainder multiplied by those coefficients, so large coefficients need a larger margin.
#
# Without the coefficient factor — the plain $\max(m, n)\,\varepsilon\,\|A\|_\infty$, MATLAB's
# `rref` default — a few random low-rank matrices get a spurious pivot. We test 1000 exactly
# low-rank products (entries are multiples of $1/64$, so the products are computed without
# any round-off and every matrix has exactly the rank we asked for):

# %%
eps = np.finfo(np.float64).eps
wrong = {"fixed threshold": 0, "linalg default": 0, "svd default": 0}
for seed in range(1000):
    rng = np.random.default_rng(seed)
    m, n = (int(v) for v in rng.integers(2, 13, size=2))
    r = int(rng.integers(1, min(m, n)))
    X = np.round(64 * rng.standard_normal((m, r))) / 64
    Y = np.round(64 * rng.standard_normal((r, n))) / 64
    A = X @ Y
    fixed = max(m, n) * eps * np.abs(A).sum(axis=1).max()
    wrong["fixed threshold"] += len(linalg.rref(A, tol=fixed)[1]) != r
    wrong["linalg default"] += linalg.matrix_rank(A, method="rref") != r
    wrong["svd default"] += linalg.matrix_rank(A, method="svd") != r
for rule, count in wrong.items():
    print(f"{rule:>16}: {count} of 1000 ranks wrong")

# %% [markdown]
# ### Why the SVD rank and the row-reduction rank can differ near the tolerance
#
# The two methods compare *different numbers* with the tolerance: singular values versus
# pivots. Take
#
# $$A(\delta) = \begin{bmatrix} 1 & 1 \\ 1 & 1 + \delta \end{bmatrix}.$$
#
# Elimination subtracts row 1 from row 2 and leaves the pivot $\delta$. The singular values
# satisfy $\sigma_1 \sigma_2 = |\det A| = \delta$ with $\sigma_1 \approx 2$, so
# $\sigma_2 \approx \delta / 2$. Suppose the entries are only known to three decimals, so we
# use the tolerance $10^{-3}$. For $10^{-3} < \delta < 2 \times 10^{-3}$ the pivot is above
# the tolerance and $\sigma_2$ below it:

# %%
tol = 1e-3
for delta in (0.5e-3, 1.5e-3, 3e-3):
    A = np.array([[1.0, 1.0], [1.0, 1.0 + delta]])
    sigma_2 = np.linalg.svd(A, compute_uv=False)[1]
    print(
        f"delta={delta:.4f}: pivot {A[1, 1] - A[0, 1]:.5f}, sigma_2 {sigma_2:.5f} | "
        f"rank by rref {linalg.matrix_rank(A, tol, method='rref')}, "
        f"by svd {linalg.matrix_rank(A, tol, method='svd')}"
    )

# %%
fig = figures.rank_near_tolerance()
plt.show()

# %% [markdown]
# Which answer is right? The SVD's. By the Eckart–Young theorem (lesson 2), $\sigma_2$ is
# exactly the distance, in the spectral norm, from $A$ to the nearest rank-1 matrix. At
# $\delta = 1.5 \times 10^{-3}$, $A$ is within $7.5 \times 10^{-4}$ of a rank-1 matrix —
# indistinguishable from one at our precision. A pivot is not such a distance: here it
# overstates it by a factor 2, and it can be far worse. Kahan's matrix is upper triangular
# with diagonal $1, s, s^2, \dots, s^{n-1}$ and $-c\,s^{i}$ above the diagonal of row $i$
# ($s^2 + c^2 = 1$). Being triangular, its pivots are its diagonal entries, none of them small;
# yet it is almost singular:

# %%
n, c = 90, 0.285
s = np.sqrt(1 - c**2)
kahan = np.diag(s ** np.arange(n)) @ (np.eye(n) - c * np.triu(np.ones((n, n)), 1))
print(f"smallest pivot (diagonal entry): {np.abs(np.diag(kahan)).min():.4f}")
print(f"smallest singular value:         {np.linalg.svd(kahan, compute_uv=False)[-1]:.1e}")
for method in ("rref", "svd"):
    print(f"rank with tol=1e-10 by {method}: {linalg.matrix_rank(kahan, 1e-10, method=method)}")

# %% [markdown]
# Every pivot is above 0.02, so row reduction reports full rank 90 at any tolerance below
# that; but the matrix is within $10^{-11}$ of a singular one, which only the SVD sees. This is
# why numerical libraries count rank with the SVD, and why row reduction remains the way to
# *understand* rank and to build the factorization by hand.
#
# ## Summary
#
# | idea | formula | in pedaPEFT |
# |---|---|---|
# | rank | max number of independent columns | `linalg.matrix_rank(A, method=...)` |
# | RREF | Gauss–Jordan, partial pivoting | `linalg.rref(A)` |
# | factorization | $A = CF$, $C$: $m{\times}r$, $F$: $r{\times}n$ | `linalg.rank_factorization` |
# | storage | $mn \to r(m + n)$, saves iff $r < \frac{mn}{m+n}$ | `linalg.factorized_param_count` |
#
# Lecture numbers checked here: the three ranks (1, 2, 3: right), the rank-1 factorization
# (wrong row factor: $[2, 10, 1]$, not $[2, 20, 30]$), $9 \to 6$ (right), $n^2 \to 2n$ and
# $n^2 \to 2rn$ (right), the definition of rank (maximum, not minimum).
#
# Next, lesson 2: the SVD in depth, the best low-rank approximation of a matrix that is *not*
# low rank, and why fine-tuning updates tend to be low rank.

# %% [markdown]
# ## Exercises
#
# Each check cell calls `exercises.check(...)`: it tests your answer on its own matrices and
# says what is wrong, never what the answer is. `python -m pedaPEFT progress` shows how far
# you are.
#
# **Exercise 1.** Write `rref(A, tol=1e-9)`: the reduced row echelon form of `A` and the
# indices of its pivot columns, by Gauss–Jordan elimination. Column by column: find the
# entry of largest magnitude at or below the current row; if it is not above `tol`, the
# column has no pivot; otherwise swap it up, divide its row by it, and clear the column in
# every other row. Return `(R, pivots)`; leave `A` itself unchanged.

# %%
### BEGIN SOLUTION
def rref(A, tol=1e-9):
    """(R, pivots): the reduced row echelon form of A and its pivot columns."""
    R = np.array(A, dtype=float)
    m, n = R.shape
    pivots, row = [], 0
    for col in range(n):
        if row == m:
            break
        best = row + int(np.argmax(np.abs(R[row:, col])))
        if abs(R[best, col]) <= tol:
            R[row:, col] = 0.0
            continue
        R[[row, best]] = R[[best, row]]
        R[row] = R[row] / R[row, col]
        for other in range(m):
            if other != row:
                R[other] = R[other] - R[other, col] * R[row]
        pivots.append(col)
        row += 1
    return R, tuple(pivots)
### END SOLUTION


# %%
exercises.check("01-rref", rref)

# %% [markdown]
# **Exercise 2.** Write `rank_factorization(A)` returning `C` ($m \times r$) and `F`
# ($r \times n$) with `C @ F == A`, $r = \operatorname{rank}(A)$: `C` holds the pivot columns
# of `A`, `F` the nonzero rows of its reduced row echelon form (section 4). Use your `rref`
# or `linalg.rref`.

# %%
### BEGIN SOLUTION
def rank_factorization(A):
    """(C, F) with C: A's pivot columns (m x r), F: the nonzero rows of rref(A) (r x n)."""
    R, pivots = linalg.rref(A)
    return np.asarray(A, dtype=float)[:, list(pivots)], R[: len(pivots)]
### END SOLUTION


# %%
exercises.check("01-rank-factorization", rank_factorization)

# %% [markdown]
# **Exercise 3.** GPT-2's MLP has weight matrices of shape $768 \times 3072$. What is the
# largest rank `break_even_rank` for which a rank-$r$ factorization stores *fewer* numbers
# than the dense matrix?

# %%
### BEGIN SOLUTION
break_even_rank = max(r for r in range(1, 769) if r * (768 + 3072) < 768 * 3072)
### END SOLUTION

# %%
exercises.check("01-break-even-rank", break_even_rank)
