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
# # Lesson 2 — SVD and low-rank approximation
#
# Lesson 1 showed that a matrix of rank $r$ factors *exactly* into an $m \times r$ and an
# $r \times n$ matrix. Real matrices — a photograph, the weights of a trained network — are
# almost never exactly low rank. But many are *nearly* low rank, and the singular value
# decomposition (SVD) tells us how nearly: it gives the best rank-$k$ approximation of any
# matrix and its exact error (the Eckart–Young theorem).
#
# That is the idea behind LoRA. Fine-tuning changes a weight $W_0$ into $W_0 + \Delta W$; if
# $\Delta W$ is nearly low rank, we lose little by learning it directly in factored form,
# $\Delta W = BA$. The last section of this lesson fine-tunes a layer and looks at the
# singular values of its update.
#
# **You will learn:** the SVD as a sum of rank-one layers; truncation; the Eckart–Young error
# $\|A - A_k\|_F = \sqrt{\sum_{i>k} \sigma_i^2}$, checked numerically; what a photograph looks
# like at rank 5, 20, 50 and 100; honest parameter counts for a truncated SVD (the lecture's
# $2^{20}$ example recomputed); why a fine-tuning update can have low intrinsic rank.

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
# ## 1. The singular value decomposition
#
# Every real $m \times n$ matrix $A$ factors as
#
# $$A = U \Sigma V^\top = \sum_{i=1}^{p} \sigma_i\, u_i v_i^\top, \qquad p = \min(m, n),$$
#
# where $U$ ($m \times p$) and $V$ ($n \times p$) have orthonormal columns $u_i$, $v_i$, and
# $\Sigma = \operatorname{diag}(\sigma_1, \dots, \sigma_p)$ with
# $\sigma_1 \ge \sigma_2 \ge \dots \ge \sigma_p \ge 0$. The second form reads the SVD as a sum
# of rank-one layers $u_i v_i^\top$, sorted by importance $\sigma_i$. The $\sigma_i^2$ are the
# eigenvalues of $A^\top A$, and $\|A\|_F^2 = \sum_{ij} a_{ij}^2 = \sum_i \sigma_i^2$.
#
# As the lecture says, the columns of $U$ belonging to nonzero $\sigma_i$ are a basis of the
# column space and the matching rows of $V^\top$ a basis of the row space. We check all of this
# on the lecture's rank-3 matrix $M_3$ and rank-2 matrix $M_2$:

# %%
M2 = np.array([[2, 10, 1], [7, 20, 2], [6, 30, 3]], dtype=float)
M3 = np.array([[2, 3, 1], [7, 5, 2], [6, 1, 3]], dtype=float)

U, S, Vt = np.linalg.svd(M3)
print("singular values of M3:", S)
print(
    "U^T U = I:", np.allclose(U.T @ U, np.eye(3)), "| V^T V = I:", np.allclose(Vt @ Vt.T, np.eye(3))
)
print("U diag(S) V^T = M3:", np.allclose(U @ np.diag(S) @ Vt, M3))
layers = [S[i] * np.outer(U[:, i], Vt[i]) for i in range(3)]
print("sum of the 3 rank-one layers = M3:", np.allclose(sum(layers), M3))
print("sigma^2 = eigenvalues of M3^T M3:", np.allclose(S**2, np.linalg.eigvalsh(M3.T @ M3)[::-1]))
print("||M3||_F^2 =", f"{np.sum(M3**2):.4f}", "| sum sigma^2 =", f"{np.sum(S**2):.4f}")

U2, S2, Vt2 = np.linalg.svd(M2)
basis = U2[:, :2]  # the two columns with nonzero singular values
print("singular values of M2:", S2)
print(
    "projecting M2's columns onto span(u_1, u_2) leaves them unchanged:",
    np.allclose(basis @ (basis.T @ M2), M2),
)

# %% [markdown]
# ## 2. Truncation
#
# Keep the $k$ largest layers and drop the rest:
#
# $$A_k = \sum_{i=1}^{k} \sigma_i\, u_i v_i^\top = U_k \Sigma_k V_k^\top,$$
#
# with $U_k$ the first $k$ columns of $U$, $\Sigma_k$ the top-left $k \times k$ block of
# $\Sigma$ and $V_k^\top$ the first $k$ rows of $V^\top$. $A_k$ has rank $k$.
# `linalg.truncated_svd(A, k)` returns $(U_k, \sigma_{1..k}, V_k^\top)$ — the singular values
# as a vector, since $\Sigma_k$ is diagonal — and `linalg.low_rank_approx(A, k)` returns
# $A_k$. On a random $60 \times 40$ matrix, our sum of layers equals the package's $A_k$:

# %%
rng = np.random.default_rng(0)
A = rng.standard_normal((60, 40))
U, S, Vt = np.linalg.svd(A, full_matrices=False)
k = 5
A_k_by_layers = sum(S[i] * np.outer(U[:, i], Vt[i]) for i in range(k))
U_k, S_k, Vt_k = linalg.truncated_svd(A, k)
print("shapes:", U_k.shape, S_k.shape, Vt_k.shape)
print(
    "sum of the first 5 layers == linalg.low_rank_approx(A, 5):",
    np.allclose(A_k_by_layers, linalg.low_rank_approx(A, k)),
)
print("rank of A_5:", linalg.matrix_rank(A_k_by_layers))

# %% [markdown]
# ## 3. The Eckart–Young theorem
#
# **Theorem (Eckart–Young–Mirsky).** For every matrix $B$ of rank at most $k$,
#
# $$\|A - B\|_F \;\ge\; \|A - A_k\|_F = \sqrt{\sigma_{k+1}^2 + \dots + \sigma_p^2},
# \qquad \|A - B\|_2 \;\ge\; \|A - A_k\|_2 = \sigma_{k+1}.$$
#
# *Why the error has this value:* $A - A_k = \sum_{i>k} \sigma_i u_i v_i^\top$ is itself an
# SVD, and the Frobenius norm squared of a matrix is the sum of its squared singular values.
# (That no other rank-$k$ matrix does better is the substance of the theorem; it follows from
# Weyl's inequality $\sigma_{i+k}(A) \le \sigma_i(A - B) + \sigma_{k+1}(B)$ with
# $\sigma_{k+1}(B) = 0$.)
#
# We check the error formula for every $k$, in both norms:

# %%
frobenius_gap = spectral_gap = 0.0
for k in range(1, 40):
    residual = A - linalg.low_rank_approx(A, k)
    predicted = np.sqrt(np.sum(S[k:] ** 2))
    frobenius_gap = max(frobenius_gap, abs(np.linalg.norm(residual) - predicted))
    spectral_gap = max(spectral_gap, abs(np.linalg.norm(residual, ord=2) - S[k]))
print("max |measured - predicted| over k = 1..39:")
print(f"  Frobenius: below 1e-12: {frobenius_gap < 1e-12}")
print(f"  spectral:  below 1e-12: {spectral_gap < 1e-12}")

# %% [markdown]
# and that no competitor of rank 5 beats $A_5$: neither random products of a $60 \times 5$
# and a $5 \times 40$ matrix, nor the best approximation inside a random 5-dimensional column
# space ($QQ^\top A$ with orthonormal $Q$), which is a much stronger competitor.

# %%
k = 5
best = np.linalg.norm(A - linalg.low_rank_approx(A, k))
random_products, projections = [], []
for _ in range(300):
    random_products.append(
        np.linalg.norm(A - rng.standard_normal((60, k)) @ rng.standard_normal((k, 40)))
    )
    Q, _ = np.linalg.qr(rng.standard_normal((60, k)))
    projections.append(np.linalg.norm(A - Q @ (Q.T @ A)))
print(f"Eckart-Young error of A_5:          {best:.4f}")
print(f"best of 300 random rank-5 products: {min(random_products):.4f}")
print(f"best of 300 random projections:     {min(projections):.4f}")
print(f"||A||_F (error of the zero matrix): {np.linalg.norm(A):.4f}")

# %% [markdown]
# Notice how little $A_5$ gains here: a Gaussian random matrix has a flat spectrum, so every
# layer carries about the same weight and 5 of 40 layers capture little. Low-rank
# approximation pays off only when the singular values **decay**. Real data often do.
#
# ## 4. A photograph at low rank
#
# Matplotlib ships a portrait of Grace Hopper among its sample data (nothing is downloaded).
# As a grayscale image it is a $600 \times 512$ matrix of brightness values in $[0, 1]$.

# %%
photo = figures.sample_photograph()
m, n = photo.shape
U_photo, sigma, Vt_photo = linalg.truncated_svd(photo, min(m, n))  # the full SVD, once
print(f"shape: {photo.shape} | rank: {linalg.matrix_rank(photo)} (full rank: {min(m, n)})")
print("largest singular values:", np.round(sigma[:5], 2))
print("singular values 100, 200, 400, 512:", np.round(sigma[[99, 199, 399, 511]], 4))
energy = np.cumsum(sigma**2) / np.sum(sigma**2)
for k in (1, 10, 50):
    print(f"first {k:>2} layers hold {100 * energy[k - 1]:.2f}% of sum(sigma^2)")

# %% [markdown]
# The photograph is full rank, but its spectrum falls by four orders of magnitude: the first
# layer alone (a smooth, all-positive brightness pattern) carries most of $\|A\|_F^2$. A rank-$k$
# truncated SVD stores $U_k$, $\Sigma_k$ and $V_k^\top$: $k(m + n) + k$ numbers
# (`linalg.svd_param_count`; below we count the stored arrays themselves). The relative error
# is predicted by Eckart–Young from the spectrum alone, and measured on the reconstruction:

# %%
print(f"{'k':>4} {'numbers':>8} {'smaller by':>10} {'predicted':>10} {'measured':>9}")
for k in (5, 20, 50, 100):
    U_k, S_k, Vt_k = U_photo[:, :k], sigma[:k], Vt_photo[:k]
    stored = U_k.size + S_k.size + Vt_k.size
    assert stored == linalg.svd_param_count(m, n, k)
    predicted = np.sqrt(np.sum(sigma[k:] ** 2)) / np.linalg.norm(photo)
    measured = np.linalg.norm(photo - (U_k * S_k) @ Vt_k) / np.linalg.norm(photo)
    ratio = m * n / stored
    print(f"{k:>4} {stored:>8} {ratio:>9.1f}x {100 * predicted:>9.2f}% {100 * measured:>8.2f}%")

# %%
fig = figures.svd_photo_reconstructions()
plt.show()

# %%
fig = figures.svd_photo_spectrum()
plt.show()

# %% [markdown]
# At rank 50 the portrait is clearly recognisable from 5.5× fewer numbers with an 11% error;
# the coarse structure (face, cap, flag) lives in the first few layers and fine texture in the
# long tail. The measured errors (dots) sit exactly on the Eckart–Young curve.
#
# ## 5. The lecture's $2^{20}$-parameter example, counted honestly
#
# The lecture approximates a matrix $C$ with $2^{20}$ entries (so $2^{10} \times 2^{10}$) by
# $C_k = U_k \Sigma_k V_k^\top$ and counts $2 \times (2^{10} \times k) + k^2$ parameters,
# "if $k = 9$: 16448 parameters (1.56%)". Two things are off:
#
# * $\Sigma_k$ is **diagonal**: it needs $k$ numbers, not $k^2$. The honest count is
#   $2 \cdot 2^{10} k + k$ (or $2 \cdot 2^{10} k$ if $\Sigma_k$ is folded into $U_k$, which is
#   what LoRA's $BA$ does).
# * Even with the lecture's own formula, $k = 9$ gives 18 513, not 16 448. The stated 16 448
#   is the lecture's formula at $k = 8$ ($16384 + 64$).

# %%
dense = 2**20
print(f"{'k':>3} {'lecture formula':>16} {'honest k(m+n)+k':>16} {'folded k(m+n)':>14}")
for k in (8, 9):
    lecture_count = 2 * (2**10 * k) + k**2
    honest = linalg.svd_param_count(2**10, 2**10, k)
    folded = linalg.factorized_param_count(2**10, 2**10, k)
    print(
        f"{k:>3} {lecture_count:>8} ({100 * lecture_count / dense:.4f}%) "
        f"{honest:>7} ({100 * honest / dense:.4f}%) {folded:>6} ({100 * folded / dense:.4f}%)"
    )

# %% [markdown]
# So the honest answer for $k = 9$ is **18 441 numbers, 1.76%** of $2^{20}$ (the lecture's
# formula gives 18 513, 1.77%). The lecture's "1.56%" matches the honest count for $k = 8$
# (16 392, 1.5633%), while its "16 448" is its own formula at $k = 8$ (1.5686%, which rounds to
# 1.57%). The count is what the arrays really hold (we counted them on the photograph in
# section 4).
#
# What the slide leaves out is the error, and the count alone says nothing about it. How much
# of a matrix nine layers keep depends entirely on how fast its spectrum decays. Compare the
# photograph with the Gaussian random matrix of section 3:

# %%
for name, values in (("photograph", sigma), ("Gaussian 60x40", S)):
    error_9 = np.sqrt(np.sum(values[9:] ** 2) / np.sum(values**2))  # Eckart-Young
    print(
        f"{name:>15}: rank 9 keeps {len(values[:9])} of {len(values)} layers, "
        f"relative error {100 * error_9:.1f}%"
    )

# %% [markdown]
# At rank 9 the photograph is off by about 28% (in the Frobenius norm); the random matrix,
# whose layers all weigh about the same, by 69%, although it has far fewer layers to drop. A
# low-rank approximation is only as good as the spectrum's decay. Does a fine-tuning update decay?
#
# ## 6. Why a weight *update* can have low intrinsic rank
#
# Aghajanyan et al. (2020) found that fine-tuning a pretrained language model works even when
# the update is restricted to a random low-dimensional subspace: the task needs few degrees of
# freedom (a low *intrinsic dimension*). LoRA (Hu et al., 2021) makes the matching bet for
# each weight matrix: the update $\Delta W = W_{\text{after}} - W_{\text{before}}$ is nearly
# low rank, even though $W$ itself is not.
#
# A small experiment shows how that happens. `linalg.planted_update_task` builds
#
# * a "pretrained" weight $W_{\text{before}} \in \mathbb{R}^{64 \times 96}$ with random
#   Gaussian entries — generic and full rank;
# * a new task whose ideal weight is $W_{\text{before}} + BA$ with $B$: $64 \times 3$,
#   $A$: $3 \times 96$, i.e. the new task differs from the old one by a **rank-3** change;
# * 512 noisy examples $(x, y)$ with $y = (W_{\text{before}} + BA)\,x + 0.1\,\text{noise}$.
#
# We fine-tune *all* $64 \times 96$ entries by gradient descent on the mean squared error
# $L(W) = \frac{1}{2N}\|XW^\top - Y\|_F^2$, whose gradient is
# $\nabla L(W) = (W X^\top - Y^\top) X / N$. Nothing in the training knows about rank.

# %%
task = linalg.planted_update_task(d_out=64, d_in=96, update_rank=3, n_samples=512, noise=0.1)
print("W_before:", task.W_before.shape, "rank", linalg.matrix_rank(task.W_before))
print("planted change:", task.update.shape, "rank", linalg.matrix_rank(task.update))
print("data:", task.X.shape, task.Y.shape)

W = task.W_before.copy()
learning_rate, steps = 0.2, 100
for _ in range(steps):
    gradient = (W @ task.X.T - task.Y.T) @ task.X / len(task.X)
    W -= learning_rate * gradient
W_after = W
print(
    "our loop == linalg.finetune_linear:",
    np.allclose(
        W_after, linalg.finetune_linear(task.W_before, task.X, task.Y, learning_rate, steps)
    ),
)

# %%
delta_W = W_after - task.W_before
sigma_before = np.linalg.svd(task.W_before, compute_uv=False)
sigma_update = np.linalg.svd(delta_W, compute_uv=False)
print("singular values of W_before:", np.round(sigma_before[:6], 3), "...")
print("singular values of delta_W: ", np.round(sigma_update[:6], 3), "...")
print(f"sigma_3 / sigma_4 of delta_W: {sigma_update[2] / sigma_update[3]:.1f}")
share = np.sum(sigma_update[:3] ** 2) / np.sum(sigma_update**2)
print(f"top 3 of 64 layers hold {100 * share:.1f}% of ||delta_W||_F^2")

# %%
fig = figures.weight_update_spectrum()
plt.show()

# %% [markdown]
# The update has three large singular values and a low floor: it is rank 3 plus fitted noise.
# That is no accident of this run. The gradient is
# $(W - W^\star)\Sigma_x - E^\top X / N$ with $\Sigma_x = X^\top X / N$, so starting from
# $W_{\text{before}}$ the accumulated change is
# $\Delta W_t = BA\,(I - (I - \eta\Sigma_x)^t) + (\text{fitted noise})$: the signal part has
# rank at most 3 at every step, whatever $t$ and $\eta$ are.
#
# Keeping only the top layers of $\Delta W$ (`low_rank_approx`) is not just cheaper, it is
# *better*: the dropped layers are mostly noise. We measure the error of the learned layer on
# 2000 fresh inputs against the noise-free targets:

# %%
test_rng = np.random.default_rng(1)
X_test = test_rng.standard_normal((2000, 96))
Y_test = X_test @ (task.W_before + task.update).T


def held_out_error(weight):
    """Mean squared error of y = weight x on the held-out inputs (noise-free targets)."""
    return np.mean((X_test @ weight.T - Y_test) ** 2)


print(f"{'update used':>22} {'test MSE':>9} {'numbers':>8}")
print(f"{'none (W_before)':>22} {held_out_error(task.W_before):>9.5f} {0:>8}")
for k in (1, 2, 3, 6, 20):
    W_k = task.W_before + linalg.low_rank_approx(delta_W, k)
    numbers = linalg.factorized_param_count(64, 96, k)
    print(f"{f'rank {k}':>22} {held_out_error(W_k):>9.5f} {numbers:>8}")
print(f"{'full delta_W':>22} {held_out_error(W_after):>9.5f} {delta_W.size:>8}")

# %% [markdown]
# With rank 3 the layer is about ten times more accurate than with the full update, from 480
# numbers ($3 \times (64 + 96)$) instead of 6 144. LoRA goes one step further: instead of
# training the full $\Delta W$ and truncating afterwards, it trains $B$ and $A$ directly
# (lesson 5).
#
# A caveat: here we *planted* the low rank. In real fine-tuning it is an empirical finding —
# strong for many language tasks (Hu et al. report that ranks as small as 1 to 8 work well for
# GPT-3 on their benchmarks), not a law. Lesson 5 tests it on the course's small GPT: section
# 8 compares LoRA ranks, and section 9 ("What LoRA learns") takes the SVD of the update full
# fine-tuning learns, where nothing is planted.
#
# ## Summary
#
# | idea | formula | in pedaPEFT |
# |---|---|---|
# | SVD | $A = U\Sigma V^\top = \sum_i \sigma_i u_i v_i^\top$ | `np.linalg.svd` |
# | truncation | $A_k = U_k \Sigma_k V_k^\top$ | `linalg.truncated_svd`, `linalg.low_rank_approx` |
# | Eckart–Young | $\min_{\operatorname{rank} B \le k}\|A-B\|_F = \sqrt{\sum_{i>k}\sigma_i^2}$ | |
# | storage | $k(m + n) + k$ for $U_k, \Sigma_k, V_k^\top$ | `linalg.svd_param_count` |
# | update rank | $\Delta W$ is nearly low rank when the task change is | `planted_update_task` |
#
# Lecture numbers checked here: the SVD slide's description of $U$, $\Sigma$, $V^\top$
# (right); the $2^{20}$ example — $2\cdot(2^{10}k) + k^2$ over-counts $\Sigma_k$ (honest:
# $2 \cdot 2^{10}k + k$), and "$k = 9$: 16448 (1.56%)" is wrong (honest: 18 441, 1.76%;
# lecture's own formula: 18 513, 1.77%).

# %% [markdown]
# ## Exercises
#
# Each check cell calls `exercises.check(...)`: it tests your answer on its own inputs and
# says what is wrong, never what the answer is.
#
# **Exercise 1.** Write `truncated_svd(A, k)` returning `U_k` ($m \times k$), `S_k` (the $k$
# largest singular values, a 1-D array) and `Vt_k` ($k \times n$), so that
# `(U_k * S_k) @ Vt_k` is the best rank-$k$ approximation of `A`. Use `np.linalg.svd`.

# %%
### BEGIN SOLUTION
def truncated_svd(A, k):
    """The k leading singular triplets of A: U_k (m, k), S_k (k,), Vt_k (k, n)."""
    U, S, Vt = np.linalg.svd(np.asarray(A, dtype=float), full_matrices=False)
    return U[:, :k], S[:k], Vt[:k]
### END SOLUTION


# %%
exercises.check("02-truncated-svd", truncated_svd)

# %% [markdown]
# **Exercise 2.** Write `smallest_rank(singular_values, max_error)`: the smallest $k$
# ($0 \le k \le p$) whose truncation has a relative Frobenius error
# $\|A - A_k\|_F / \|A\|_F$ of at most `max_error`, computed from the singular values alone
# (a 1-D array in decreasing order).

# %%
### BEGIN SOLUTION
def smallest_rank(singular_values, max_error):
    """Smallest k with sqrt(sum_{i >= k} s_i^2 / sum_i s_i^2) <= max_error."""
    squares = np.asarray(singular_values, dtype=float) ** 2
    for k in range(len(squares) + 1):
        if np.sqrt(squares[k:].sum() / squares.sum()) <= max_error:
            return k
    return len(squares)
### END SOLUTION


# %%
exercises.check("02-smallest-rank", smallest_rank)

# %% [markdown]
# **Exercise 3.** By what factor `ratio_30` is a stored rank-30 truncated SVD of the
# $600 \times 512$ photograph smaller than the image itself (count $\Sigma_k$ as its
# diagonal)?

# %%
### BEGIN SOLUTION
ratio_30 = m * n / linalg.svd_param_count(m, n, 30)
### END SOLUTION

# %%
exercises.check("02-compression-ratio", ratio_30)
