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
# # Lesson 7 — NF4: sixteen levels for normal weights
#
# Lesson 6 quantized with evenly spaced integer levels. But trained weights are not evenly
# spread: they are roughly normal, dense near zero and sparse in the tails. QLoRA's
# **4-bit NormalFloat (NF4)** puts its 16 levels at quantiles of the normal distribution
# instead. This lesson builds them with `scipy.stats.norm.ppf` following the lecture's five
# steps, until they equal bitsandbytes' 16 float32 values bit for bit; draws them over the
# normal density; compares NF4 with FP4 and 4-bit integers on normal data and on the trained
# weights of the course's small GPT; and examines the claim that NF4 is
# "information-theoretically optimal".
#
# **You will learn:** quantile quantization, the exact NF4 construction (and where the
# lecture's numbers come from), the FP4 format, how to compare quantizers honestly.

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
import torch
from scipy.stats import norm

from pedaPEFT import exercises, figures, gpt, quant

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. Quantile quantization
#
# > **Erratum.** The lecture calls NF4 a "4-bit floating-point" format. It has no exponent and
# > no mantissa: NF4 is a lookup table of 16 fixed values, and a 4-bit code is an index into
# > it. (FP4, section 3, is the 4-bit floating-point format.)
#
# If weights follow a distribution with quantile function $Q$ (the inverse of the cumulative
# distribution), placing levels at quantiles makes each level equally likely to be used: a
# 4-bit code then carries its full 4 bits of information. For zero-mean normal weights
# $N(0, \sigma^2)$ the quantiles are $\sigma\,\Phi^{-1}(p)$, and after the absmax scaling of
# lesson 6 the $\sigma$ drops out — which is why one fixed table serves every block.
#
# ## 2. The lecture's five steps
#
# The lecture (from a blog post about QLoRA) lists:
#
# 1. Generate 8 evenly spaced values from 0.56 to 0.97 (Set I).
# 2. Generate 7 evenly spaced values from 0.57 to 0.97 (Set II).
# 3. Calculate the z-scores of Steps 1 and 2; for Set II, "the negative inverse of the z-scores".
# 4. Concatenate Set I, a zero value, and Set II.
# 5. Normalize by dividing by the absolute maximum.
#
# The rounded endpoints hide the real recipe. In bitsandbytes (`create_normal_map`) both sets
# start at the probability **0.9677083** and run down towards 0.5, which is excluded: Set I is
# `linspace(0.9677083, 0.5, 9)` without its last point, Set II `linspace(0.9677083, 0.5, 8)`
# without its last point. The probabilities are float32 (`torch.linspace`):

# %%
OFFSET = 0.9677083
set_1 = torch.linspace(OFFSET, 0.5, 9)[:-1].numpy()
set_2 = torch.linspace(OFFSET, 0.5, 8)[:-1].numpy()
print("Set I :", set_1)
print("Set II:", set_2)
print(f"Set I  runs from {set_1.min():.7f} to {set_1.max():.7f}: 'from 0.56 to 0.97'")
print(f"Set II runs from {set_2.min():.7f} to {set_2.max():.7f}: 'from 0.57 to 0.97'")

# %% [markdown]
# So "0.56" is $0.5 + 0.4677083/8 = 0.5584635$, "0.57" is $0.5 + 0.4677083/7 = 0.5668155$ and
# "0.97" is $0.9677083$ (it rounds to 0.97, not 0.96). The steps are $0.0584635$ and
# $0.0668155$. Where 0.9677083 itself comes from is not documented; numerically it equals
# $1 - \tfrac12\left(\tfrac1{32} + \tfrac1{30}\right) = 0.96770833\ldots$.
#
# Steps 3–5. A z-score is $\Phi^{-1}(p)$, `norm.ppf`. For Set II we need the *negated*
# z-scores $-\Phi^{-1}(p)$, mirrored below zero:

# %%
z_1 = norm.ppf(set_1)  # 8 positive levels
z_2 = -norm.ppf(set_2)  # 7 negative levels
values = np.sort(np.concatenate([z_1, [0.0], z_2]).astype(np.float32))
nf4_by_hand = values / np.abs(values).max()
print("raw z-scores, Set I :", z_1)
print("raw z-scores, Set II:", z_2)
print("NF4:", nf4_by_hand)

# %% [markdown]
# > **Erratum.** Step 3's "negative inverse of the z-scores" would be $-1/z$; what is meant
# > (and computed) is the *negated* z-score $-z$. Step 4 also needs a sort to give ordered
# > levels, and the endpoints of steps 1–2 are $0.5584635 \to 0.9677083$ and
# > $0.5668155 \to 0.9677083$, rounded.
#
# The result: 7 negative levels, an exact zero, 8 positive levels — asymmetric, so that zero
# is exactly representable and both ends are exactly $\pm 1$ (the largest z-score,
# $\Phi^{-1}(0.9677083) = 1.8481$, is the normaliser on both sides). It equals the package's
# table, and bitsandbytes' (and the QLoRA paper's appendix E), bit for bit:

# %%
nf4 = quant.nf4_code()
print("equal to quant.nf4_code() bit for bit:", np.array_equal(nf4_by_hand, nf4.numpy()))
for nibble, value in enumerate(nf4.tolist()):
    print(f"  {nibble:2d} = 0b{nibble:04b}: {value: .10f}")

# %% [markdown]
# Exactness needs the float32 probabilities. With float64 `numpy.linspace` half the levels
# move by one unit in the last place:

# %%
z64 = np.concatenate([norm.ppf(np.linspace(OFFSET, 0.5, 9)[:-1]), [0.0],
                      -norm.ppf(np.linspace(OFFSET, 0.5, 8)[:-1])]).astype(np.float32)
nf4_float64_probs = np.sort(z64) / np.abs(z64).max()
print("levels that differ:", int((nf4_float64_probs != nf4.numpy()).sum()),
      "| largest difference:", float(np.abs(nf4_float64_probs - nf4.numpy()).max()))

# %% [markdown]
# The QLoRA paper states a different formula (its Eq. 4), averages of adjacent quantiles of
# $2^k + 1 = 17$ equal-probability bins: $q_i = \tfrac12\left(Q(\tfrac{i}{17}) +
# Q(\tfrac{i+1}{17})\right)$. As written it is infinite at $i = 0$ ($Q(0) = -\infty$), and its
# finite values are not the table:

# %%
i = np.arange(1, 16)
eq4 = 0.5 * (norm.ppf(i / 17) + norm.ppf((i + 1) / 17))
print("Eq. 4, i = 1..15, normalised:", eq4 / eq4.max())

# %% [markdown]
# The table that bitsandbytes and every QLoRA checkpoint use is the `create_normal_map` one
# above; that is the one `quant.nf4_code()` returns.
#
# ## 3. The levels over the normal density
#
# In the figure, $u = x/\text{absmax}$ and the density is that of $N(0,1)$ stretched so that
# $u = \pm1$ sits at $\pm 1.848$ standard deviations. Each shaded band is the bin of one NF4
# level (all $u$ closer to it than to any other level); the ticks below compare the levels of
# NF4, FP4 and 4-bit integers (lesson 6's absmax with $2^3 - 1 = 7$).

# %%
figure = figures.nf4_levels_density()
plt.show()

# %% [markdown]
# NF4 is dense near zero and sparse in the tails. **FP4** (bitsandbytes' E2M1-like format: a
# sign bit and the magnitudes $\{0, 0.0625, 2, 3, 4, 6, 8, 12\}/12$) has the levels $0$,
# $\pm 0.0052$, $\pm\frac16$, $\pm\frac14$, $\pm\frac13$, $\pm\frac12$, $\pm\frac23$, $\pm 1$:
# a second zero ($-0$) and the pair $\pm 0.0052$ spend three codes almost on top of 0, so it
# has 15 distinct values and a gap from $0.0052$ to $\frac16$. int4 has 15 evenly spaced ones.

# %%
fp4 = quant.fp4_code()
print("FP4 in nibble order:", fp4.numpy())
print("FP4 distinct values:", torch.unique(fp4).numel(), "| int4 levels:", 15, "| NF4:", 16)

# %% [markdown]
# ## 4. NF4 vs FP4 vs int4: normal data and trained weights
#
# All three use blocks of 64 with a float32 absmax each; only the 16 levels differ.
# `quant.fake_quantize` does the quantize → dequantize round trip. The measure is the relative
# RMS error $\lVert \hat W - W\rVert / \lVert W \rVert$. First normal samples, then the
# trained weights of every q, k, v, o, fc and proj layer of the course's small pretrained GPT
# (the `tiny` preset, shipped with the package; `python -m pedaPEFT pretrain` made it).

# %%
normal = [torch.randn(2**18, generator=torch.Generator().manual_seed(0))]
trained = gpt.linear_weights("tiny")
print(f"trained weights: {len(trained)} matrices, {sum(w.numel() for w in trained):,} values")
errors = quant.four_bit_errors({"normal": normal, "trained": trained})
for data, row in errors.items():
    print(f"{data:>8}: " + ", ".join(f"{m} {e:.3f} %" for m, e in row.items()))

# %%
figure = figures.quant_4bit_error_comparison()
plt.show()

# %% [markdown]
# NF4 has the smallest error on both: 9.21 % on normal samples and nearly the same on the
# trained weights. The left panel shows why it carries over: standardised, the trained weights are
# close to normal in the bulk, which is what NF4 is built for; their tails are heavier (values
# beyond 4 standard deviations are far more common than for a normal), and that costs every
# format a little.
#
# The runner-up may surprise: int4 (10.8 %) beats bitsandbytes' FP4 (12.2 %) on weight error.
# FP4 spends three of its 16 codes on $-0$ and $\pm 0.0052$, levels that almost never help,
# and leaves a wide gap between $2/3$ and $1$. The QLoRA paper's Table 2 ranks the formats by
# *perplexity* of large language models (Int4 34.34, Float4 (E2M1) 31.07, NFloat4 + DQ 27.41);
# weight error on a small model is a different measurement, and we reproduce only NF4's lead
# here, not the order of the other two.
#
# ## 5. "Information-theoretically optimal"?
#
# The lecture (after the paper's abstract) calls NF4 "an information-theoretically optimal
# data type for normally distributed weights". The idea: a quantile quantizer uses all its
# levels equally often, so the code has maximal entropy, 4 bits. Two things are worth checking.
#
# **Are the levels used equally often?** Not after blockwise absmax scaling. The data in each
# block is divided by the block's own maximum, so $u$ is not $N(0, 1)/1.848$; and every block
# has one value at exactly $\pm 1$. Measured on normal data in blocks of 64:

# %%
x = torch.randn(2**20, generator=torch.Generator().manual_seed(1))
blocks = x.view(-1, 64)
u = (blocks / blocks.abs().amax(dim=1, keepdim=True)).reshape(-1)


def usage_and_error(levels):
    """Probability of each level, entropy (bits) and RMS error when u is rounded to levels."""
    levels = torch.sort(torch.as_tensor(levels, dtype=torch.float32)).values
    index = quant.nearest_code_index(u, levels)
    p = torch.bincount(index, minlength=len(levels)).double() / u.numel()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    rms = float((levels[index] - u).pow(2).mean().sqrt())
    return p, entropy, rms


p_nf4, entropy_nf4, rms_nf4 = usage_and_error(nf4)
print("NF4 level usage (%):", np.round(100 * p_nf4.numpy(), 2))
print(f"entropy {entropy_nf4:.4f} bits of 4 | RMS error {rms_nf4:.5f}")

# %% [markdown]
# The inner levels are used 8–9 % of the time, the outer ones under 2 %: the entropy is 3.88
# bits, not 4. And maximal entropy is not what we want anyway — we want small error. Two
# quantizers fitted to this exact distribution make the point: **equal-mass** levels (the
# median of each sixteenth of the data: maximal entropy by construction) and **Lloyd–Max**
# levels (alternately move each level to the mean of its bin and the bins to the midpoints:
# a local minimum of the mean squared error).

# %%
equal_mass = torch.quantile(u[: 2**16], (torch.arange(16) + 0.5) / 16)
lloyd = nf4.clone()
for _ in range(50):
    index = quant.nearest_code_index(u, lloyd)
    sums = torch.bincount(index, weights=u, minlength=16)
    counts = torch.bincount(index, minlength=16)
    lloyd = torch.where(counts > 0, sums / counts.clamp(min=1), lloyd).float()

rows = (("NF4", nf4), ("FP4", fp4), ("int4", torch.arange(-7, 8) / 7),
        ("equal-mass", equal_mass), ("Lloyd-Max", lloyd))
for name, levels in rows:
    _, entropy, rms = usage_and_error(levels)
    print(f"{name:>10}: entropy {entropy:.4f} bits, RMS error {rms:.5f} "
          f"({100 * (rms / rms_nf4 - 1):+.1f} % vs NF4)")

# %% [markdown]
# The equal-mass code reaches almost 4 bits of entropy and has the **largest** error: spending
# levels evenly on probability leaves the tails, where errors are big, coarsely covered. The
# Lloyd–Max code has lower entropy than NF4 and about 6 % less error. So NF4 is neither
# maximal-entropy nor minimal-error for the data it actually sees. What it is: a fixed,
# data-independent table, close to the error-optimal one (within a few percent), with an exact
# zero and exact $\pm 1$, and better than FP4 and int4 — a very good engineering choice, not
# an optimum. (The QLoRA paper's own argument for optimality concerns quantile quantization of
# $N(0,1)$ before blocking; its NF4 table is built with the empirical offset 0.9677083 instead.)
#
# ## Summary
#
# * NF4 = normal quantiles at float32 probabilities $\text{linspace}(0.9677083, 0.5, 9)[:-1]$
#   and their negatives for $\text{linspace}(0.9677083, 0.5, 8)[:-1]$, plus 0, divided by the
#   largest: 7 negative levels, 0, 8 positive, ends exactly $\pm1$.
# * The lecture's "0.56 / 0.57 to 0.97" are $0.5584635$ / $0.5668155$ to $0.9677083$.
# * NF4 has the smallest round-trip error, on normal data and on trained weights; here int4
#   beats bitsandbytes' FP4.
# * "Information-theoretically optimal" holds only loosely: measured, NF4's entropy is 3.88
#   bits and a Lloyd–Max code has 6 % less error.
#
# ## Exercises
#
# Each exercise asks for a function; the check cell under it compares your function with the
# package on random tensors and on several settings, and its hint names what is off.
#
# **Exercise 1.** The five steps work for any number of bits $k$: Set I has $2^{k-1}$
# probabilities, Set II $2^{k-1} - 1$, both starting at 0.9677083 and stepping towards 0.5
# (excluded). Write `normal_float_code(bits)` that returns the $2^k$ levels (float32,
# ascending). For `bits=4` it must equal `quant.nf4_code()` bit for bit; the check also tries
# 2, 3 and 5 bits.


# %%
### BEGIN SOLUTION
def normal_float_code(bits):
    """The 2^bits NormalFloat levels from the five steps (float32, ascending, ends at -1 and 1)."""
    half = 2 ** (bits - 1)
    set_1 = torch.linspace(0.9677083, 0.5, half + 1)[:-1].numpy()
    set_2 = torch.linspace(0.9677083, 0.5, half)[:-1].numpy()
    levels = np.concatenate([norm.ppf(set_1), [0.0], -norm.ppf(set_2)]).astype(np.float32)
    levels = np.sort(levels)
    return torch.from_numpy(levels / levels.max())


### END SOLUTION

# %%
exercises.check("07-nf4-table", normal_float_code)

# %% [markdown]
# **Exercise 2.** Write `quantize_nf4(x, blocksize)` (the number of elements of `x` is a
# multiple of `blocksize`): scale each block of `blocksize` consecutive values into [-1, 1]
# by its absmax, replace every value by the index of the nearest NF4 level (ties go to the
# lower level), and pack two indices per byte, element $2i$ in the high nibble. Return
# `(packed, absmax)`: a flat uint8 tensor of $n/2$ bytes and the float32 absmax of each block.
# Use `quant.nf4_code()` and torch, not `quant.quantize_4bit`.


# %%
### BEGIN SOLUTION
def quantize_nf4(x, blocksize):
    """Blockwise NF4: (uint8 bytes holding two 4-bit indices each, absmax of each block)."""
    code = quant.nf4_code()
    blocks = x.reshape(-1, blocksize).float()
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).reshape(-1)
    indices = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return (indices[0::2] << 4) | indices[1::2], absmax


### END SOLUTION

# %%
exercises.check("07-nf4-quantize", quantize_nf4)

# %% [markdown]
# **Exercise 3.** Write the inverse, `dequantize_nf4(packed, absmax, blocksize, shape)`:
# unpack the indices, look them up in the NF4 table, multiply each by its block's absmax and
# return a float32 tensor of the given shape.


# %%
### BEGIN SOLUTION
def dequantize_nf4(packed, absmax, blocksize, shape):
    """Unpack, look up and rescale blockwise NF4 codes; float32 of the given shape."""
    indices = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
    values = quant.nf4_code()[indices].view(-1, blocksize) * absmax[:, None]
    return values.reshape(shape)


### END SOLUTION

# %%
exercises.check("07-nf4-dequantize", dequantize_nf4)
