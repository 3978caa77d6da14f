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
# # Lesson 6 — Quantization basics: absmax, outliers, blocks
#
# LoRA (lesson 5) shrinks what we *train*, but the frozen base weights $W_0$ still sit in
# memory at 16 or 32 bits each. QLoRA stores them in 4 bits. Before NF4 (lesson 7) and double
# quantization (lesson 8), this lesson builds the simplest quantizer there is — **absmax
# integer quantization** — finds its weak spot (one large value ruins a whole tensor), and
# fixes it the way QLoRA does: **one scale per block** of 64 values.
#
# **You will learn:** the absmax formula (the lecture prints it with typos; here it is
# corrected and checked), the round-trip error bound, what an outlier does, blockwise
# quantization and its price in bits per parameter.

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
import torch

from pedaPEFT import exercises, figures, memory, quant

# %% [markdown]
# ## 1. Why: bytes per parameter
#
# A parameter in float32 takes 4 bytes, in bfloat16 2, in int8 1 and in a 4-bit code half a
# byte. The lecture motivates QLoRA with "LLaMA-3-70B with 32-bit precision requires 820 GB of
# GPU memory". Let us count, for a nominal 70 billion parameters:

# %%
n_params = 70 * 10**9
for name, bytes_per_param in (("float32", 4), ("bfloat16", 2), ("int8", 1), ("4-bit", 0.5)):
    print(f"{name:>9}: {n_params * bytes_per_param / memory.GB:6.0f} GB of weights")
for regime in ("full", "full, no master copy"):  # the course's conventions (lesson 3)
    convention = memory.CONVENTIONS[regime]
    print(f"fine-tuning, {regime} ({convention.bytes_per_trainable():.0f} B/param): "
          f"{convention.memory(n_params).static / memory.GB:,.0f} GB")
paper_65b = memory.CONVENTIONS["full, no master copy"].memory(65 * 10**9).static
print(f"the same for 65B parameters, no master copy: {paper_65b / memory.GB:,.0f} GB")

# %% [markdown]
# > **Erratum.** 70B parameters in float32 are **280 GB** of weights, not 820 GB. A figure of
# > that size is what *full fine-tuning* costs. By the course's convention (lesson 3: bf16
# > weights and gradients, a float32 master copy and two float32 Adam moments, 16 bytes per
# > parameter) that is **1,120 GB** for 70B. Without the master copy it is 12 bytes per
# > parameter, 840 GB: the count behind the QLoRA paper's ">780 GB" for a 65B model
# > (65 × 12 = 780).
#
# ## 2. Absmax quantization, the formula corrected
#
# To store a float tensor $X$ in int8 we scale it so that its largest magnitude lands on 127,
# round, and keep the scale. The lecture (after the QLoRA paper, Eq. 1–2) writes
#
# $$X^{\text{Int8}} = \text{round}\Big(\frac{127}{\text{absmax}(X^{\text{FP32}})},
#   X^{\text{Int8}}\Big) = \text{round}(c^{\text{FP32}}, X^{\text{Int32}}),\qquad
#   \text{dequant}(c^{\text{FP32}}, X^{\text{Int32}}) = \frac{X^{\text{Int8}}}{c^{\text{FP32}}}
#   = X^{\text{Int32}}.$$
#
# > **Erratum.** Three typos: the comma should be a product, the input of the rounding is the
# > float tensor (not $X^{\text{Int8}}$ or an "Int32" tensor), and dequantization returns an
# > *approximation of the float tensor*. Correctly:
#
# $$c = \frac{127}{\max_i |X_i|},\qquad X^{\text{Int8}} = \text{round}(c \cdot X^{\text{FP32}})
#   \in [-127, 127],\qquad \text{dequant}(c, X^{\text{Int8}}) = \frac{X^{\text{Int8}}}{c}
#   \approx X^{\text{FP32}}.$$
#
# (The range is symmetric: $-128$ is never used, so that $0$ sits exactly in the middle and
# $x \mapsto -x$ is exact.) By hand on a small vector:

# %%
x = torch.tensor([0.52, -1.30, 0.07, 2.57, -0.91, 0.0])
c = 127 / x.abs().max()
q = torch.round(c * x).to(torch.int8)
x_back = q.float() / c
print("c =", f"{float(c):.4f}", "| q =", q.tolist())
print("dequantized:", [f"{v:.4f}" for v in x_back.tolist()])
max_error = float((x_back - x).abs().max())
print("max error:", f"{max_error:.5f}", "<= 1/(2c) =", f"{0.5 / float(c):.5f}")

# %% [markdown]
# Rounding moves each value by at most half a step, and one step is $1/c = \text{absmax}/127$,
# so **every** element obeys $|x - \text{dequant}| \le \text{absmax} / 254$. The largest value
# maps exactly to $\pm127$ and $0$ stays $0$. The package's `quant.absmax_quantize` is the same
# function (any bit width $b$ uses $2^{b-1}-1$ in place of 127):

# %%
q_package, c_package = quant.absmax_quantize(x, bits=8)
print("same codes:", torch.equal(q_package, q), "| same scale:", torch.equal(c_package, c))
print("int4 codes:", quant.absmax_quantize(x, bits=4)[0].tolist(), "(scale 7 / absmax)")

# %% [markdown]
# ## 3. What one outlier does
#
# Trained weights are roughly normal with a small standard deviation (0.02 in GPT-2's
# initialisation) — but large models also grow a few **outliers**, values many standard
# deviations out. Absmax lets the single largest value set the step for everyone:

# %%
generator = torch.Generator().manual_seed(0)
w = torch.randn(4096, generator=generator) * 0.02
w_outlier = w.clone()
w_outlier[1234] = 1.0  # one value 50 standard deviations out

for name, tensor in (("normal weights", w), ("with one outlier", w_outlier)):
    q, c = quant.absmax_quantize(tensor)
    error = (quant.absmax_dequantize(q, c) - tensor).abs().mean()
    print(
        f"{name:>17}: step 1/c = {1 / float(c):.6f}, codes in use {q.unique().numel():3d} of 255, "
        f"values rounded to 0: {int((q == 0).sum()):4d}, mean error {float(error):.6f}"
    )

# %% [markdown]
# With the outlier the step grows twelvefold, from 0.0006 to 0.0079: a typical weight of size
# 0.02 is now only two or three steps from zero, one weight in six becomes exactly 0 (661
# instead of 59), only 22 of the 255 codes are still used, and the mean error grows twelvefold.
# One number out of 4096 spoiled the other 4095.
#
# ## 4. Blockwise quantization: a scale per block
#
# The cure (lecture: "Block-wise provides a solution … each block using its own independent
# quantization constant"): flatten the tensor, cut it into contiguous **blocks** of $B$ values
# and give each block its own absmax. An outlier now coarsens only the 63 neighbours in its own
# block of 64:

# %%
q_blocks, scales = quant.blockwise_absmax_quantize(w_outlier, bits=8, blocksize=64)
back = quant.blockwise_absmax_dequantize(q_blocks, scales, blocksize=64)
print("blocks:", scales.numel(), "| scales stored:", tuple(scales.shape))
print("mean error, blockwise:", f"{float((back - w_outlier).abs().mean()):.6f}")
print("block holding the outlier:", 1234 // 64, "| its step:", f"{1 / float(scales[19]):.6f}",
      "| a typical block's step:", f"{1 / float(scales.median()):.6f}")

# %% [markdown]
# Blockwise, the error (0.000128) is even below that of the whole tensor *without* the
# outlier (0.000162): a block's largest value is typically smaller than the whole tensor's,
# so its step is finer (0.00042 against 0.00065).
#
# The price is the scales. Each block stores one float32 absmax (or scale), **32 bits per
# block**, i.e. $32 / B$ extra bits per parameter: 0.5 bits for $B = 64$. For 8-bit codes that
# is cheap (8.5 bits); for 4-bit codes it is 12.5 % on top (4.5 bits) — which is why lesson 8
# quantizes the scales themselves.
#
# ## 5. Error against blocksize
#
# The figure measures the trade-off on a million normal values with one outlier (×20) per
# thousand. Left: the mean round-trip error for int8 and int4 as the blocksize grows from 8 to
# the whole tensor. Right: the same errors against the total bits per value, code plus $32/B$.

# %%
figure = figures.quant_error_vs_blocksize()
plt.show()

# %% [markdown]
# Reading the figure: the error falls steadily as blocks shrink, because fewer values share a
# block with an outlier. The bits, though, grow like $32/B$: nearly free down to a few hundred
# values per block, expensive below 32. QLoRA's blocksize of 64 costs half a bit per value.
# The numbers at three blocksizes:

# %%
x_demo = quant.normal_with_outliers()
for bits in (8, 4):
    for blocksize in (16, 64, x_demo.numel()):
        q, scale = quant.blockwise_absmax_quantize(x_demo, bits=bits, blocksize=blocksize)
        out = quant.blockwise_absmax_dequantize(q, scale, blocksize)
        label = "whole tensor" if blocksize == x_demo.numel() else f"blocks of {blocksize}"
        extra = 32 / blocksize
        print(f"int{bits}, {label:>12}: mean error {float((out - x_demo).abs().mean()):.4f}, "
              f"{bits + extra:.4f} bits per value")

# %% [markdown]
# ## 6. Weight outliers and activation outliers
#
# Section 3 planted an outlier in a *weight* vector. In trained language models, though, the
# weights are rarely the problem. LLM.int8 (Dettmers et al., 2022) measured both sides of a
# linear layer $y = Wx$:
#
# * the **weights** are close to normal: few values far out, which blockwise absmax (and
#   lesson 7's NF4, built for normal data) handles well;
# * the **activations** $x$, the hidden states entering each linear layer, are not: from
#   about 6.7B parameters on, a handful of **feature dimensions** (about 6 of thousands) carry
#   magnitudes up to 20 times the rest, in nearly every layer and for most tokens.
#
# Because an activation outlier sits in a *column* (a feature) and appears in *every row* (a
# token), a scale per token does not isolate it. We measure both on the course's `pydocs` GPT
# (lesson 11's base, 2.2M parameters pretrained on Python's documentation), on held-out text.
# For the weights: the kurtosis $E[(w-\mu)^4]/\sigma^4$ (3 for a normal distribution) and the
# largest $|z| = |w - \mu|/\sigma$. For the activations: `outliers.feature_absmax`, the largest
# $|x|$ of each feature dimension over all tokens, and the two largest dimensions as a
# multiple of the median dimension.

# %%
from pedaPEFT import outliers

text_model, text = outliers.pydocs_sample(batch_size=8)
inputs = outliers.linear_inputs(text_model, text)
print(f"{text.numel():,} tokens of held-out documentation")
print("layer            weight: kurtosis  max|z|   input: largest dims (max |x| / median dim)")
for block in range(text_model.config.n_layer):
    for name in ("attn.q", "mlp.fc"):
        layer_name = f"blocks.{block}.{name}"
        w = text_model.get_submodule(layer_name).weight.detach()
        z = (w - w.mean()) / w.std()
        peaks = outliers.feature_absmax(inputs[layer_name])
        top = torch.topk(peaks, 2)
        ratios = ", ".join(f"{i}: {v / peaks.median():.1f}x"
                           for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True))
        print(f"{layer_name:<16} {outliers.kurtosis(w):>16.2f}  {float(z.abs().max()):>6.1f}   "
              f"{ratios}")
normal = torch.randn(w.numel(), generator=torch.Generator().manual_seed(0))
print(f"{'normal sample':<16} {outliers.kurtosis(normal):>16.2f}  "
      f"{float(normal.abs().max() / normal.std()):>6.1f}   (as many values as mlp.fc)")

# %% [markdown]
# The weights are close to normal: kurtosis 3.05 to 3.59 (a normal sample: 3.00), and the
# farthest weight of a layer lies 3.9 to 5.4 standard deviations out, against 4.6 for a normal
# sample as large as `mlp.fc` — a slightly heavy tail, nothing like section 3's weight 50
# standard deviations out. The inputs of the linear layers are mild
# too — the LayerNorm before every block rescales each token — but one dimension stands out:
# **144** is the largest input feature of `attn.q` in blocks 1, 2 and 3. The residual stream,
# before the LayerNorm, shows where it comes from (`outliers.outlier_features` lists the
# dimensions at least 3 times the median's largest $|x|$):

# %%
for block, hidden in enumerate(outliers.block_outputs(text_model, text)):
    peaks = outliers.feature_absmax(hidden)
    print(f"after block {block}: outlier dims {outliers.outlier_features(hidden, factor=3.0)}, "
          f"largest |x| {float(peaks.max()):.1f}, median dimension {float(peaks.median()):.1f}")

# %% [markdown]
# One feature dimension, the same in every later block, growing with depth to about three
# times the median: the seed of what LLM.int8 describes, in a 2.2M-parameter model. The
# magnitudes of LLM.int8's outliers (20 times the rest, surviving the LayerNorm) appear only
# in models of billions of parameters, which this course cannot train. To see what such
# outliers do to quantization, the next cell **constructs** them: activations with three
# feature dimensions 20 times larger than the others in every token, and normal weights.

# %%
generator = torch.Generator().manual_seed(0)
n_tokens, d_in, d_out = 256, 512, 512
X = torch.randn(n_tokens, d_in, generator=generator)
outlier_dims = [7, 100, 333]
X[:, outlier_dims] *= 20.0  # CONSTRUCTED: three feature dimensions 20x larger, in every token
W = torch.randn(d_out, d_in, generator=generator) * 0.02
Y = X @ W.T


def rowwise_int8(t):
    """Absmax int8 with one scale per row (per token of X, per output of W), dequantized."""
    q, scale = quant.blockwise_absmax_quantize(t, bits=8, blocksize=t.shape[1])
    return quant.blockwise_absmax_dequantize(q, scale, blocksize=t.shape[1])


def relative_error(approx):
    """||approx - X W^T||_F / ||X W^T||_F."""
    return float((approx - Y).norm() / Y.norm())


regular = [i for i in range(d_in) if i not in outlier_dims]
X_int8 = rowwise_int8(X)
decomposed = (rowwise_int8(X[:, regular]) @ rowwise_int8(W[:, regular]).T
              + X[:, outlier_dims] @ W[:, outlier_dims].T)
print("relative error of X W^T with")
print(f"  weights int8 (per output row), activations float:   "
      f"{relative_error(X @ rowwise_int8(W).T):.4f}")
print(f"  activations int8 (per token), weights float:        {relative_error(X_int8 @ W.T):.4f}")
print(f"  both int8:                                          "
      f"{relative_error(X_int8 @ rowwise_int8(W).T):.4f}")
print(f"  outlier dimensions in 16 bits, the rest int8:       {relative_error(decomposed):.4f}")
weight_only = (X.to(torch.bfloat16) @ rowwise_int8(W).to(torch.bfloat16).T).float()
print(f"  weights int8, multiplied in bfloat16 (weight-only): {relative_error(weight_only):.4f}")
lost = (X_int8 - X)[:, regular].abs().mean() / X[:, regular].abs().mean()
print(f"mean error of the regular activations under per-token int8: {100 * float(lost):.1f} % "
      "of their size")

# %% [markdown]
# Quantizing the normal weights costs little; quantizing the activations costs several times
# more, because every token's scale is set by its three outlier values and the other 509
# features get a step 20 times too coarse. LLM.int8's remedy is the line "outlier dimensions
# in 16 bits": keep the few outlier dimensions in 16 bits and multiply only the rest in int8.
#
# **QLoRA avoids the problem altogether: it quantizes the weights only** — the line
# "weight-only", with NF4 in place of int8. The frozen base weights are *stored* in 4 bits
# (lessons 7 and 8); for every multiplication they are dequantized to the compute dtype,
# bfloat16, and multiplied with bfloat16 activations. The activations, the gradients and the
# LoRA factors are never quantized, so activation outliers pass through at full bfloat16
# range (lesson 9's `QuantLinear.forward` is exactly this: `x.to(compute_dtype)`, then the
# product with the dequantized weight; the test suite checks it).

# %% [markdown]
# ## Summary
#
# * Absmax: $c = (2^{b-1}-1)/\max|X|$, $q = \text{round}(cX)$, $\hat X = q/c$; error at most
#   half a step, $\max|X| / (2(2^{b-1}-1))$ per element.
# * One outlier inflates the step for the whole tensor.
# * Blocks of $B$ values with their own absmax confine it, at $32/B$ extra bits per parameter
#   (0.5 bits for $B = 64$).
# * Trained weights are near normal; the outliers of large models are in a few *feature
#   dimensions of the activations* (LLM.int8). QLoRA quantizes the weights only and computes
#   in bfloat16: activations are never quantized.
#
# Lesson 7 replaces the evenly spaced integer levels with 16 levels placed where normally
# distributed weights actually are: NF4.
#
# ## Exercises
#
# Each exercise asks for a function; the check cell under it runs your function on random
# tensors (an outlier, a last block shorter than the others, an all-zero block) and compares
# it with the package. When something is off, the hint says what.
#
# **Exercise 1.** Write `blockwise_quantize(x, bits, blocksize)` without calling `quant`: cut
# the flattened `x` into blocks of `blocksize` consecutive values (the last may be shorter),
# give block $j$ the scale $c_j = (2^{b-1}-1)/\max|x_{\text{block } j}|$ (and $c_j = 1$ for an
# all-zero block), and return `(q, scale)`: the int8 codes $\text{round}(c_j x_i)$ with the
# shape of `x`, and the float32 scales, one per block.


# %%
### BEGIN SOLUTION
def blockwise_quantize(x, bits, blocksize):
    """Absmax codes per block of `blocksize` values: (int8 codes shaped like x, scale per block)."""
    qmax = 2 ** (bits - 1) - 1
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, -1)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, qmax / absmax, torch.ones_like(absmax))
    q = torch.round(blocks * scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(-1)[:n].reshape(x.shape), scale


### END SOLUTION

# %%
exercises.check("06-blockwise-quantize", blockwise_quantize)

# %% [markdown]
# **Exercise 2.** Write the inverse, `blockwise_dequantize(q, scale, blocksize)`: element $i$
# of the flattened `q` belongs to block $i \,//\, \text{blocksize}$; return the float32 tensor
# $q_i / c_j$ with the shape of `q`.


# %%
### BEGIN SOLUTION
def blockwise_dequantize(q, scale, blocksize):
    """q_i / c_j for the block j = i // blocksize of each element, shaped like q."""
    block_of_each = torch.arange(q.numel()) // blocksize
    return (q.reshape(-1).float() / scale[block_of_each]).reshape(q.shape)


### END SOLUTION

# %%
exercises.check("06-blockwise-dequantize", blockwise_dequantize)

# %% [markdown]
# **Exercise 3.** Write `error_bound(x, bits, blocksize)`: for every element, the largest
# round-trip error $|x_i - \hat x_i|$ that blockwise absmax quantization can make there
# (section 2 derived it for a single block). Return a tensor with the shape of `x`.


# %%
### BEGIN SOLUTION
def error_bound(x, bits, blocksize):
    """The largest |x_i - dequant(quant(x))_i| each element can get (same shape as x)."""
    qmax = 2 ** (bits - 1) - 1
    flat = x.reshape(-1).float().abs()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    absmax = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, -1)
    half_step = absmax.amax(dim=1) / (2 * qmax)
    return half_step[torch.arange(n) // blocksize].reshape(x.shape)


### END SOLUTION

# %%
exercises.check("06-error-bound", error_bound)
