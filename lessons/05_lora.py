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
# # Lesson 5 — LoRA: low-rank adaptation
#
# Lessons 1 and 2 showed that a rank-$r$ matrix is a product of a tall and a wide matrix, and
# that fine-tuning updates tend to be nearly low rank. LoRA (Hu et al., 2021) turns this into
# a fine-tuning method: keep the pretrained weight $W_0 \in \mathbb{R}^{d \times k}$ frozen
# and learn only a low-rank change,
#
# $$h = W_0 x + \Delta W x = W_0 x + \frac{\alpha}{r} B A x, \qquad
# B \in \mathbb{R}^{d \times r},\; A \in \mathbb{R}^{r \times k},\; r \ll \min(d, k).$$
#
# Only $A$ and $B$ train: $r(d + k)$ numbers instead of $dk$. After training, $\Delta W$ can
# be added into $W_0$, so the fine-tuned model runs exactly as fast as the original.
#
# This lesson builds a LoRA layer step by step and checks it against `pedaPEFT.lora` (whose
# semantics are those of Hugging Face PEFT, checked by the test suite against PEFT itself),
# then recomputes every LoRA number of the lecture: the $B \times A$ example (the slide's
# product is wrong in most entries), the scaling $\alpha/r$, the PEFT printout for mt0-large,
# and the GPT-3 tables. It ends with a small reproduction of the LoRA paper's tables 5 and 6
# on our own GPT.
#
# **You will learn:** $\Delta W = BA$ and why $\operatorname{rank}(\Delta W) \le r$; PEFT's
# initialisation (so the output is unchanged at the start); why the update is scaled by
# $\alpha/r$; merging with zero inference cost; counting LoRA parameters of a real model
# exactly; which weights and which rank to adapt.

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
from torch import nn

from pedaPEFT import exercises, experiments, figures, gpt, lora

np.set_printoptions(precision=4, suppress=True)
torch.set_printoptions(precision=4, sci_mode=False)

# %% [markdown]
# ## 1. The lecture's $\Delta W = BA$, recomputed
#
# The lecture illustrates LoRA with $r = 2$ and $d = k = 4$:
#
# $$\Delta W = BA = \begin{bmatrix} 0.3 & -0.14 \\ -0.42 & 0.201 \\ 0.46 & 0.38 \\
# 0.5 & 0.14 \end{bmatrix}
# \begin{bmatrix} 0.1 & -0.44 & 0.04 & 1.42 \\ -0.92 & 0.1 & 1.62 & -1.33 \end{bmatrix}
# = \begin{bmatrix} 0.15 & -0.14 & -0.21 & 0.612 \\ -0.22 & 0.204 & 0.308 & -0.86 \\
# -0.30 & -0.16 & 0.634 & 0.147 \\ -0.07 & -0.2 & 0.246 & 0.523 \end{bmatrix}.$$
#
# Entry $(i, j)$ of $BA$ is $\sum_{l=1}^{r} B_{il} A_{lj}$, a sum of $r = 2$ products. Let us
# multiply it out and compare with the slide.

# %%
B_slide = np.array([[0.3, -0.14], [-0.42, 0.201], [0.46, 0.38], [0.5, 0.14]])
A_slide = np.array([[0.1, -0.44, 0.04, 1.42], [-0.92, 0.1, 1.62, -1.33]])
product_slide = np.array(
    [
        [0.15, -0.14, -0.21, 0.612],
        [-0.22, 0.204, 0.308, -0.86],
        [-0.30, -0.16, 0.634, 0.147],
        [-0.07, -0.2, 0.246, 0.523],
    ]
)
decimals_shown = np.array([[2, 2, 2, 3], [2, 3, 3, 2], [2, 2, 3, 3], [2, 1, 3, 3]])
product = B_slide @ A_slide
print("B @ A =\n", product)
print("first entry by hand: 0.3*0.1 + (-0.14)*(-0.92) =", round(0.3 * 0.1 + 0.14 * 0.92, 6))

# %% [markdown]
# The slide shows each entry with one to three decimals. Rounding the true product to the
# same number of decimals should reproduce the slide. It does not; **truncating** (dropping
# the digits, toward zero) does:

# %%
rounded = np.vectorize(lambda x, d: round(x, int(d)))(product, decimals_shown)
truncated = np.trunc(product * 10.0**decimals_shown) / 10.0**decimals_shown
exact = np.isclose(product, product_slide, atol=1e-12)
rounds_right = np.isclose(rounded, product_slide, atol=1e-12)
print("slide entries equal to the exact product:   ", int(exact.sum()), "of 16")
print("slide entries equal to the correctly rounded:", int(rounds_right.sum()), "of 16")
print("slide entries equal to the truncated product:",
      int(np.isclose(truncated, product_slide, atol=1e-12).sum()), "of 16")
print("\n(i, j)  slide    exact     rounded")
for i, j in zip(*np.nonzero(~rounds_right), strict=True):
    print(f"({i + 1}, {j + 1})  {product_slide[i, j]:>6}  {product[i, j]:>8.5f}  "
          f"{rounded[i, j]:>6}")

# %% [markdown]
# > **Erratum.** Only entry $(3, 3) = 0.634$ of the slide's $\Delta W$ is exact. All sixteen
# > entries are the product *truncated* toward zero to the decimals shown, so 9 of them are
# > off by one in the last digit: the correctly rounded values are
# > $(1,1)\ 0.16$, $(1,2)\ -0.15$, $(2,1)\ -0.23$, $(2,2)\ 0.205$, $(2,3)\ 0.309$,
# > $(3,4)\ 0.148$, $(4,1)\ -0.08$, $(4,3)\ 0.247$, $(4,4)\ 0.524$. The largest error,
# > $0.0088$, is in $(1,1)$ ($0.1588$, shown as $0.15$) and $(4,1)$ ($-0.0788$, shown as
# > $-0.07$).
#
# ## 2. $\operatorname{rank}(\Delta W) \le r$
#
# Every column of $BA$ is $B$ times a column of $A$, so it lies in the span of the $r$ columns
# of $B$: $\operatorname{rank}(BA) \le \min(\operatorname{rank} B, \operatorname{rank} A) \le
# r$. The slide's $4 \times 4$ update has rank 2, and its $16$ numbers are generated by
# $8 + 8 = 16$ — no saving at this toy size ($r(d + k) < dk$ needs $r < 2$ here). At real sizes
# the saving is large: a $1024 \times 1024$ weight with $r = 8$ needs $16{,}384$ numbers
# instead of $1{,}048{,}576$ (1.6%).

# %%
print("rank of the slide's BA:", np.linalg.matrix_rank(product))
generator = torch.Generator().manual_seed(0)
for r in (1, 4, 16):
    B = torch.randn(256, r, generator=generator, dtype=torch.float64)
    A = torch.randn(r, 512, generator=generator, dtype=torch.float64)
    print(f"r={r:>2}: rank(BA) = {torch.linalg.matrix_rank(B @ A).item():>2}, "
          f"numbers stored {r * (256 + 512):>6} instead of {256 * 512}")

# %% [markdown]
# ## 3. A LoRA layer, step by step
#
# PEFT (and the LoRA authors' own `loralib`) make three choices that the paper describes only
# loosely:
#
# * **Shapes.** `lora_A` is $r \times k$ (`in_features`), `lora_B` is $d \times r$
#   (`out_features`), like the weights of two `nn.Linear` layers $k \to r \to d$.
# * **Initialisation.** $A$ gets PyTorch's default Linear init, `kaiming_uniform_` with
#   $a = \sqrt 5$, which is $U(-1/\sqrt{k}, 1/\sqrt{k})$; $B = 0$. So $\Delta W = 0$ at the
#   start and the model computes exactly what the pretrained model computed. (The paper says
#   "random Gaussian" for $A$; the code uses uniform.)
# * **Scaling and dropout.** The branch is multiplied by $s = \alpha/r$ (or $\alpha/\sqrt r$
#   with rsLoRA), after $B$; dropout is applied to the branch's input only, never to $W_0 x$.
#
# Here is the forward pass of one layer written out, for a frozen `nn.Linear(64, 32)`:

# %%
torch.manual_seed(0)
base = nn.Linear(64, 32)
r, alpha = 4, 8
A = torch.empty(r, 64)
nn.init.kaiming_uniform_(A, a=5**0.5)
B = torch.zeros(32, r)
s = alpha / r
x = torch.randn(5, 64)
h_by_hand = base(x) + s * (x @ A.T @ B.T)
print("A within ±1/sqrt(64):", bool(A.abs().max() <= 1 / 8), "| B all zero:", bool((B == 0).all()))
print("output unchanged at init:", torch.equal(h_by_hand, base(x)))

# %% [markdown]
# The package's `LoRALinear` does the same. We give it our $A$ and a nonzero $B$ (as after
# some training) and compare; we also check that only $A$ and $B$ are trainable and that
# there are $r(k + d)$ of them.

# %%
layer = lora.LoRALinear(base, r=r, alpha=alpha)
print("package: A", tuple(layer.lora_A.shape), "B", tuple(layer.lora_B.shape),
      "scaling", layer.scaling)
print("package output unchanged at init:", torch.equal(layer(x), base(x)))
B_trained = 0.1 * torch.randn(32, r)
with torch.no_grad():
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B_trained)
h_by_hand = base(x) + s * (x @ A.T @ B_trained.T)
print("same output as by hand:", torch.allclose(layer(x), h_by_hand, atol=1e-6))
print("trainable:", [name for name, p in layer.named_parameters() if p.requires_grad])
print("trainable count:", lora.count_parameters(layer)[0], "= r(k + d) =", r * (64 + 32))
print("rank of delta_weight():", torch.linalg.matrix_rank(layer.delta_weight()).item())

# %% [markdown]
# ## 4. Why scale by $\alpha/r$?
#
# The lecture says $\alpha$ "helps in stabilizing other hyperparameters, such as learning
# rates, when the rank is varied", and that "both $\alpha$ and $r$ need to be tuned". The
# paper is more specific: *"When optimizing with Adam, tuning $\alpha$ is roughly the same as
# tuning the learning rate … we simply set $\alpha$ to the first $r$ we try and do not tune
# it."*
#
# Why should the learning rate depend on $r$ at all? Adam moves every entry of $B$ by about
# the learning rate $\eta$ per step, whatever the gradient's size. $\Delta W = sBA$ sums $r$
# such rank-one terms, and when the gradient pushes them the same way they add up, so the
# change one step makes to $\Delta W$ grows with $r$ — with $s = 1$, a larger $r$ acts like a
# larger learning rate. Dividing by $r$ cancels growth proportional to $r$.
#
# We measure it on the planted low-rank regression task of lesson 2 (a frozen $64 \times 96$
# layer whose targets need a rank-4 change), training only $A$ and $B$ with Adam:
#
# * left: $\|\Delta W\|_F$ after 10 steps at one learning rate, for $r = 1 \dots 64$;
# * right: the loss after 20 steps against the learning rate, for $r \in \{1, 4, 16, 64\}$,
#   with $s = \alpha/r$ ($\alpha = 8$) and with no scaling ($s = 1$).

# %%
scaling_results = experiments.alpha_scaling()
print("||dW||_F after 10 steps at lr 1e-3")
print("rule            " + " ".join(f"r={r:<5}" for r in scaling_results["ranks"]))
for rule, values in scaling_results["norms"].items():
    print(f"{rule:<15} " + " ".join(f"{v:<7.3f}" for v in values))
print("\nbest learning rate after 20 steps (of", len(scaling_results["lrs"]), "tried)")
for rule, per_rank in scaling_results["losses"].items():
    best = {r: scaling_results["lrs"][int(np.argmin(v))] for r, v in per_rank.items()}
    print(f"{rule:<7}", "  ".join(f"r={r}: {lr:.4f}" for r, lr in best.items()))

# %%
fig = figures.lora_alpha_scaling(scaling_results)
plt.show()

# %% [markdown]
# With no scaling the update one learning rate produces grows about tenfold from $r = 1$ to
# $r = 64$, the loss curves slide to the left as $r$ grows, and the largest learning rate
# that works for $r = 1$ makes $r = 64$ worse. With $\alpha/r$ the curves for $r \ge 4$ lie
# nearly on top of each other and the best learning rate is the same for every $r$: tune it
# once, then change $r$ freely. The compensation is not exact — here $\alpha/r$ over-corrects
# (the update *shrinks* about 3.5× from $r = 1$ to $64$) while $\alpha/\sqrt r$ under-corrects
# (it grows about 2×): the measured growth without scaling is closer to $\sqrt r$ than to $r$
# on this problem, which is the regime rsLoRA (Kalajdzievski, 2023) argues for at large $r$.
#
# ## 5. Merging: zero inference cost
#
# After training, $W = W_0 + \frac{\alpha}{r}BA$ is one ordinary matrix. `merge()` writes it
# into the base weight (PEFT's `merge`), and `lora.merge_lora(model)` does that for every
# layer and puts plain `nn.Linear` modules back (PEFT's `merge_and_unload`): the merged model
# has exactly the original architecture and parameter count, and computes the same outputs.

# %%
torch.manual_seed(0)
model = gpt.GPT(gpt.GPTConfig.preset("tiny"))
n_base = sum(p.numel() for p in model.parameters())
wrapped = lora.apply_lora(model, lora.LoRAConfig(r=8, alpha=16, target_modules=("q", "v")))
print("wrapped:", len(wrapped), "layers, e.g.", wrapped[:2])
lora.print_trainable_parameters(model)
with torch.no_grad():  # pretend training moved B away from zero
    for layer in lora.lora_layers(model).values():
        layer.lora_B.normal_(std=0.02)
idx = torch.randint(0, model.config.vocab_size, (4, model.config.block_size))
_ = model.eval()
logits_lora = model(idx)
merged = lora.merge_lora(model)
logits_merged = merged(idx)
print("Linear modules after merge:",
      sum(isinstance(m, nn.Linear) for m in merged.modules()), "| LoRA layers left:",
      len(lora.lora_layers(merged)))
n_merged = sum(p.numel() for p in merged.parameters())
print("parameters after merge == before LoRA:", n_merged == n_base)
print("max |logits difference| < 1e-5:", (logits_lora - logits_merged).abs().max().item() < 1e-5)

# %% [markdown]
# The outputs agree to float32 rounding ($10^{-6}$ relative), not bit for bit: $(W_0 + \Delta
# W)x$ and $W_0 x + \Delta W x$ round differently. The same is true of `unmerge()`, which
# subtracts $\Delta W$ again: $(W_0 + \Delta W) - \Delta W$ is $W_0$ only up to rounding,
# which is why PEFT (and `pedaPEFT`) keep `merged` flags and refuse to merge twice.
#
# The lecture's point about flexibility follows: one frozen base can serve many tasks, each a
# small $(A, B)$ file; switching tasks means subtracting one $BA$ and adding another.
# `serialization.save_lora_adapter` writes exactly PEFT's files (`adapter_model.safetensors` and
# `adapter_config.json`), which PEFT's `PeftModel.from_pretrained` loads (tested).
#
# ## 6. The lecture's PEFT printout for mt0-large, recomputed
#
# The lecture applies `LoraConfig(task_type=SEQ_2_SEQ_LM, r=8, lora_alpha=32,
# lora_dropout=0.1)` to `bigscience/mt0-large` and shows
#
# `trainable params: 2359296 || all params: 1231940608 || trainable%: 0.19151053100118282`
#
# We recompute both counts from the model's published shape (mt0-large is an mT5-large:
# `d_model` 1024, 16 heads of `d_kv` 64, `d_ff` 2816 with a gated GELU — two input matrices
# `wi_0`, `wi_1` and one output `wo` — 24 encoder and 24 decoder layers, a 250,112-token
# vocabulary, an output head *not* tied to the embedding, no biases, RMS layer norms with a
# weight only, and a relative position bias of 32 buckets × 16 heads in the first layer of
# each stack). For `SEQ_2_SEQ_LM` T5 models PEFT's default targets are `q` and `v`, in every
# attention: encoder self-attention, decoder self-attention and decoder cross-attention.

# %%
d_model, n_heads, d_kv, d_ff, vocab, layers, buckets = 1024, 16, 64, 2816, 250_112, 24, 32
inner = n_heads * d_kv
attention = 4 * d_model * inner  # q, k, v, o without biases
feed_forward = 3 * d_model * d_ff  # wi_0, wi_1, wo
encoder_layer = attention + feed_forward + 2 * d_model  # two RMS norms
decoder_layer = 2 * attention + feed_forward + 3 * d_model  # self + cross attention
counts = {
    "shared embedding": vocab * d_model,
    "encoder layers": layers * encoder_layer + n_heads * buckets + d_model,
    "decoder layers": layers * decoder_layer + n_heads * buckets + d_model,
    "lm_head (untied)": vocab * d_model,
}
base_total = sum(counts.values())
lora_layers = layers * 2 + layers * 2 + layers * 2  # q and v in 72 attention blocks
lora_trainable = lora_layers * 8 * (d_model + inner)  # r (in + out) each
for name, count in counts.items():
    print(f"{name:>18}: {count:>13,}")
print(f"{'base model':>18}: {base_total:>13,}")
print(f"{'LoRA q, v (r=8)':>18}: {lora_trainable:>13,}  ({lora_layers} layers)")
total = base_total + lora_trainable
print(f"\ntrainable params: {lora_trainable:,d} || all params: {total:,d} || "
      f"trainable%: {100 * lora_trainable / total:.4f}")
print("lecture's numbers reproduced:", (lora_trainable, total) == (2_359_296, 1_231_940_608))
print("unrounded percentage:", 100 * lora_trainable / total)

# %% [markdown]
# Both counts and the percentage are exactly right — note that "all params" *includes* the
# LoRA parameters (the base model has 1,229,581,312). The test suite checks the same count
# with PEFT itself on the real mT5 module tree (built on PyTorch's `meta` device, so nothing is
# downloaded or allocated). Only the format has changed: since PEFT 0.11 the line prints
# thousands separators and four decimals, as `lora.print_trainable_parameters` does.
#
# > **Erratum (naming).** The lecture says the `get_path_model` function applies LoRA to each
# > layer; the function is `get_peft_model` (as in its own code cell above it).
#
# ## 7. The GPT-3 numbers of the slides
#
# For GPT-3 175B ($L = 96$ layers, $d_{model} = 12{,}288$) LoRA on $W_q$ and $W_v$ has
# $|\Theta| = 2 \cdot L \cdot 2 d_{model} \cdot r$ parameters. The slides' counts follow:

# %%
L, d = 96, 12_288
def gpt3_lora(r, n_types):
    return n_types * L * 2 * d * r
print(f"table 5 budget, r=8 on one type:  {gpt3_lora(8, 1):>11,}  (slide: 18M)")
print(f"table 4, r_q = r_v = 1:           {gpt3_lora(1, 2):>11,}  (slide: 4.7M)")
print(f"table 4, r_q = r_v = 8:           {gpt3_lora(8, 2):>11,}  (slide: 37.7M)")
full_ft = 175_255.8e6
for trainable in (gpt3_lora(1, 2), gpt3_lora(8, 2)):
    ratio = full_ft / trainable
    print(f"175,255.8M / {trainable / 1e6:.1f}M = {ratio:,.0f}x = 10^{np.log10(ratio):.2f}")
print(f"RoBERTa-large LoRA 0.8M of 355M: {100 * 0.8 / 355:.3f}% | "
      f"DeBERTa XXL 4.7M of 1500M: {100 * 4.7 / 1500:.3f}%")

# %% [markdown]
# > **Erratum.** "LoRA reduces the number of trainable parameters in GPT-3 by 5 orders of
# > magnitude": the table's own numbers give $175{,}255.8\text{M} / 4.7\text{M} \approx 37{,}000$,
# > i.e. $10^{4.6}$ — between 4 and 5 orders, and $10^{3.7}$ for the 37.7M row. The paper
# > itself says "10,000 times". The "0.2% of weights trained" slide is right for RoBERTa-large
# > (0.23%); DeBERTa XXL trains 0.31%.
#
# ## 8. Which weights, which rank: tables 5 and 6 in miniature
#
# The paper's table 5 fixes a budget of 18M trainable numbers on GPT-3 and spends it on one
# attention matrix with $r = 8$, on two with $r = 4$, or on all four with $r = 2$; table 6
# varies $r$ from 1 to 64. We do the same on the pretrained tiny GPT of lesson 3, fine-tuned
# on the downstream task `shift` (replace every letter by the next one: the base can copy,
# but has never applied this map). The budget is $8 \cdot L \cdot 2d$. As in the paper
# $\alpha = 8$ is fixed (the first $r$ tried), so $s = 8/r$. One learning rate is chosen for
# LoRA from $\{10^{-3}, 3 \cdot 10^{-3}, 10^{-2}, 3 \cdot 10^{-2}\}$ on a validation split
# (examples of the training stream that training never sees), with $\{W_q, W_v\}$, $r = 4$,
# and then used for every entry; each entry is run with 3 seeds (the seed changes $A$'s
# initialisation and the order of the batches) and scored on the 512 test examples.
#
# We also run everything on a second, harder task, `reverse` (write the input backwards),
# which needs the attention to look at *different positions* than copying does.
#
# The full configuration is what `python -m pedaPEFT lora-experiment tables --scale full`
# (and `... --task reverse`) runs; the results ship with the package, in
# `pedaPEFT/results/lora_tables.json` and `lora_tables_reverse.json`, and the
# numbers below are read from those files:

# %%
tiny = gpt.GPTConfig.preset("tiny")
print(f"tiny GPT: L={tiny.n_layer}, d={tiny.n_embd}; budget 8*L*2d = "
      f"{8 * tiny.n_layer * 2 * tiny.n_embd:,} trainable numbers")
for name in ("lora_tables", "lora_tables_reverse"):
    results = experiments.load_results(name)
    full = results["config"]
    print(f"\n=== task {results['task']!r}: {full['steps']} steps, batch {full['batch_size']}, "
          f"{full['n_train']} training examples, seeds {full['seeds']}, "
          f"test set {full['n_test']}")
    print("made with the shipped base:", results["base_sha256"] == experiments.base_sha256())
    print(f"learning rate chosen on validation: {results['lr']['lora']:g} "
          f"(validation accuracy per lr: {results['lr_search']['lora']})")
    print(f"{results['distinct_runs']} fine-tuning runs, {results['seconds'] / 60:.1f} min on "
          f"{results['threads']} CPU thread(s)")
    for group, title in (("table5", "table 5 (equal budget)"), ("table6", "table 6 (rank)")):
        print(title)
        for s in experiments.summarize(results["runs"], group):
            targets = "{" + ",".join(s["options"]["targets"]) + "}"
            print(f"  {targets:<10} r={s['options']['r']:<3} trainable {s['trainable']:>7,}  "
                  f"exact match {100 * s['mean']:5.1f} ± {100 * s['std']:4.1f} %")

# %%
fig = figures.lora_tables()
plt.show()

# %% [markdown]
# What our miniature shows:
#
# * **Which weights matters more than anything else — and the answer depends on the task.**
#   `shift` keeps *where* the attention looks (the copy routing) and changes *what* is
#   written: $W_q$ or $W_k$ alone reach only 7.9% and 0.5%, while $W_v$ or $W_o$ alone reach
#   ≈100%. `reverse` keeps what is copied and changes where the attention looks: now $W_v$ and
#   $W_o$ alone score 0%, and $W_k$ alone succeeds in two seeds of three ($67 \pm 56\%$).
#   $W_q$ alone is poor on both tasks, as in the paper, where it is the weakest entry of
#   table 5.
# * **Spreading the budget is the safe choice.** $\{W_q, W_v\}$ at $r = 4$ and all four at
#   $r = 2$ are the only table-5 entries that score at least 95% on both tasks (99.9% and 99.9%
#   on `shift`; 99.5% and 95.3% on `reverse`) — the paper's conclusion that several matrices
#   with a small rank beat one matrix with a larger rank.
# * **Rank.** On `shift`, $\{W_q, W_v\}$ needs $r \ge 2$ ($r = 1$: $87 \pm 7\%$) and all four
#   matrices are at ≈100% already with $r = 1$. On `reverse` small ranks depend on the seed
#   ($r = 1$ and $2$ succeed in one or two seeds of three), $r = 4$ and $8$ are reliable, and
#   $r = 64$ on $\{W_q, W_v\}$ **fails** in two seeds of three: with $\alpha$ fixed at 8 the
#   scale $\alpha/r = 1/8$ makes the update small (section 4: $\alpha/r$ over-corrects), and
#   300 steps at one learning rate are not enough. More rank does not rescue the wrong matrix
#   either: $W_q$ alone at $r = 64$ (8 times the budget) reaches 10% on `shift`.
# * **Against the paper.** The directions agree: $W_q$ alone is the worst choice, a small $r$
#   suffices once several matrices are adapted, and a very large $r$ buys nothing. Our
#   differences are far larger than the paper's ±0.5%, because a tiny model on a synthetic
#   task either learns the one skill or does not, and every entry gets the same 300 steps and
#   learning rate. Note also that $r = 64$ is *not* low rank here: $d = 64$, so $A$ and $B$
#   hold twice as many numbers as the dense matrix (in the paper, $r = 64 \ll 12{,}288$).
#
# Now run the two extremes of table 5 yourself on `shift`, live: $W_q$ alone with $r = 8$
# and $\{W_q, W_v\}$ with $r = 4$, the same budget, one seed, at the learning rate chosen
# above for `shift`. LoRA learns `shift` more slowly than the adapters of lesson 4, so the
# run takes four times the small configuration's steps (printed below). One seed on a small
# test set is a demonstration, not a measurement: the tables above are the measurement.

# %%
from dataclasses import replace

small = experiments.SCALES["small"]
live = replace(small, steps=4 * small.steps)
lr = experiments.load_results("lora_tables")["lr"]["lora"]
base_shift = gpt.pretrained_info("tiny")["metrics"]["downstream/shift"]
print(live)
live_accuracy = {}
for options in (
    {"r": 8, "alpha": 8, "targets": ["q"]},
    {"r": 4, "alpha": 8, "targets": ["q", "v"]},
):
    row = experiments.run("lora", "shift", 0, live, options, lr=lr)
    live_accuracy[",".join(options["targets"])] = row["accuracy"]
    print(f"{options['targets']}, r={options['r']}, lr {lr:g}: trainable {row['trainable']:,} "
          f"of {row['total']:,}; exact match on 'shift' {base_shift:.3f} -> {row['accuracy']:.3f}")
assert live_accuracy["q,v"] >= 0.9, "LoRA on W_q, W_v did not learn 'shift' in the live run"
assert live_accuracy["q"] < 0.5, "W_q alone was expected to stay far below W_q, W_v"

# %% [markdown]
# $\{W_q, W_v\}$ learns `shift` in the run; $W_q$ alone, with the same number of trainable
# parameters, stays far below it, as in table 5 above.

# %% [markdown]
# One row on real text. Lesson 11 fine-tunes a small GPT pretrained on Python's documentation
# on documents it never saw (the `asyncio` docstrings) and scores held-out perplexity (lower is
# better) before and after; every adapter there has $r = 8$, $\alpha = 16$, the same learning
# rate, and 3 seeds. Its shipped results hold the two choices of this section:

# %%
from pedaPEFT import realtext

realtext_rows = {row["label"]: row for row in realtext.load_results()["summary"]}
print(f"{'':<17}{'trainable':>10}{'PPL before':>12}{'PPL after (mean ± std, 3 seeds)':>34}")
for label in ("LoRA q,v", "LoRA all-linear"):
    row = realtext_rows[label]
    print(f"{label:<17}{row['trainable']:>10,}{row['perplexity_before']:>12.1f}"
          f"{row['perplexity_after']:>25.1f} ± {row['perplexity_after_std']:.1f}")
ratio = realtext_rows["LoRA all-linear"]["trainable"] / realtext_rows["LoRA q,v"]["trainable"]
print(f"all-linear trains {ratio:.1f}x the parameters of q,v")

# %% [markdown]
# Adapting every linear layer at $r = 8$ trains 4.5 times as many parameters as $\{W_q, W_v\}$
# and ends at a lower held-out perplexity (28.9 ± 1.2 against 31.0 ± 0.4, from 35.1); the
# budgets differ, so unlike table 5 this does not say which matrices are better at an equal
# budget.

# %% [markdown]
# ## 9. What LoRA learns
#
# Section 8 asked which weights and which rank give the best accuracy. The LoRA paper's
# section 7 looks inside the learned update instead and asks three questions, each answered by
# one formula (the functions are in `pedaPEFT.subspace`):
#
# * **(a) How low is the rank of $\Delta W$?** The singular values of the update, and the
#   share of $\|\Delta W\|_F^2 = \sum_i \sigma_i^2$ its top 8 directions hold
#   (`subspace.energy_share`).
# * **(b) Do r = 8 and r = 64 learn the same directions?** With $U_{A_8}$ and $U_{A_{64}}$
#   the right singular vectors of the two learned $A$ matrices (largest first),
#   $$\phi(A_8, A_{64}, i, j) = \frac{\|U_{A_8}[:, {:}i]^\top\, U_{A_{64}}[:, {:}j]\|_F^2}
#   {\min(i, j)} \in [0, 1]$$
#   (`subspace.subspace_similarity`): 1 when the smaller subspace lies inside the larger,
#   0 when they are orthogonal, and $\max(i, j)/d$ on average for random subspaces of
#   $\mathbb{R}^d$ (`subspace.random_subspace_similarity`).
# * **(c) How does $\Delta W$ relate to $W$?** With $U$, $V$ the top left and right singular
#   vectors of $\Delta W$, $\|U^\top W V\|_F$ is how much of the pretrained $W$ lies in the
#   directions the update changes, and the **amplification factor**
#   $\|\Delta W\|_F / \|U^\top W V\|_F$ says how strongly the update amplifies them
#   (`subspace.amplification_factor`). The paper finds about 21 for GPT-3's $W_q$ at $r = 4$.
#
# We fine-tune the pretrained tiny GPT on `shift` three ways from the same start: **full
# fine-tuning** (every weight, learning rate $10^{-3}$ as chosen in lesson 4), and **LoRA with
# $r = 8$ and $r = 64$** on $\{W_q, W_v\}$ ($\alpha = 8$, learning rate $10^{-2}$, as in
# section 8). For full fine-tuning $\Delta W$ is the change of the weight, for LoRA it is
# $\frac{\alpha}{r}BA$. The live run below uses 100 steps per method (about 15 s on two
# cores); the full configuration follows it.

# %%
from pedaPEFT import lora_learns, subspace

live = {label: lora_learns.finetune_update(label, "shift", lora_learns.LIVE_SCALE, seed=0)
        for label in lora_learns.SETTINGS}
for label, run in live.items():
    print(f"{label:>4}: test exact match {run['accuracy']:.3f}")
layer_name = "blocks.1.attn.q"  # the paper looks at W_q of a middle layer
W = gpt.load_pretrained("tiny").get_submodule(layer_name).weight.detach().double()
deltas = {label: run["delta"][layer_name].double() for label, run in live.items()}

# %% [markdown]
# **(a) The spectrum.** The singular values of each $\Delta W$ of `blocks.1.attn.q`
# ($64 \times 64$), and the share of the squared norm in the top 8 directions. For scale: a
# random Gaussian $64 \times 64$ matrix puts about 38% there.

# %%
for label, delta in deltas.items():
    sigma = torch.linalg.svdvals(delta)
    top8 = float(sigma[:8].square().sum() / sigma.square().sum())
    assert abs(top8 - subspace.energy_share(delta, 8)) < 1e-12
    print(f"{label:>4}: ||dW||_F {float(delta.norm()):.3f}, sigma_1..6 "
          f"{[round(float(s), 3) for s in sigma[:6]]}, top 8 of 64 hold {100 * top8:.1f} %")
random_matrix = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
print(f"random Gaussian: top 8 of 64 hold {100 * subspace.energy_share(random_matrix, 8):.1f} %")

# %% [markdown]
# **(b) Subspace similarity of $r = 8$ and $r = 64$.** We take the right singular vectors of
# both $A$ matrices (`subspace.singular_directions`: directions in the layer's input space
# $\mathbb{R}^{64}$), compute $\phi$ for $i = j = 1$ by hand, then the grid with the package:

# %%
A8, A64 = live["r8"]["A"][layer_name].double(), live["r64"]["A"][layer_name].double()
V8 = subspace.singular_directions(A8)  # 64 x 8, orthonormal columns
V64 = subspace.singular_directions(A64)  # 64 x 64
phi_11 = float((V8[:, :1].T @ V64[:, :1]).square().sum()) / 1
print(f"phi(1, 1) by hand {phi_11:.4f} | package {subspace.subspace_similarity(V8, V64, 1, 1):.4f}"
      f" | random subspaces {subspace.random_subspace_similarity(1, 1, 64):.4f}")
grid = subspace.subspace_similarity_grid(V8, V64, 8, 16)
print("phi(A_8, A_64, i, j)   j=1     j=2     j=4     j=8     j=16")
for i in (1, 2, 4, 8):
    print(f"  i={i}              " + "  ".join(f"{float(grid[i - 1, j - 1]):.3f} "
                                            for j in (1, 2, 4, 8, 16)))
print("random, i=1:         " + "  ".join(
    f"{subspace.random_subspace_similarity(1, j, 64):.3f} " for j in (1, 2, 4, 8, 16)))

# %% [markdown]
# **(c) Amplification.** $U$, $V$: the top 8 singular vectors of each $\Delta W$ (one rank
# for every run — with $d = 64$, the 64 directions of $r = 64$ would be the whole space). For
# comparison, $\|U^\top W V\|_F$ for $W$'s own top 8 directions and, on average, for random
# ones ($\|W\|_F \cdot 8/64$):

# %%
print(f"||W||_F = {float(W.norm()):.3f}; ||U^T W V||_F for W's top 8 directions "
      f"{float(torch.linalg.svdvals(W)[:8].norm()):.3f}, for random ones {float(W.norm()) / 8:.3f}")
for label, delta in deltas.items():
    svd = torch.linalg.svd(delta)
    U, V = svd.U[:, :8], svd.Vh[:8].T
    projected = float((U.T @ W @ V).norm())
    factor = float(delta.norm()) / projected
    assert abs(factor - subspace.amplification_factor(delta, W, 8)) < 1e-9 * factor
    print(f"{label:>4}: ||dW||_F {float(delta.norm()):.3f}, ||U^T W V||_F {projected:.3f}, "
          f"amplification {factor:.2f}")

# %% [markdown]
# The full configuration — 300 steps, 3 seeds, every adapted layer — is what
# `python -m pedaPEFT lora-experiment learns --scale full` runs; its results ship in
# `pedaPEFT/results/lora_learns.json`. Averaged over the seeds:

# %%
learns = experiments.load_results("lora_learns")
print(f"task {learns['task']!r}, {learns['config']['steps']} steps, seeds "
      f"{learns['config']['seeds']}; made with the shipped base: "
      f"{learns['base_sha256'] == experiments.base_sha256()}")
print("test exact match:", {label: [round(a, 3) for a in accuracies]
                            for label, accuracies in learns["accuracy"].items()})
print(f"{'layer':<16}{'top-8 energy: full':>19}{'r=64':>8}{'phi_A(1,1)':>12}"
      f"{'amplification: full':>21}{'r=8':>6}{'r=64':>6}")
summary = {}
for name in lora_learns.layer_names(4):
    rows = [row for row in learns["layers"] if row["layer"] == name]
    mean = {key: float(np.mean([get(row) for row in rows])) for key, get in (
        ("energy_full", lambda row: row["full"]["energy_top"]),
        ("energy_r64", lambda row: row["r64"]["energy_top"]),
        ("phi", lambda row: row["phi_A"][0][0]),
        ("amp_full", lambda row: row["full"]["amplification"]),
        ("amp_r8", lambda row: row["r8"]["amplification"]),
        ("amp_r64", lambda row: row["r64"]["amplification"]))}
    summary[name] = mean
    print(f"{name:<16}{100 * mean['energy_full']:>18.1f}%{100 * mean['energy_r64']:>7.1f}%"
          f"{mean['phi']:>12.3f}{mean['amp_full']:>21.2f}{mean['amp_r8']:>6.2f}"
          f"{mean['amp_r64']:>6.2f}")
assert all(m["amp_r8"] > m["amp_r64"] and m["amp_full"] < 1 for m in summary.values())
assert all(m["energy_full"] > 2 * subspace.energy_share(random_matrix, 8)
           for m in summary.values())

# %%
fig = figures.lora_learned_updates()
plt.show()

# %% [markdown]
# The figure shows seed 0: left, the spectra of the three updates of `blocks.1.attn.q`
# (normalised by $\sigma_1$; LoRA $r = 8$ has only 8 singular values); middle, the grid
# $\phi(A_8, A_{64}, i, j)$ of the same layer; right, the amplification factor of every adapted
# layer. What the three questions get as answers on our GPT, and how they compare with the
# paper's:
#
# * **(a) The updates are nearly low rank, even where nothing forces them to be.** Full
#   fine-tuning may change all $64 \times 64$ numbers of a layer, yet 77 to 95% of
#   $\|\Delta W\|_F^2$ lies in 8 of its 64 directions (38% for a random matrix), and its
#   spectrum falls by a factor 10 within the first 10 or so indices. LoRA with $r = 64$ could
#   use every direction and puts 95 to 100% into the top 8: a large $r$ does not make a
#   high-rank update, which is why section 8 found that $r = 64$ buys nothing. This closes
#   the loop with lesson 2, section 6: there the *planted* rank-3 task gave an update with
#   three large singular values and a noise floor; here no rank was planted, and the update
#   full fine-tuning learns is still dominated by a few directions — the empirical bet LoRA
#   makes.
# * **(b) $r = 8$ and $r = 64$ find overlapping directions.** $\phi(A_8, A_{64}, 1, 1)$, the
#   squared cosine between the two top directions, is 0.09 to 0.86 across layers (0.86 on
#   `blocks.1.attn.q`), where two random directions give $1/64 = 0.016$; the grid is brightest
#   for small $i$ and fades as $i$ grows. That is the paper's figure 3: the top singular
#   directions of the two runs overlap far more than chance, the rest largely does not (the
#   paper reads the extra directions of $r = 64$ as mostly noise).
# * **(c) The update amplifies directions $W$ does not emphasise.** $\|U^\top W V\|_F$ for
#   the update's top directions lies between the value for random directions and that for
#   $W$'s own top directions (the live cell: 0.42 < 1.50 < 3.12 for $r = 8$ on
#   `blocks.1.attn.q`), as in the paper's table 7. After 300 steps LoRA's updates are 2 to 8
#   times larger than what $W$ had in those directions, and the factor is larger for $r = 8$
#   than for $r = 64$ in every layer — the paper's direction (about 21 at $r = 4$ and 2 at $r = 64$
#   for GPT-3's $W_q$), on a far smaller scale. Full fine-tuning, spread over every weight of
#   the model with a tenfold smaller learning rate, changes each attention matrix by less
#   than $W$ already holds in those directions (factors 0.2 to 0.9).
#
# One caveat specific to our size: with $d = 64$, $r = 64$ is full rank, and random subspaces
# already overlap by $\max(i, j)/64$; the paper's $d = 12{,}288$ makes chance overlaps
# negligible. The test suite checks $\phi$ where the answer is known: 1 for identical
# subspaces, 0 for orthogonal ones, $\max(i, j)/d$ on average for random ones.

# %% [markdown]
# ## Summary
#
# * LoRA layer: $h = W_0 x + b + \frac{\alpha}{r} B A\, \mathrm{dropout}(x)$, `lora.LoRALinear`;
#   $A$: $r \times k$ with $U(\pm 1/\sqrt k)$, $B$: $d \times r$ zeros, so the output is
#   unchanged at the start.
# * Update $\Delta W = \frac{\alpha}{r} BA$ (`.delta_weight()`), rank $\le r$; trainable
#   $r(k + d)$ per layer (`lora.count_parameters`, `lora.print_trainable_parameters`).
# * Targets by exact name or dotted suffix: `lora.apply_lora(model, LoRAConfig(...))`.
# * Merge $W_0 \leftarrow W_0 + \Delta W$: `.merge()`, `lora.merge_lora` — zero inference
#   cost; PEFT's files: `serialization.save_lora_adapter` / `load_lora_adapter`.
# * $\alpha/r$ keeps the good learning rate roughly independent of $r$.
# * What LoRA learns (`pedaPEFT.subspace`): the spectrum of $\Delta W$, the subspace
#   similarity $\phi(A_8, A_{64}, i, j) = \|U_i^\top U_j\|_F^2 / \min(i, j)$ and the
#   amplification $\|\Delta W\|_F / \|U^\top W V\|_F$, measured in section 9.
#
# Lecture numbers checked in this lesson:
#
# * $\Delta W = BA$ example: only entry $(3,3)$ is exact; all entries are truncated, and 9 of
#   16 differ from the correctly rounded product in the last digit. **Wrong.**
# * mt0-large printout, 2,359,296 of 1,231,940,608 (0.19151…%): **right** (PEFT ≥ 0.11 prints
#   `2,359,296` and `0.1915`).
# * "`get_path_model`": the function is **`get_peft_model`**.
# * 18M (table 5), 4.7M and 37.7M (table 4): **right** (18,874,368; 4,718,592; 37,748,736).
# * "5 orders of magnitude" fewer trainable parameters: $175{,}255.8\text{M} / 4.7\text{M}
#   \approx 37{,}000 = 10^{4.6}$. **Overstated** (the paper says "10,000 times").
# * "0.2% of weights trained": RoBERTa-large 0.23%, DeBERTa XXL 0.31%. **Right** for RoBERTa.
# * "No statistically significant difference from $r = 64$ to $r = 1$": for $W_q$ alone
#   table 6 shows 68.8 vs 70.0 on WikiSQL (±0.5). **Not for $W_q$**; true for the others.
# * Table 5, "adapting $W_q, W_v$ gives the best performance overall": all four at $r = 2$ are
#   equal on WikiSQL (73.7) and better on MultiNLI (91.7 vs 91.3). **The table does not
#   single out $\{W_q, W_v\}$.**
#
# ## Exercises
#
# Each check cell calls `exercises.check(...)`: it tests your answer and says what is wrong,
# never what the answer is.
#
# **Exercise 1.** Write `LoRALinear(base, r, alpha)` around a frozen `nn.Linear` `base`:
# store it as `self.base_layer`, freeze it, create trainable `self.lora_A` ($r \times$
# in_features, `nn.init.kaiming_uniform_(..., a=5**0.5)`) and `self.lora_B`
# (out_features $\times r$, zeros), and `self.merged = False`. `forward(x)` returns
# `base(x) + (α/r) · x Aᵀ Bᵀ`; `merge()` adds $\frac{\alpha}{r} BA$ into the base weight
# (in place, without gradients), after which forward uses the base layer alone.

# %%
class LoRALinear(nn.Module):
    """base(x) + (alpha / r) B A x around a frozen nn.Linear; merge() folds BA into the base."""

    ### BEGIN SOLUTION
    def __init__(self, base, r, alpha):
        """Freeze base; A (r, in) random, B (out, r) zero; scaling alpha / r."""
        super().__init__()
        self.base_layer = base
        base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
        self.scaling = alpha / r
        self.merged = False

    def forward(self, x):
        """base(x), plus the scaled low-rank branch unless merged."""
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)

    def merge(self):
        """W <- W + (alpha / r) B A, in place."""
        with torch.no_grad():
            self.base_layer.weight += self.scaling * (self.lora_B @ self.lora_A)
        self.merged = True
    ### END SOLUTION


# %%
exercises.check("05-lora-layer", LoRALinear)

# %% [markdown]
# **Exercise 2.** Write `apply_lora(model, r, alpha, targets)`: in place, replace every
# `nn.Linear` whose name ends in one of `targets` (the last part of its dotted name, e.g.
# `"q"` for `blocks.0.attn.q`) by `lora.LoRALinear(layer, r, alpha)`, then freeze every
# parameter except `lora_A` and `lora_B`.

# %%
### BEGIN SOLUTION
def apply_lora(model, r, alpha, targets):
    """Wrap the target Linear layers in lora.LoRALinear; only the LoRA factors train."""
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, nn.Linear) and child in targets:
            setattr(model.get_submodule(parent_name), child, lora.LoRALinear(module, r, alpha))
    for param_name, param in model.named_parameters():
        param.requires_grad = "lora_" in param_name
### END SOLUTION


# %%
exercises.check("05-apply-lora", apply_lora)

# %% [markdown]
# **Exercise 3.** Redo the mt0-large count of section 6 for `r=16` on **all four** attention
# projections `q`, `k`, `v`, `o` (PEFT: `target_modules=["q", "k", "v", "o"]`). Store the
# trainable percentage PEFT would print, as a number (e.g. `0.1915`), in `mt0_qkvo_r16_percent`.

# %%
### BEGIN SOLUTION
trainable_qkvo = 72 * 4 * 16 * (1024 + 1024)
mt0_qkvo_r16_percent = 100 * trainable_qkvo / (base_total + trainable_qkvo)
### END SOLUTION

# %%
exercises.check("05-mt0-percent", mt0_qkvo_r16_percent)
