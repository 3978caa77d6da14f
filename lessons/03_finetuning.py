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
# # Lesson 3 — Fine-tuning and its memory
#
# A pretrained model knows general things; a downstream task wants something specific. The
# lecture lists three classic ways to adapt a pretrained network, first seen with CNNs:
#
# 1. **full fine-tuning** — keep training *every* weight on the new task;
# 2. **feature-based** — freeze the network, use its last hidden states as features, train only a
#    new output layer on top;
# 3. **top-layer fine-tuning** — freeze the bottom, train the last block(s) and the output layer.
#
# This lesson runs all three on a small GPT and measures what each can learn, then counts what
# full fine-tuning costs in memory — the cost that parameter-efficient methods (lessons 4–9)
# cut. Last, it recomputes the lecture's "fine-tuning LLaMA-3-8B takes 128 GB" slide, which
# has one real mistake and a few loose ends.
#
# **You will learn:** what each method freezes and how many parameters it trains; why a frozen
# body limits what can be learned; the bytes per parameter of weights, gradients and optimizer
# states in fp32, mixed precision and with 8-bit Adam; how to check such accounting against the
# real tensors.

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

from pedaPEFT import data, exercises, figures, gpt, memory, train

# %% [markdown]
# ## 1. The workbench: a tiny GPT and synthetic tasks
#
# `pedaPEFT.gpt` is a GPT-2-style decoder (pre-LayerNorm blocks, causal attention, weight-tied
# output head). Its attention projections are four `nn.Linear` named `q`, `k`, `v`, `o` and its
# MLP is `fc`, `proj`, so the LoRA lessons can name their targets like the papers do. The
# parameter count has a closed form,
#
# $$N = Vd + Td + L\,(12d^2 + 13d) + 2d,$$
#
# (embeddings; per layer four $d \times d$ projections, the $d \to 4d \to d$ MLP, biases and two
# LayerNorms; a final LayerNorm). We check it on every preset, including GPT-2 small.

# %%
for name in gpt.PRESETS:
    config = gpt.GPTConfig.preset(name)
    with torch.device("meta"):  # shapes only, no memory
        real = sum(p.numel() for p in gpt.GPT(config).parameters())
    print(f"{name:>6}: d={config.n_embd:4d} L={config.n_layer:2d} V={config.vocab_size:5d}  "
          f"formula {gpt.parameter_count(config):>11,}  real {real:>11,}")

# %% [markdown]
# The lessons use the `tiny` preset's **pretrained base**, shipped with the package (made by
# `python -m pedaPEFT pretrain --preset tiny`, about a minute on a laptop CPU). It was trained
# on a mixture of two character-level jobs: copying a string (`c:abcdef=abcdef`) and continuing
# the alphabet (`n:kl=mnopqr`). The downstream tasks keep the copy prompt but want a different
# answer:
#
# | task | example | what must change |
# |---|---|---|
# | `shift` | `c:abcxyz=bcdyza` | the letter map (the copy routing can stay) |
# | `reverse` | `c:abcdef=fedcba` | where attention looks |
# | `swap` | `c:abcdef=badcfe` | where attention looks, alternating with position |
#
# A task is scored by **exact match**: an answer counts only if every character (and the final
# newline) is the model's top prediction.

# %%
base = gpt.load_pretrained("tiny")
info = gpt.pretrained_info("tiny")
print("recipe:", info["made_by"], f"({info['train_config']['steps']} steps)")
copy_prompt = torch.tensor([data.encode("c:pedaft=")])
print("base on a copy prompt:", repr(data.decode(base.generate(copy_prompt, 7)[0])))
for name in data.TASKS:
    test_set = data.task_data(name, "test", data.TEST_SIZE)
    print(f"base exact match on {name:>7}: {data.exact_match(base, test_set):.2f}")

# %% [markdown]
# The base copies perfectly, so it gets none of the downstream answers right (a reversal or a
# swap could only match by chance, for palindromes or doubled letters). Fine-tuning has to
# teach them.
#
# ## 2. Three methods, three sets of trainable parameters
#
# A *method* in `pedaPEFT.train` is a function that freezes, unfreezes or wraps parts of the
# model in place; the same training loop then trains whatever is left trainable. The head is
# tied to the token embedding, so the feature-based and top-layer methods first give the head
# its own copy (`gpt.untie_head`); otherwise training the head would also change the frozen
# embedding at the bottom.

# %%
counts = {}
for method in ("full", "top", "feature"):
    model = train.METHODS[method](gpt.load_pretrained("tiny"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    counts[method] = trainable
    print(f"{method:>7}: {trainable:>7,} of {total:>7,} parameters train ({trainable / total:.1%})")

# %% [markdown]
# The totals differ because untying adds a $V \times d = 48 \times 64 = 3{,}072$-parameter head.
# Check the counts by hand: the top block has $12d^2 + 13d = 49{,}984$ parameters, the final
# LayerNorm $2d = 128$, the head $3{,}072$.

# %%
d, V = base.config.n_embd, base.config.vocab_size
assert counts["top"] == (12 * d * d + 13 * d) + 2 * d + V * d
assert counts["feature"] == V * d
assert counts["full"] == gpt.parameter_count(base.config)

# %% [markdown]
# ## 3. Fine-tuning: what each method can learn
#
# Each run starts from a fresh copy of the base and trains for 200 steps of 64 examples
# (AdamW, peak learning rate 3e-3, warm-up then cosine decay), on 2,048 training examples, and is
# scored on 512 unseen test strings. (The package default is 300 steps, `python -m pedaPEFT
# finetune --task shift --method full`; 200 are enough here.) On a 2-core laptop CPU a run takes
# roughly 5–15 seconds, full fine-tuning the slowest since it computes every gradient.
#
# Accuracies vary slightly between machines (floating-point sums are not associative), so the
# table's output is not compared by the notebook tests; the assertions below it are.
#
# The matrices of the tiny model are so small that splitting each product over several CPU
# threads costs more than it gains: one thread is faster (several times faster on a busy
# machine).

# %%
torch.set_num_threads(1)
config = train.TrainConfig(steps=200, batch_size=64, lr=3e-3, warmup_steps=20,
                           weight_decay=0.0, progress=False)
results = {}
for task in ("shift", "reverse"):
    for method in ("full", "top", "feature"):
        seed_everything(0)
        run = train.finetune(gpt.load_pretrained("tiny"), task, method, config)
        results[task, method] = run.accuracy

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{'task':>8} {'full':>6} {'top':>6} {'feature':>8}")
for task in ("shift", "reverse"):
    row = [results[task, method] for method in ("full", "top", "feature")]
    print(f"{task:>8} {row[0]:6.3f} {row[1]:6.3f} {row[2]:8.3f}")

# %%
assert min(results["shift", method] for method in ("full", "top", "feature")) >= 0.9
assert results["reverse", "full"] >= 0.95
assert results["reverse", "top"] < 0.2 and results["reverse", "feature"] < 0.2
print("every method learns the letter map; only full fine-tuning learns to reverse")

# %% [markdown]
# What happened:
#
# * **shift** keeps the base's copy routing and changes only which letter comes out. At every
#   answer position the frozen network already holds "the letter to copy" in its last hidden
#   state — that is what its head reads to copy — so a new head that maps each letter to the
#   next one is all it takes: even the feature-based method, training 1.5% of the parameters,
#   learns it.
# * **reverse** needs attention to look at *different positions*. Every layer's attention is
#   frozen under the feature-based method, and the top block alone cannot rebuild the routing
#   the lower blocks feed it: both score zero. Only full fine-tuning learns it. (`swap` behaves
#   the same way: `python -m pedaPEFT finetune --task swap --method top`.)
#
# So freezing is not free: the more is frozen, the fewer tasks can be learned. Full
# fine-tuning learns everything here — and that is its cost: every weight needs a gradient and
# optimizer state. The rest of the course is about getting full fine-tuning's accuracy while
# training few parameters (adapters, LoRA) and storing the frozen rest in fewer bits (QLoRA).
#
# ## 4. What full fine-tuning costs: bytes per parameter
#
# Training with Adam keeps, per trainable parameter,
#
# * the **weight** itself;
# * its **gradient**;
# * the **optimizer state**: Adam's two moving averages $m$ and $v$ — and, in mixed precision,
#   a float32 *master copy* of the weight, since 16-bit weights cannot absorb tiny updates.
#
# Activations saved for the backward pass come on top; they grow with batch and sequence
# length, not with the parameter count. `memory.finetune_memory` does the accounting:

# %%
settings = [("fp32", "adamw"), ("mixed", "adamw"), ("mixed", "adamw8bit"), ("bf16", "adamw"),
            ("bf16", "adamw8bit")]
print(f"{'precision':>9} {'optimizer':>10} {'weights':>8} {'grads':>6} {'optim':>6} {'total':>6}")
for precision, optimizer in settings:
    b = memory.bytes_per_parameter(precision=precision, optimizer=optimizer)
    print(f"{precision:>9} {optimizer:>10} {b['weights']:8.2f} {b['gradients']:6.2f} "
          f"{b['optimizer']:6.2f} {b['total']:6.2f}")

# %% [markdown]
# * **fp32 + AdamW**: 4 + 4 + (4 + 4) = 16 bytes.
# * **Mixed precision + AdamW** (16-bit weights and gradients, float32 master copy and moments,
#   the accounting of the ZeRO paper): 2 + 2 + (4 + 4 + 4) = **16** bytes. Mixed precision
#   saves compute and activation memory, not static memory.
# * **8-bit AdamW** (bitsandbytes) stores each moment in one byte plus a float32 scale per
#   block of 256 values: 2 + 8/256 = 2.03 bytes instead of 8, so mixed precision with 8-bit
#   AdamW needs 2 + 2 + (4 + 2.03) = **10.03** bytes.
# * Pure bf16 training (no master copy) needs 8 bytes, or 6.03 with 8-bit states.

# %%
figure = figures.finetune_memory_per_parameter()
plt.show()

# %% [markdown]
# ### Checking the accounting against real tensors
#
# Accounting is only useful if it is right. Train the tiny GPT for one step and add up the bytes
# of the real parameter, gradient and optimizer-state tensors. PyTorch's AdamW also keeps a
# step counter per parameter tensor (a 4-byte float), which `n_tensors` accounts for.

# %%
seed_everything(0)
model = gpt.GPT(gpt.GPTConfig.preset("tiny"))
optimizer = train.make_optimizer(model, config)
x, y = data.pretrain_batch(0, 8)
loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
loss.backward()
optimizer.step()
measured = memory.measured_static_memory(model, optimizer)
n = sum(p.numel() for p in model.parameters())
predicted = memory.finetune_memory(n, precision="fp32", n_tensors=len(list(model.parameters())))
for part in ("weights", "gradients", "optimizer"):
    print(f"{part:>9}: predicted {getattr(predicted, part):>9,.0f} B, "
          f"measured {getattr(measured, part):>9,.0f} B")
assert measured.as_dict() == predicted.as_dict()

# %% [markdown]
# Exact to the byte. The activation memory is checked the same way in the tests
# (`memory.gpt_activation_bytes` against what autograd really saves).
#
# ### The course's memory conventions
#
# Papers, slides and tools count these bytes in different ways (with or without a float32
# master copy, in GB or in GiB), and a comparison is only fair with one count. The course
# fixes its conventions once, in `memory.CONVENTIONS`, and every lesson and the README's
# errata use them. Full fine-tuning means the mixed-precision count above, 16 bytes per
# parameter; the QLoRA paper's 12 bytes (no master copy) and the lecture's 8-bit Adam are
# named variants; LoRA and QLoRA adapters are bf16 with float32 Adam moments, as in the QLoRA
# recipe. Sizes are in GB ($10^9$ bytes); GiB ($2^{30}$) appears only where a GPU card's
# marketed size demands it.

# %%
print(memory.conventions_table())

# %% [markdown]
# ## 5. The lecture's LLaMA-3-8B arithmetic, recomputed
#
# The lecture's slide "Naively Fine-Tuning LLaMA3-8B takes 128GB of RAM!" says:
#
# 1. loaded in float32 (4 bytes/parameter) the 8B model needs $8 \times 4 = 32$ GB;
# 2. full fine-tuning "with the regular 8bit Adam optimizer using a half-precision model" needs
#    "2 bytes for the weight, 2 bytes for the gradient, and 12 bytes for the Adam optimizer
#    states", 16 bytes per parameter, "over 120GB of GPU memory";
# 3. this "would require at least 3 A40s with 48GB".
#
# First the parameter count, from Llama-3-8B's published shape (vocabulary 128,256, width 4,096,
# 32 layers, 32 query heads and 8 key/value heads, MLP width 14,336, untied head).

# %%
n_llama = memory.llama_parameter_count(**memory.LLAMA3_8B)
print(f"Llama-3-8B parameters: {n_llama:,}")
load_fp32 = memory.finetune_memory(n_llama, precision="fp32").weights
print(f"fp32 weights: {load_fp32 / memory.GB:.1f} GB")

# %% [markdown]
# Claim 1 holds: 32.1 GB — "8 billion" is 8.03 billion.
#
# Claim 2: the breakdown 2 + 2 + 12 is the mixed-precision accounting with **regular 32-bit**
# Adam (float32 master copy 4 + $m$ 4 + $v$ 4 = 12). 8-bit Adam keeps its two moments in 2.03
# bytes, so with the 8-bit optimizer the slide names the total is 10.03 bytes per parameter.

# %%
for regime in ("full", "full, 8-bit Adam"):
    m = memory.CONVENTIONS[regime].memory(n_llama)
    print(f"{regime:>16}: {m.optimizer / n_llama:5.2f} B/param of optimizer state, "
          f"{m.total / n_llama:5.2f} B/param, {m.total / memory.GB:6.1f} GB")

# %% [markdown]
# With 16 bytes per parameter the total is 128.5 GB: "over 120 GB" holds, and the title's
# "128GB" is the accurate figure — of GPU memory, not RAM. Both leave out activations, which
# come on top and depend on batch size and sequence length.
#
# Claim 3: how many 48 GB A40s? A card's marketed "48 GB" are 48 GiB
# (`memory.gpu_card_bytes`), 51.5 GB in the course's unit.

# %%
a40 = memory.gpu_card_bytes(48)
spares = {}
for regime in ("full", "full, 8-bit Adam"):
    static = memory.CONVENTIONS[regime].memory(n_llama).static
    n_gpus = -(-static // a40)  # ceiling division
    spares[regime] = (n_gpus * a40 - static) / n_gpus
    print(f"{regime:>16}: {static / a40:.2f} A40s of static state -> {n_gpus:.0f} GPUs, "
          f"{spares[regime] / memory.GB:.1f} GB left per GPU for activations")
assert round(a40 / memory.GB, 1) == 51.5
assert [round(spare / memory.GB, 1) for spare in spares.values()] == [8.7, 11.3]

# %% [markdown]
# Three A40s hold the 16-byte state only if weights, gradients and optimizer states are
# **sharded** across the GPUs (ZeRO-3 / FSDP), leaving about 8.7 GB per GPU for activations and
# the CUDA context. Plain data parallelism keeps a full copy on every GPU: 128.5 GB does not fit
# on any number of 48 GB cards. With the 8-bit Adam the slide names, two A40s would do
# (80.6 GB of state, 11.3 GB left on each).
#
# **Errata for this slide**
#
# * "regular 8bit Adam … 12 bytes for the Adam optimizer states": 12 bytes is **32-bit** Adam
#   in mixed precision (float32 master copy + $m$ + $v$). 8-bit Adam needs 2.03 bytes for its
#   states (+ 4 for the master copy): 10.03 bytes per parameter, 80.6 GB.
# * "16 bytes per trainable parameter … over 120GB": 16 × 8.03 billion = 128.5 GB, and that
#   is weights, gradients and optimizer states only; activations come on top.
# * "at least 3 A40s with 48GB": three only with the states sharded (ZeRO-3 / FSDP), leaving
#   about 8.7 GB per GPU for activations; two with 8-bit Adam.
# * "takes 128GB of RAM": GPU memory, and only its static part.
#
# ### The model sizes of the opening slides
#
# The lecture motivates PEFT with "GPT-3 having 175 billion parameters" (right: Brown et al.,
# 2020) and "Google's PaLM surpassing the trillion-parameter mark". PaLM has **540 billion**
# parameters (Chowdhery et al., 2022); the models of that time with over a trillion parameters
# were sparse mixtures of experts (Switch-C, 1.6 trillion; GLaM, 1.2 trillion), of which only a
# small part runs for each token. Even so, the accounting above makes the point the slide wants:

# %%
for name, n_params in (("GPT-3", 175e9), ("PaLM", 540e9)):
    weights = memory.finetune_memory(int(n_params), precision="bf16").weights
    full = memory.CONVENTIONS["full"].memory(int(n_params)).static
    print(f"{name:>5}: {n_params / 1e9:.0f}B parameters, {weights / memory.GB:,.0f} GB of bf16 "
          f"weights, {full / memory.GB:,.0f} GB to fine-tune in mixed precision "
          f"({full / a40:.0f} A40s of static state)")

# %% [markdown]
# ## Exercises
#
# Each check cell calls `exercises.check(...)`: it tests your answer and says what is wrong,
# never what the answer is.

# %% [markdown]
# **Exercise 1.** Write `bytes_per_parameter(precision, optimizer)`: the bytes one parameter
# costs in full fine-tuning (weight, gradient, optimizer states, master copy), for
# `precision` in `"fp32"`, `"mixed"` (16-bit weights and gradients with a float32 master
# copy), `"bf16"` (pure bf16: moments in bf16 too) and `optimizer` in `"adamw"`,
# `"adamw8bit"` (two 8-bit moments, each with a float32 absmax per block of 256 values),
# `"sgd"` (no state). Use only arithmetic, not `pedaPEFT.memory`.

# %%
### BEGIN SOLUTION
def bytes_per_parameter(precision, optimizer):
    """Bytes per parameter of full fine-tuning: weight + gradient + states (+ master copy)."""
    weight = {"fp32": 4, "mixed": 2, "bf16": 2}[precision]
    moment = 2 if precision == "bf16" else 4
    states = {"adamw": 2 * moment, "adamw8bit": 2 * (1 + 4 / 256), "sgd": 0}[optimizer]
    master = 4 if precision == "mixed" else 0
    return weight + weight + states + master
### END SOLUTION


# %%
exercises.check("03-bytes-per-parameter", bytes_per_parameter)

# %% [markdown]
# **Exercise 2.** Write `count_parameters(model)` returning `(trainable, total)` as PEFT
# counts them: `total` counts every parameter once (a weight shared by two modules, like
# the tied embedding and head, is one tensor), `trainable` those with `requires_grad`.

# %%
### BEGIN SOLUTION
def count_parameters(model):
    """(trainable, total) parameter counts; shared tensors count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
### END SOLUTION


# %%
exercises.check("03-count-parameters", count_parameters)

# %% [markdown]
# **Exercise 3.** How many parameters train if the top-layer method unfreezes the **two** top
# blocks of the tiny GPT (plus the final LayerNorm and the untied head)? Store the count in
# `top2_trainable`, by computing it (the package can help: `train.prepare_top(model, n_blocks=2)`).

# %%
### BEGIN SOLUTION
top2 = train.prepare_top(gpt.load_pretrained("tiny"), n_blocks=2)
top2_trainable = sum(p.numel() for p in top2.parameters() if p.requires_grad)
### END SOLUTION

# %%
exercises.check("03-top2-trainable", top2_trainable)
