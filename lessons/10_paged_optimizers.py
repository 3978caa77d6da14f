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
# # Lesson 10 — Paged optimizers
#
# QLoRA's third ingredient is not about the model at all. AdamW keeps two running averages
# for every trainable parameter, and a training step also needs memory for activations, which
# grows with the length and number of the sequences in a batch. Most batches fit on the GPU;
# now and then a long one does not, and the run dies with "CUDA out of memory" hours in.
# A **paged optimizer** lets the optimizer states leave the GPU for CPU memory when the GPU
# runs short, and brings them back, piece by piece, when the update needs them.
#
# This lesson builds that idea from the AdamW update, looks at how bitsandbytes does it (CUDA
# unified memory) and how the package's `PagedAdamW` does it instead (a memory budget, pinned
# host memory, explicit copies in pages), and then runs full fine-tuning of the small GPT on a
# simulated device that a large batch overfills: plain AdamW runs out of memory, the paged one
# finishes with the same weights. Then we check the lecture's claim about a 33B model on a
# 24 GB GPU against the QLoRA paper and against arithmetic, and last we measure the
# activations themselves and what gradient checkpointing does to them.
#
# **You will learn:** what AdamW stores and why its update can be done in slices; what
# unified memory, page faults and prefetching are; how a budget, pages and a double buffer
# replace them; what paging buys (memory at a spike) and what it costs (copies); where the
# lecture's paged-optimizer slides are right and wrong; how much activation memory a training
# step keeps, and what gradient checkpointing trades for it.

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

from pedaPEFT import exercises, figures, gpt, memory, paged, simulated_device

torch.set_num_threads(1)  # the models here are tiny: one thread is fastest on a shared CPU

# %% [markdown]
# ## 1. What AdamW keeps, and why it can be updated in slices
#
# For a parameter $\theta$ with gradient $g$, AdamW at step $t$ (learning rate $\eta$, weight
# decay $\lambda$) does
#
# $$\theta \leftarrow \theta(1 - \eta\lambda), \qquad
# m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,$$
#
# $$\theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,
# \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}.$$
#
# The two moments $m$ (`exp_avg`) and $v$ (`exp_avg_sq`) have the parameter's shape: in fp32
# that is **8 bytes per trainable parameter**, twice the weights themselves. For full
# fine-tuning of the course's tiny GPT:

# %%
model = gpt.GPT(gpt.GPTConfig.preset("tiny"))
n_params = sum(p.numel() for p in model.parameters())
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
state_bytes = sum(paged.state_bytes(p) for p in model.parameters())
print(f"parameters: {n_params:,}")
print(f"fp32 weights: {weight_bytes:,} bytes; AdamW states: {state_bytes:,} bytes "
      f"({state_bytes / n_params:.0f} bytes per parameter)")

# %% [markdown]
# Every operation in the update is **elementwise**: element $i$ of the new $\theta$, $m$, $v$
# depends only on element $i$ of the old ones and of $g$. So the update of a slice needs only
# that slice of $m$ and $v$ — they do not have to be on the GPU all at once, only the piece
# being updated. Let us check it: update a tensor whole, then in three slices.

# %%
generator = torch.Generator().manual_seed(0)
theta = torch.randn(10, generator=generator)
grad = torch.randn(10, generator=generator)
m, v = torch.randn(10, generator=generator) * 0.1, torch.rand(10, generator=generator) * 0.01
hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)

whole = [t.clone() for t in (theta, m, v)]
paged.adamw_update([whole[0]], [grad], [whole[1]], [whole[2]], [5.0], **hyper)

sliced = [t.clone() for t in (theta, m, v)]
for start, stop in ((0, 4), (4, 8), (8, 10)):  # three "pages"
    pieces = [t[start:stop].clone() for t in sliced]  # copy the page in ...
    paged.adamw_update([pieces[0]], [grad[start:stop]], [pieces[1]], [pieces[2]], [5.0], **hyper)
    for t, piece in zip(sliced, pieces, strict=True):
        t[start:stop] = piece  # ... and back out
print("sliced update == whole update:",
      all(torch.equal(a, b) for a, b in zip(whole, sliced, strict=True)))

# %% [markdown]
# `paged.adamw_update` performs exactly the operations of `torch.optim.AdamW`, in the same
# order, so its results are equal bit for bit (the tests compare them; section 3 does too).
#
# ## 2. What the lecture says, and what bitsandbytes does
#
# The lecture's slides: *"Page-by-page transfers of memory from CPU ⇔ GPU as needed. Lazy and
# does not need to be managed (no offloading, everything is automatic)"*; *"The paper of QLoRA
# states that this mechanism is necessary to train a model with 33 billion parameters on a
# 24GB GPU"*; set `optim = 'paged_adamw_32bit'`; and the five steps: a large mini-batch uses
# more GPU memory than available → the paging engine evicts optimizer state to CPU → *"during
# optimizer step all optimizer states are prefetched to the GPU"* → step → continue on the GPU.
#
# What bitsandbytes (the library behind `paged_adamw_32bit`) actually does:
#
# - **Unified memory.** A paged state is allocated with `cudaMallocManaged`: one address that
#   is valid on the CPU and the GPU. The CUDA driver keeps each *page* of it (4 KB to 2 MB) in
#   one place at a time. When the GPU touches a page that is in CPU memory, the access
#   **faults**, and the driver migrates the page to the GPU; when the GPU is full, the driver
#   evicts pages to CPU memory. Nothing moves while everything fits.
# - **Prefetch.** Faulting one page at a time is slow, so before each parameter's update
#   bitsandbytes calls `cudaMemPrefetchAsync` on that parameter's two states, moving them in
#   bulk; it synchronises at the end of the step.
# - **Only large states are paged**: tensors with fewer than $10^5$ elements get ordinary GPU
#   memory. `paged_adamw_32bit` is the Hugging Face name of `bnb.optim.PagedAdamW32bit`:
#   32-bit (fp32) states, 8 bytes per trainable parameter.
#
# So the lecture's slides are right in spirit, with three corrections:
#
# > **Erratum 1.** *"Page Optimizers: a technique that optimizes memory access patterns,
# > reducing memory usage and improving model performance."* Paging changes neither the update
# > nor the memory the states need; it only lets them *wait in CPU memory* while the GPU needs
# > the room. The model trained is the same (section 3 checks: bit for bit), and speed is at
# > best equal — when pages move, a step is slower.
# >
# > **Erratum 2.** *"No offloading."* Evicting states to CPU memory **is** offloading; what is
# > automatic is the decision (the CUDA driver makes it, on demand).
# >
# > **Erratum 3.** *"During optimizer step all optimizer states are prefetched to the GPU."*
# > bitsandbytes prefetches **each parameter's** states just before that parameter's update,
# > and only for states of at least $10^5$ elements; states never all need to be on the GPU
# > at once (that is the point).
#
# ## 3. The package's version: a budget, pages and a double buffer
#
# Unified memory is not exposed by PyTorch, and over-asking it can make a shared GPU thrash.
# `paged.PagedAdamW` gets the same effect with ordinary tools:
#
# 1. a **budget** in bytes for the states on the device. States are placed first-fit, in
#    parameter order; while everything fits, nothing is evicted and a step is a plain AdamW
#    step;
# 2. the states that do not fit live in **pinned** (page-locked) CPU memory, which the GPU's
#    copy engines can read and write directly, concurrently with computation;
# 3. the step updates them in **pages** of `page_bytes` through two slots on the device:
#    while page $i$ is updated, a side CUDA stream copies page $i+1$ in and page $i-1$ back
#    out (events keep the order). The slots count against the budget.
#
# On a CPU there is no second memory, so the same code runs as a **simulated device**: the
# budget is enforced for the states "on the device", evicted states sit in a separate host
# store and are copied in and out page by page, and `optimizer.stats` counts every page. Let
# us give the tiny GPT half the memory its states need:

# %%
def regression_steps(module, optimizer, steps=3):
    """A few full fine-tuning steps of `module` on fixed random tokens."""
    config = module.config
    tokens = torch.randint(config.vocab_size, (8, config.block_size + 1),
                           generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        logits = module(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()


torch.manual_seed(0)
reference_model = gpt.GPT(gpt.GPTConfig.preset("tiny"))
paged_model = gpt.GPT(gpt.GPTConfig.preset("tiny"))
paged_model.load_state_dict(reference_model.state_dict())

reference_optimizer = torch.optim.AdamW(reference_model.parameters(), lr=1e-3)
optimizer = paged.PagedAdamW(paged_model.parameters(), lr=1e-3, budget_bytes=state_bytes // 2)
regression_steps(reference_model, reference_optimizer)
regression_steps(paged_model, optimizer)

stats = optimizer.stats
print(f"budget {stats.budget_bytes:,} bytes, page {optimizer.page_bytes:,} bytes per moment")
print(f"on the device: {stats.resident_bytes:,} bytes of states + {stats.staging_bytes:,} "
      f"bytes of page buffers = {stats.device_bytes:,}")
print(f"in host memory: {stats.host_bytes:,} bytes "
      f"({len(stats.evicted_params)} of {len(list(paged_model.parameters()))} tensors)")
print(f"3 steps moved {stats.pages_in} pages in and {stats.pages_out} out, "
      f"{stats.bytes_in:,} bytes each way")
same = all(torch.equal(p, q) for p, q in
           zip(reference_model.parameters(), paged_model.parameters(), strict=True))
print("weights equal to torch.optim.AdamW, bit for bit:", same)

# %% [markdown]
# The page count is no mystery: an evicted tensor of $n$ fp32 elements is cut into
# $\lceil 4n / \text{page\_bytes} \rceil$ pages, each carrying both moments, in once and out
# once per step. Recomputed by hand:

# %%
params = list(paged_model.parameters())
elements_per_page = optimizer.page_bytes // 4
pages_per_step = sum(-(-params[i].numel() // elements_per_page) for i in stats.evicted_params)
print("pages per step by hand:", pages_per_step, "| counted:", stats.pages_in // 3)
print("bytes per step by hand:", sum(paged.state_bytes(params[i])
                                     for i in stats.evicted_params),
      "| counted:", stats.bytes_in // 3)

# %% [markdown]
# ## 4. A memory spike, simulated
#
# Now the situation paging is for. A training step needs, at once, the weights, their
# gradients, the activations saved for backward and the optimizer states. Activations grow
# with the batch: `simulated_device.activation_bytes` measures them by counting every tensor
# autograd saves during a forward pass.

# %%
from pedaPEFT import data

config = gpt.GPTConfig.preset("tiny")
x_normal, _ = data.pretrain_batch(0, 8, block_size=config.block_size)
x_spike, _ = data.pretrain_batch(0, 12, block_size=config.block_size)
act_normal = simulated_device.activation_bytes(model, x_normal)
act_spike = simulated_device.activation_bytes(model, x_spike)
print(f"activations: batch 8 -> {act_normal:,} bytes, batch 12 -> {act_spike:,} bytes "
      f"({act_spike / act_normal:.2f}x)")

# %% [markdown]
# Give the simulated device room for the weights, the gradients, all the AdamW states and the
# activations of a normal batch plus 25 %:
#
# $$C = 2W + S + 1.25\,A_8 .$$
#
# A batch of 12 then needs $2W + S + A_{12} > C$: without paging, it cannot run. With paging
# it can, if the states make room: the budget for the states at that step is
# $C - 2W - A_{12}$.

# %%
capacity = 2 * weight_bytes + state_bytes + act_normal * 5 // 4
spike_needs = 2 * weight_bytes + state_bytes + act_spike
print(f"capacity C = {capacity:,} bytes")
print(f"a batch of 12 with every state on the device needs {spike_needs:,} bytes: "
      f"{spike_needs - capacity:,} too many")
print(f"budget left for states at the spike: {capacity - 2 * weight_bytes - act_spike:,} "
      f"of {state_bytes:,} bytes")

# %% [markdown]
# `simulated_device.spike_demo()` runs the experiment: 14 steps of full fine-tuning on the
# pretraining mixture, steps 6 and 7 with 12 sequences instead of 8.
# `simulated_device.train_on_simulated_device` checks every step's footprint against the
# capacity (raising `DeviceOutOfMemoryError` like a failed allocation) and, for a `PagedAdamW`,
# sets its budget to what the step leaves free: states are evicted before the large batch and
# recalled after it. A third run, with no limit
# at all, is the yardstick. (Our device is the same for the whole step; on a real GPU
# activations are freed during backward, so the true peak is a little lower than this sum.)

# %%
demo = simulated_device.spike_demo()
print("same capacity as ours:", demo.capacity_bytes == capacity)
print("torch AdamW:", demo.plain_error)
print(f"PagedAdamW: finished all {len(demo.paged)} steps; largest footprint "
      f"{max(r.total for r in demo.paged):,} <= capacity {demo.capacity_bytes:,}")
for record in demo.paged[5:9]:
    print(f"  step {record.step} (batch {record.batch_size}): activations "
          f"{record.activations:,}, optimizer on the device {record.optimizer:,}")
print(f"{demo.stats.evictions} tensors evicted for the spike and {demo.stats.recalls} recalled "
      f"after it; {demo.stats.pages_in} pages moved in")
print(f"loss {demo.losses[0]:.2f} -> {demo.losses[-1]:.2f}; "
      f"max |weight difference| to the unlimited run: {demo.max_abs_difference}")

# %%
fig = figures.paged_spike_memory(demo)
plt.show()

# %% [markdown]
# Paging bought the run its two large batches, at the price of copying the evicted states in
# and out during those two steps. It bought nothing else: the weights are identical to the
# unlimited run's, and where nothing is evicted no byte moves.
#
# ## 5. On a real GPU
#
# On CUDA the same class keeps evicted states in pinned memory and overlaps the copies with
# the updates. What it costs there is measured by `benchmarks/paged_gpu.py` on an H200 (GPT-2
# small, full fine-tuning, side by side with `torch.optim.AdamW` and bitsandbytes'
# `PagedAdamW`); the table it writes is `benchmarks/paged_gpu.md`. The goal: when nothing is
# evicted, a training step takes at most 1.05× as long as with torch's AdamW. When pages move,
# the cost is set by the copy bandwidth: PCIe moves tens of GB/s, while the GPU's own memory
# moves several TB/s, so every evicted byte costs about a hundred times more per step than a
# resident one. The cell below runs only when a GPU is present.

# %%
# NBVAL_IGNORE_OUTPUT
if torch.cuda.is_available():
    cuda_model = gpt.GPT(gpt.GPTConfig.preset("tiny")).cuda()
    cuda_optimizer = paged.PagedAdamW(cuda_model.parameters(), budget_bytes=state_bytes // 4)
    tokens = torch.randint(cuda_model.config.vocab_size,
                           (8, cuda_model.config.block_size + 1), device="cuda")
    for _ in range(3):
        cuda_optimizer.zero_grad()
        logits = cuda_model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        cuda_optimizer.step()
    print(cuda_optimizer.stats)
else:
    print("no CUDA device here: the simulated device above is the demonstration")

# %% [markdown]
# ## 6. "33B on a 24 GB GPU": the paper, and the arithmetic
#
# The lecture: *"The paper of QLoRA states that this mechanism is necessary to train a model
# with 33 billion parameters on a 24GB GPU."* The paper's own words (§4): *"While paged
# optimizers are critical to do 33B/65B QLoRA tuning on a single 24/48GB GPU, we do not
# provide hard measurements for Paged Optimizers since the paging only occurs when processing
# mini-batches with long sequence lengths, which is rare."* and (§5) *"our 33B Guanaco can be
# trained on 24 GB consumer GPUs in less than 12 hours."* So the lecture quotes the claim
# fairly — but the paper gives no measurement for it, and says paging happens rarely.
#
# We can check that it is plausible. LLaMA-33B has $V = 32000$, $d = 6656$, $L = 60$ layers
# and an MLP width of 17920 (gate, up, down). QLoRA stores every linear weight in NF4 with
# double quantization ($4.127$ bits per parameter, lesson 8), keeps embeddings and head in
# bf16, and trains LoRA with $r = 64$ on all seven linear layers of each block; the released
# script stores LoRA weights and gradients in bf16 and uses `paged_adamw_32bit` (8 bytes of
# state per LoRA parameter).

# %%
V, d, L, ffn, r = 32000, 6656, 60, 17920, 64
linear_shapes = [(d, d)] * 4 + [(d, ffn), (d, ffn), (ffn, d)]  # q, k, v, o, gate, up, down
linear_params = L * sum(a * b for a, b in linear_shapes)
embedding_params = 2 * V * d  # input embedding and untied output head
norm_params = (2 * L + 1) * d
lora_params = L * r * sum(a + b for a, b in linear_shapes)
total_params = linear_params + embedding_params + norm_params
print(f"parameters: {total_params / 1e9:.2f} B; LoRA parameters: {lora_params / 1e6:.1f} M "
      f"({100 * lora_params / total_params:.2f} %)")

qlora = memory.CONVENTIONS["qlora"]  # the course's conventions (lesson 3): 12 B per LoRA parameter
base = qlora.memory(total_params, 0, quantized=linear_params)
training = qlora.memory(total_params, lora_params, quantized=linear_params)
parts = {
    "NF4 + DQ linear weights": qlora.memory(linear_params, 0).weights,
    "bf16 embeddings, head, norms": base.weights - qlora.memory(linear_params, 0).weights,
    "bf16 LoRA weights": training.weights - base.weights,
    "bf16 LoRA gradients": training.gradients,
    "fp32 AdamW states (paged)": training.optimizer,
}
for name, size in parts.items():
    print(f"{name:>30}: {size / memory.GB:6.2f} GB")
static = training.static
gpu = memory.gpu_card_bytes(24)  # a "24 GB" card (RTX 3090 / 4090) holds 24 GiB
print(f"{'total before activations':>30}: {static / memory.GB:6.2f} GB of {gpu / memory.GB:.2f} GB")
pageable = training.optimizer
print(f"left for activations, CUDA context and fragmentation: {(gpu - static) / memory.GB:.2f} GB; "
      f"with the states paged out: {(gpu - static + pageable) / memory.GB:.2f} GB")
assert [round(x / memory.GB, 1) for x in (static, gpu, pageable, gpu - static,
                                          gpu - static + pageable)] == [23.3, 25.8, 3.9, 2.5, 6.4]

# %% [markdown]
# About 23 of the card's 25.8 GB are taken before a single activation; the optimizer states
# are the largest movable item (3.9 GB). Activations with gradient checkpointing grow with
# sequence length, so a long batch can exceed the 2.5 GB that remain — and evicting the states
# would make 6.4 GB available. "Critical" is plausible; "necessary" would need a measurement
# the paper does not give.
#
# ## 7. The lecture's paged-optimizer numbers, recomputed
#
# - *Paging is "necessary" for 33B on a 24 GB GPU, as the paper "states"* (slide "Paged
#   Optimizer: Prevent Memory Spikes"): the paper says "critical" and gives no measurement;
#   our count: about 23 GB of the card's 25.8 GB are static, 3.9 GB of it pageable states.
#   **Plausible, unmeasured.**
# - *`paged_adamw_32bit`* (same slide): 32-bit states, 8 bytes per trainable parameter.
#   **Correct.**
# - *Paged optimizers reduce memory usage and improve model performance* ("Innovations of
#   QLoRA"): the same update, bit for bit, and the same state size; the states only wait in
#   CPU memory while the GPU needs the room. **Wrong.**
# - *"No offloading"* ("Paged Optimizer: Prevent Memory Spikes"): evicting states to CPU
#   memory is offloading, decided on demand by the driver. **Wrong.**
# - *"All optimizer states are prefetched to the GPU"* ("Paged Optimizer works like this",
#   step 3): each parameter's states are prefetched just before its update, and only states
#   of at least $10^5$ elements are paged at all. **Imprecise.**

# %% [markdown]
# ## 8. Activations, and gradient checkpointing
#
# Section 6 left about 2.5 GB of the card for everything that is not a weight or a state:
# the **activations**, the tensors autograd keeps from the forward pass to compute the
# gradients. The QLoRA paper (§2) measures them for LLaMA-7B on FLAN v2 at batch size 1: the
# LoRA parameters take 26 MB, the activations ("LoRA input gradients") 567 MB, and the 4-bit
# base 5,048 MB; with gradient checkpointing the activations fall to about 18 MB per sequence.
# For parameter-efficient fine-tuning, activations, not adapters, are what training adds.
#
# We measure the same on the tiny GPT with LoRA on every linear layer: a saved-tensor hook
# (`memory.saved_tensor_bytes`) adds up every tensor autograd keeps during one forward pass,
# and `memory.gpt_activation_bytes` predicts it.

# %%
import torch.nn.functional as F

from pedaPEFT import lora

seed_everything(0)
model = gpt.load_pretrained("tiny")
lora.apply_lora(model, lora.LoRAConfig(r=8, alpha=16, target_modules=gpt.ALL_LINEAR))
batch = 64
x, y = data.pretrain_batch(0, batch)
tokens = x.numel()


def training_loss():
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


lora_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
training_loss().backward()
lora_optimizer.step()
static_bytes = memory.measured_static_memory(model, lora_optimizer)
lora_optimizer.zero_grad(set_to_none=True)
saved = memory.saved_tensor_bytes(training_loss, model)
plain_gpt = memory.gpt_activation_bytes(model.config, batch)
print(f"{batch} sequences x {model.config.block_size} tokens = {tokens} tokens")
print(f"fp32 base weights + LoRA adapters:   {static_bytes.weights / 1e6:6.2f} MB")
print(f"LoRA gradients + AdamW states:       "
      f"{(static_bytes.gradients + static_bytes.optimizer) / 1e6:6.2f} MB")
print(f"activations kept for backward:       {saved / 1e6:6.2f} MB "
      f"({saved / tokens / 1e3:.1f} kB per token)")
print(f"  of which the GPT without LoRA keeps {plain_gpt / 1e6:.2f} MB "
      f"(memory.gpt_activation_bytes), LoRA's r-wide products the rest")

# %% [markdown]
# At a batch of a thousand tokens the activations are more than ten times the weights,
# gradients and optimizer states together (the assert below keeps this sentence true): the
# paper's picture in miniature. They grow with batch size × sequence length; the rest does not.

# %%
assert saved > 10 * static_bytes.static

# %% [markdown]
# **Gradient checkpointing** keeps only each block's *input* and runs the block's forward a
# second time during backward, one block at a time, to rebuild what its gradient needs.
# `model.gradient_checkpointing_enable()` wraps every block in `torch.utils.checkpoint`
# (non-reentrant, with the random state restored so that dropout draws the same masks). The
# gradients must come out the same; the saved activations and the number of block forwards
# per step change:

# %%
forward_calls = []
counters = [block.register_forward_pre_hook(lambda *_: forward_calls.append(1))
            for block in model.blocks]
activations, gradients, block_forwards = {}, {}, {}
for checkpointing in (False, True):
    model.gradient_checkpointing_enable(checkpointing)
    activations[checkpointing] = memory.saved_tensor_bytes(training_loss, model)
    model.zero_grad(set_to_none=True)
    forward_calls.clear()
    training_loss().backward()
    block_forwards[checkpointing] = len(forward_calls)
    gradients[checkpointing] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
for counter in counters:
    counter.remove()
one_block = (memory.gpt_activation_bytes(model.config, batch)
             - memory.gpt_activation_bytes(gpt.GPTConfig.preset("tiny", n_layer=3), batch))
same = all(torch.equal(a, b) for a, b in zip(gradients[False], gradients[True], strict=True))
print(f"same gradients with and without checkpointing: {same}")
for checkpointing in (False, True):
    print(f"checkpointing {'on ' if checkpointing else 'off'}: "
          f"{activations[checkpointing] / 1e6:5.2f} MB kept for backward, "
          f"{block_forwards[checkpointing]} block forwards per step")
print(f"while a block is recomputed, its own activations come back: {one_block / 1e6:.2f} MB")

# %% [markdown]
# The same gradients, bit for bit, from less than a tenth of the saved activations (asserted
# below): each block keeps only its input, $d$ numbers per token instead of $16d + h + 4$.
# During backward, one block at a time has its activations back while it is recomputed.
#
# The price is time: every block runs its forward twice. A forward is about a third of the
# arithmetic of forward + backward, so on a large model, where arithmetic dominates, a step
# costs about a third more. On the tiny GPT the bookkeeping of the recomputation weighs more.
# Measured here (your numbers will differ; this cell's output is not compared when the lesson
# is tested):

# %%
assert activations[True] < activations[False] / 10 and same

# %%
# NBVAL_IGNORE_OUTPUT
import time

step_seconds = {}
for checkpointing in (False, True):
    model.gradient_checkpointing_enable(checkpointing)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        training_loss().backward()
        times.append(time.perf_counter() - start)
    step_seconds[checkpointing] = sorted(times)[len(times) // 2]
    print(f"checkpointing {'on ' if checkpointing else 'off'}: "
          f"{1e3 * step_seconds[checkpointing]:.1f} ms per forward + backward (median of 7)")
print(f"ratio: {step_seconds[True] / step_seconds[False]:.2f}")
model.gradient_checkpointing_enable(False)

# %% [markdown]
# Why this matters for paging: what checkpointing leaves still grows with the batch and the
# sequence length — $L \cdot d$ numbers per token for the block inputs, one recomputed block,
# and the logits. For the 33B model of section 6 the block inputs alone, in bf16, take
# $2 L d$ bytes per token:

# %%
per_token = 2 * L * d  # bf16 block inputs of LLaMA-33B, checkpointed
print(f"{per_token / 1e3:.0f} kB per token; the {(gpu - static) / memory.GB:.1f} GB left hold "
      f"{(gpu - static) // per_token:,.0f} tokens, {(gpu - static + pageable) // per_token:,.0f} "
      f"with the optimizer states paged out")

# %% [markdown]
# Even checkpointed, the block inputs of a batch of about three thousand tokens fill what is
# left (before the recomputed block, the logits and the CUDA context); a rare longer batch does
# not fit — unless the optimizer states make room, which more than doubles it. That is the
# spike of section 4, and the reason the QLoRA recipe combines gradient checkpointing (its
# scripts turn it on) with paged optimizers: checkpointing shrinks the activations of every
# step, paging absorbs the steps where they still do not fit.

# %% [markdown]
# ## Exercises
#
# Each exercise asks for a function; the check cell under it compares your function with
# `torch.optim.AdamW` or with what `paged.PagedAdamW` decides and copies, on random tensors
# and budgets. Its hint names what is off.
#
# **Exercise 1.** Write `adamw_step(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1,
# beta2, eps, weight_decay)`: one AdamW update of section 1, in place on `param`, `exp_avg`
# and `exp_avg_sq` (the step number `step` counts from 1). Use plain tensor operations, not
# `paged.adamw_update`; the check runs several steps against `torch.optim.AdamW`.


# %%
### BEGIN SOLUTION
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update, in place on param and both moments."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = exp_avg / (1 - beta1**step)
    v_hat = exp_avg_sq / (1 - beta2**step)
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


### END SOLUTION

# %%
exercises.check("10-adamw-step", adamw_step)

# %% [markdown]
# **Exercise 2.** Write `page_plan(params, budget_bytes, page_bytes)`: which parameters'
# states a `PagedAdamW` with this budget keeps in host memory, following section 3's rules,
# and how many bytes of page buffers it needs on the device (its two slots each hold a page of
# both moments). Return `(evicted, staging)`: the indices of the evicted parameters, in order,
# and the staging bytes.


# %%
### BEGIN SOLUTION
def page_plan(params, budget_bytes, page_bytes):
    """(indices of the parameters whose states are evicted, bytes of page buffers)."""
    sizes = [2 * p.numel() * p.element_size() for p in params]
    if sum(sizes) <= budget_bytes:
        return [], 0
    staging = 4 * page_bytes
    free = budget_bytes - staging
    evicted = []
    for index, size in enumerate(sizes):
        if size <= free:
            free -= size
        else:
            evicted.append(index)
    return evicted, staging


### END SOLUTION

# %%
exercises.check("10-page-plan", page_plan)

# %% [markdown]
# **Exercise 3.** Write `pages(param, page_bytes)`: the element ranges `(start, stop)` of the
# flattened `param` in which a `PagedAdamW` copies its evicted states in and out (a page
# holds `page_bytes` bytes of each moment).


# %%
### BEGIN SOLUTION
def pages(param, page_bytes):
    """The (start, stop) element ranges of the pages of one evicted parameter."""
    per_page = page_bytes // param.element_size()
    n = param.numel()
    return [(start, min(start + per_page, n)) for start in range(0, n, per_page)]


### END SOLUTION

# %%
exercises.check("10-pages", pages)
