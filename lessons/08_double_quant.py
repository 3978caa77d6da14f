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
# # Lesson 8 — Double quantization: 0.5 → 0.127 bits
#
# Lesson 6 paid for blockwise quantization with one float32 absmax per block of 64 values:
# $32/64 = 0.5$ extra bits per parameter, 12.5 % on top of a 4-bit code. QLoRA's **double
# quantization** (DQ) quantizes those absmax values too. This lesson derives the lecture's
# $0.5 \to 0.127$ bits, builds the second level step by step, checks it against
# `quant.quantize_4bit`, measures the bits on the tensors actually stored for a 4096 × 4096
# weight, recomputes "about 3 GB saved on a 65B model", and measures what DQ costs in accuracy.
#
# **You will learn:** the two-level storage layout, why the mean is subtracted, the signed
# 8-bit dynamic map, the exact bit accounting, and the size of the extra error.

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

from pedaPEFT import exercises, figures, quant

# %% [markdown]
# ## 1. The arithmetic on the slide
#
# Without DQ each block of $B_1 = 64$ weights stores one 32-bit absmax. With DQ each absmax
# becomes an 8-bit code, and every block of $B_2 = 256$ such codes stores one 32-bit scale of
# its own:
#
# $$\frac{32}{64} = 0.5 \quad\longrightarrow\quad \frac{8}{64} + \frac{32}{64 \cdot 256}
#   = 0.125 + 0.001953125 = 0.126953125 \approx 0.127 \text{ bits per parameter.}$$

# %%
without = 32 / 64
with_dq = 8 / 64 + 32 / (64 * 256)
print(f"constants without DQ: {without} bits/param, with DQ: {with_dq} bits/param")
print(f"saved: {without - with_dq} bits/param")
print(f"total with 4-bit codes: {quant.bits_per_parameter(double_quant=False)} -> "
      f"{quant.bits_per_parameter(double_quant=True)}")

# %% [markdown]
# The lecture's 0.5 and 0.127 are right (0.127 is 0.126953125 rounded), and the saving is
# $0.373046875$ bits per parameter, the QLoRA paper's "0.373".
#
# ## 2. The second level, step by step
#
# Take a 4096 × 4096 weight (the size of one LLaMA-7B attention projection), normally
# distributed with standard deviation 0.02, in bfloat16. First level, as in lesson 7: one
# absmax per 64 values, 262,144 of them.

# %%
generator = torch.Generator().manual_seed(0)
W = (torch.randn(4096, 4096, generator=generator) * 0.02).to(torch.bfloat16)
plain = quant.quantize_4bit(W, double_quant=False)
absmax = plain.absmax
print("first-level absmax:", tuple(absmax.shape), absmax.dtype,
      f"| min {float(absmax.min()):.4f}, mean {float(absmax.mean()):.4f}, "
      f"max {float(absmax.max()):.4f}")

# %% [markdown]
# All absmax values are positive and crowd around their mean. A symmetric code (one that has
# as many negative as positive levels) would waste its negative half on them, so QLoRA
# **subtracts the mean** first ("we subtract the mean from $c_2$ … to center the values around
# zero and make use of symmetric quantization"). The centred values are then quantized
# blockwise, 256 at a time, with the signed 8-bit **dynamic map**.

# %%
offset = absmax.mean()
centred = absmax - offset
print(f"offset (mean absmax) = {float(offset):.6f}; centred range "
      f"[{float(centred.min()):.5f}, {float(centred.max()):.5f}]")

# %% [markdown]
# ### The dynamic map, built by hand
#
# The dynamic map (Dettmers, 2015, "8-bit approximations for parallelism in deep learning")
# is a small floating-point format with a **decimal** exponent. Read an 8-bit code as
#
# * 1 sign bit;
# * then a run of $z$ zero bits, $z = 0 \dots 6$: the exponent, the value is scaled by
#   $10^{-z}$;
# * then a 1, the indicator bit that ends the run;
# * then the remaining $7 - 1 - z = 6 - z$ bits: a linear **fraction** $f$, one of
#   $2^{6-z}$ levels evenly spread over $(0.1, 1)$ — the midpoints of $2^{6-z}$ equal bins
#   of $[0.1, 1]$.
#
# Many zeros (a small exponent) leave few fraction bits: there are 64 levels between 0.1 and
# 1 but a single one between $10^{-7}$ and $10^{-6}$. bitsandbytes
# (`create_dynamic_map(signed=True)`) lists the values $\pm 10^{-z} f$ of every $z$, adds 0
# and 1, and sorts them; a code is the **index** into that sorted table of 256 values. We
# compute each decade in float32, with `torch.linspace`, as bitsandbytes does:

# %%
def decade(zeros, fraction_bits, dtype=torch.float32):
    """The magnitudes 10^-zeros * f, f the midpoints of 2^fraction_bits equal bins of [0.1, 1]."""
    edges = torch.linspace(0.1, 1.0, 2**fraction_bits + 1, dtype=dtype)
    fractions = (edges[:-1] + edges[1:]) / 2
    return 10.0**-zeros * fractions


levels = [0.0, 1.0]
print(" z  fraction bits  values  smallest    largest")
for zeros in range(7):
    fraction_bits = 6 - zeros
    magnitudes = decade(zeros, fraction_bits)
    levels += magnitudes.tolist() + (-magnitudes).tolist()
    print(f"{zeros:>2}  {fraction_bits:>13}  {2 * magnitudes.numel():>6}  "
          f"{float(magnitudes.min()):.4e}  {float(magnitudes.max()):.4e}")
dynamic_by_hand = torch.tensor(sorted(levels), dtype=torch.float32)
print("values:", dynamic_by_hand.numel(), "= 2 x (1 + 2 + ... + 64) + 0 + 1")
print("negative:", int((dynamic_by_hand < 0).sum()), "| zero:", int((dynamic_by_hand == 0).sum()),
      "| positive:", int((dynamic_by_hand > 0).sum()))

# %% [markdown]
# 127 negative values, 0 and 128 positive ones: the extra 1.0 makes the map asymmetric, so
# $-1$ has no code (the most negative value is $-0.99297$). The package's map, which the rest
# of the lesson uses, must be *exactly* this one, bit for bit:

# %%
dynamic = quant.dynamic_code()
print("hand-built map == quant.dynamic_code():", torch.equal(dynamic_by_hand, dynamic))
print("smallest magnitudes:", [f"{v:.2e}" for v in dynamic[128:132].tolist()])
print("largest:", [f"{v:.4f}" for v in dynamic[-4:].tolist()], "| most negative:",
      f"{float(dynamic[0]):.5f}")
in_float64 = [0.0, 1.0]
for zeros in range(7):
    magnitudes64 = decade(zeros, 6 - zeros, torch.float64)
    in_float64 += magnitudes64.tolist() + (-magnitudes64).tolist()
rounded_once = torch.tensor(sorted(in_float64), dtype=torch.float32)
steps_apart = (rounded_once.view(torch.int32) - dynamic.view(torch.int32)).abs()
print(f"the same map computed in float64, rounded once: {int((steps_apart > 0).sum())} of 256 "
      f"values differ, by at most {int(steps_apart.max())} float32 step(s)")

# %% [markdown]
# "Exactly" is meant literally: computed in float64 and rounded to float32 only at the end,
# the same formula lands one float32 step away in some entries. Stored codes index the table,
# so a reimplementation must compute it the way bitsandbytes does (float32 `linspace`,
# midpoints, then the power of ten) — as `quant.dynamic_code` does, and as the test suite
# checks against bitsandbytes itself.
#
# **The same data type in 8-bit optimizers.** bitsandbytes' 8-bit Adam stores both optimizer
# states blockwise in 8 bits with it: the first moment $m$ (signed) with the map above, the
# second moment $v \ge 0$ with the **unsigned** map (`create_dynamic_map(signed=False)`),
# where no sign is needed and the sign bit becomes one more fraction bit: $2^{7-z}$ values per
# decade, $2 + 4 + \dots + 128 = 254$ positive values, plus 0 and 1.

# %%
unsigned_levels = [0.0, 1.0]
for zeros in range(7):
    unsigned_levels += decade(zeros, 7 - zeros).tolist()
unsigned_by_hand = torch.tensor(sorted(unsigned_levels), dtype=torch.float32)
print("unsigned map:", unsigned_by_hand.numel(), "values, all >= 0:",
      bool((unsigned_by_hand >= 0).all()))
print("hand-built == quant.dynamic_code(signed=False):",
      torch.equal(unsigned_by_hand, quant.dynamic_code(signed=False)))

# %% [markdown]
# Fine steps near zero, coarse ones near ±1, over seven decades of magnitude: the paper calls
# the second level "8-bit Floats"; bitsandbytes uses this map, not an FP8 (E4M3/E5M2) format.
#
# Now quantize: each block of 256 centred values is divided by its own absmax (a float32, the
# "second-level constant") and every value becomes the index of the nearest map level.

# %%
codes, second_level = quant.quantize_blockwise_8bit(centred, blocksize=256)
rebuilt = quant.dequantize_blockwise_8bit(codes, second_level, blocksize=256) + offset
print("codes:", tuple(codes.shape), codes.dtype, "| second-level scales:",
      tuple(second_level.shape), second_level.dtype)
relative = (rebuilt - absmax).abs() / absmax
print(f"rebuilt absmax, relative error: mean {float(relative.mean()):.5f}, "
      f"max {float(relative.max()):.5f}")

# %% [markdown]
# The figure shows both halves. Left: the 256 levels of the dynamic map on a log scale — seven
# decades of magnitude, most codes spent near ±1 and a few per decade down to $5.5 \times
# 10^{-7}$. Right: the relative error of every rebuilt absmax against its true value. Blocks
# whose absmax is close to the mean are centred near zero, where the map is finest, and come
# back almost exactly; the error grows with the distance from the mean, staying within ±1 %.

# %%
figure = figures.double_quant_absmax()
plt.show()

# %% [markdown]
# That is exactly what `quant.quantize_4bit(..., double_quant=True)` stores (its default). The
# 4-bit codes themselves do not change — they were chosen with the exact absmax:

# %%
state = quant.quantize_4bit(W)  # NF4, blocksize 64, double quantization, dq_blocksize 256
print("same 8-bit codes:", torch.equal(state.absmax, codes),
      "| same scales:", torch.equal(state.nested_absmax, second_level),
      "| same offset:", torch.equal(state.offset, offset))
print("same 4-bit codes as without DQ:", torch.equal(state.packed, plain.packed))
print("same rebuilt absmax:", torch.equal(quant.dequantize_absmax(state), rebuilt))

# %% [markdown]
# ## 3. Bits counted on the stored tensors
#
# `quant.storage_bits` counts every tensor the state holds — codes, scales, the offset and
# both code tables — and `quant.storage_bits_per_parameter` divides by the parameter count:

# %%
for name, s in (("without DQ", plain), ("with DQ", state)):
    parts = quant.storage_bits(s)
    print(f"{name}: " + ", ".join(f"{key} {value:,}" for key, value in parts.items()))
    print(f"   -> {quant.storage_bits_per_parameter(s):.5f} bits per parameter "
          f"(formula: {quant.bits_per_parameter(double_quant=name == 'with DQ'):.5f})")

# %% [markdown]
# Measured: **4.1275** bits per parameter with DQ and **4.5003** without. The formula's
# 4.12695 and 4.5 leave out the per-tensor constants: the 16-entry NF4 table (512 bits), the
# 256-entry dynamic map (8,192 bits) and the offset (32 bits) — 0.0005 bits per parameter on
# this weight, negligible for any large layer.
#
# ## 4. "About 3 GB saved on a 65B model"
#
# The lecture says DQ saves "around 3 GB for massive models like LLaMA-65B":

# %%
saved_bits = 32 / 64 - (8 / 64 + 32 / (64 * 256))
for name, n in (("LLaMA-65B", 65e9), ("LLaMA-7B", 7e9)):
    saved = saved_bits * n / 8
    print(f"{name}: {saved / 1e9:.3f} GB = {saved / 2**30:.3f} GiB saved; 4-bit weights "
          f"{n * 4.5 / 8 / 1e9:.2f} GB -> {n * quant.bits_per_parameter() / 8 / 1e9:.2f} GB")

# %% [markdown]
# $0.373046875 \times 65 \times 10^9 / 8 = 3.03$ GB (2.82 GiB): the lecture's "around 3 GB"
# holds, counted as if every parameter were quantized. In practice only the linear layers
# are; embeddings and norms stay in 16 bits, so the real saving is slightly smaller.
#
# > **Erratum.** The lecture's QLoRA slide says "we use NF4 for $W$ and FP8 for $c_1$" and
# > writes $\text{doubleDequant}(c_1, c_2, W) = \text{dequant}(\text{dequant}(c^{FP32},
# > X^{Int32}), W^{4bit}) = X^{Int8}/c^{FP32}$. In the QLoRA paper the 8-bit quantity is
# > $c_2$ (the first-level absmax values, quantized), while $c_1$ — the second-level scales —
# > stays float32: $\text{doubleDequant}(c_1^{FP32}, c_2^{k\text{-bit}}, W^{NF4}) =
# > \text{dequant}(\text{dequant}(c_1^{FP32}, c_2^{k\text{-bit}}), W^{4bit})$. The last
# > equality on the slide is copied from the int8 formula and does not belong there. The
# > "FP8" is bitsandbytes' 8-bit dynamic map, section 2.
#
# ## 5. What DQ costs in accuracy
#
# The rebuilt absmax is off by 0.16 % on average and by at most 1 % (section 2). Every
# weight of a block is scaled by it, so the weight error grows a little:

# %%
for name, s in (("without DQ", plain), ("with DQ", state)):
    error = quant.dequantize_4bit(s).float() - W.float()
    rms = float(error.pow(2).mean().sqrt() / W.float().pow(2).mean().sqrt())
    print(f"{name}: relative RMS error {100 * rms:.4f} %, mean |error| "
          f"{float(error.abs().mean()):.3e}")
both = quant.dequantize_4bit(state).float() - quant.dequantize_4bit(plain).float()
print(f"weights changed by DQ: {100 * float((both != 0).float().mean()):.1f} %")

# %% [markdown]
# The 4-bit rounding error (9.2 % of the weights' RMS) dwarfs what DQ adds: the relative RMS
# error goes from 9.1991 % to 9.2015 %. Only a quarter of the bfloat16 weights change at all,
# because most absmax errors are smaller than bfloat16's resolution ($2^{-8} \approx 0.4$ %).
# For 0.373 bits per parameter that is a good trade, and it is why QLoRA turns DQ on.
#
# A note on implementations: bitsandbytes' CUDA kernels pick the exact nearest 8-bit code,
# while its CPU backend looks codes up in a 65,536-entry table and lands one level off for
# about 0.2 % of the absmax values. `quant` picks the exact nearest by default on every device
# and reproduces the CPU table with `dq_rounding="cpu_lut"`:

# %%
lut_state = quant.quantize_4bit(W, dq_rounding="cpu_lut")
moved = (lut_state.absmax != state.absmax).float().mean()
print(f"8-bit codes that differ: {100 * float(moved):.2f} %")

# %% [markdown]
# ## Summary
#
# * DQ stores each 64-block absmax as an 8-bit code (mean subtracted, dynamic map) plus one
#   float32 scale per 256 codes: $8/64 + 32/(64 \cdot 256) = 0.127$ bits instead of 0.5.
# * The dynamic map is a decimal-exponent float format (sign, a run of zeros for $10^{-z}$, an
#   indicator bit, $6 - z$ fraction bits), built here by hand and equal to `quant.dynamic_code()`
#   bit for bit; its unsigned variant (`signed=False`) holds 8-bit Adam's second moment.
# * Measured on a 4096 × 4096 weight: 4.1275 bits per parameter with DQ, 4.5003 without.
# * The 65B saving is 3.03 GB; the extra weight error is tiny next to the 4-bit rounding.
#
# ## Exercises
#
# Each exercise asks for a function; the check cell under it compares your function with the
# package on random weights, and its hint names what is off.
#
# **Exercise 1.** Write `double_quantize(absmax, blocksize)`, the second level of section 2
# without `quant.quantize_blockwise_8bit`: subtract the mean of the first-level `absmax`
# values, cut the centred values into blocks of `blocksize` (the last may be shorter), scale
# each block by its own largest magnitude and replace each value by the index of the nearest
# level of `quant.dynamic_code()`. Return `(codes, scales, offset)`: uint8 codes, one float32
# scale per block, and the mean.


# %%
### BEGIN SOLUTION
def double_quantize(absmax, blocksize):
    """8-bit codes of the centred absmax values, one scale per block, and the offset."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(centred, (0, n_blocks * blocksize - n)).view(n_blocks, -1)
    scales = blocks.abs().amax(dim=1)
    scaled = (blocks / scales[:, None]).reshape(-1)[:n]
    code = quant.dynamic_code()
    codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return codes, scales, offset


### END SOLUTION

# %%
exercises.check("08-double-quant", double_quantize)

# %% [markdown]
# **Exercise 2.** Write `bits_per_parameter(blocksize, double_quant, dq_blocksize)`: the bits
# stored per parameter by 4-bit blockwise quantization, with or without double quantization
# (code tables and the offset ignored). The check tries blocksizes from 32 to 256.


# %%
### BEGIN SOLUTION
def bits_per_parameter(blocksize, double_quant, dq_blocksize):
    """Bits stored per parameter: the 4-bit code plus its share of the block constants."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)
    return 4 + 32 / blocksize


### END SOLUTION

# %%
exercises.check("08-bits-per-parameter", bits_per_parameter)

# %% [markdown]
# **Exercise 3.** Write `rebuild_absmax(state)`: the float32 absmax of every block of a
# double-quantized `QuantState`, from its stored fields only (`absmax`, `nested_code`,
# `nested_absmax`, `dq_blocksize`, `offset`), without `quant.dequantize_absmax`.


# %%
### BEGIN SOLUTION
def rebuild_absmax(state):
    """The first-level absmax of each block, rebuilt from the double-quantized fields."""
    block_of_each = torch.arange(state.absmax.numel()) // state.dq_blocksize
    values = state.nested_code[state.absmax.long()]
    return values * state.nested_absmax[block_of_each] + state.offset


### END SOLUTION

# %%
exercises.check("08-rebuild-absmax", rebuild_absmax)
