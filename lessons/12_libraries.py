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
# # Lesson 12 — From scratch to the real libraries
#
# Outside this course, QLoRA is a dozen lines of Hugging Face `transformers`, `peft` and
# `bitsandbytes`. This lesson writes lesson 9's recipe with them, line by line, puts the
# pedaPEFT function you built beside each line, and checks that the two agree: the same
# trainable-parameter count, the same 4-bit bytes and scales, the same adapter files. Then it
# measures where they do *not* agree: on the CPU, bitsandbytes 0.50.2 dequantizes some weight
# shapes with the wrong block scales.
#
# | the libraries | pedaPEFT (lesson) |
# |---|---|
# | `BitsAndBytesConfig`: NF4, double quantization, bf16 compute | `quant.quantize_4bit` (7, 8) |
# | `from_pretrained(..., quantization_config=...)`: `Linear4bit` layers | `qlora.QuantLinear` (9) |
# | `prepare_model_for_kbit_training`: freeze, fp32 norms | `qlora.quantize_model` (9) |
# | `LoraConfig(target_modules="all-linear")`, `get_peft_model` | `qlora.quantize_model` (5, 9) |
# | `print_trainable_parameters()` | `lora.print_trainable_parameters` (5) |
# | `bnb.optim.PagedAdamW32bit` | `paged.PagedAdamW` (10) |
# | `merge_and_unload()` | `qlora.merge_qlora` (9) |
# | `save_pretrained`, `PeftModel.from_pretrained` | `serialization.save_lora_adapter` (5) |
#
# Everything runs offline on the CPU: the model is built from a configuration with random
# weights, nothing is downloaded. This lesson needs the `reference` extra
# (`pip install "pedapeft[reference]"`: `transformers`, `peft`, `bitsandbytes` 0.50.2).
#
# **You will learn:** what each library call does in the terms of lessons 5–10, how to check a
# library against a reference you understand, and why "bit for bit on one backend" is not
# "bit for bit everywhere".

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

# %% [markdown]
# Two settings before the imports. On a processor with AVX-512 BF16, bitsandbytes looks for an
# optional faster CPU kernel that it would download from the Hugging Face Hub, and logs a
# warning when the `kernels` package is missing; offline it is always missing, and
# bitsandbytes then uses its own compiled kernel, so we raise that one logger's threshold.
# `transformers` draws progress bars while it writes and reads weight files; we turn them off.
# Every *warning* the libraries raise in this lesson is caught and printed in the cell's output
# (`warnings_shown` below): some of them are part of the lesson.

# %%
import contextlib
import copy
import logging
import tempfile
import warnings
from pathlib import Path

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
missing = [name for name in ("transformers", "peft", "bitsandbytes")
           if importlib.util.find_spec(name) is None]
if missing:
    raise ImportError(f"lesson 12 needs {missing}: pip install 'pedapeft[reference]'")

import bitsandbytes as bnb
import peft
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from pedaPEFT import bnb_cpu, data, exercises, gpt, lora, paged, qlora, quant, serialization

transformers.utils.logging.disable_progress_bar()
print(f"transformers {transformers.__version__}, peft {peft.__version__}, "
      f"bitsandbytes {bnb.__version__}, torch {torch.__version__}")


@contextlib.contextmanager
def warnings_shown():
    """Run the block; print every distinct warning it raised (category and message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    shown = []
    for warning in caught:
        text = f"{warning.category.__name__}: {warning.message}"
        if text not in shown:
            shown.append(text)
            print(f"[warning] {text}")


# %% [markdown]
# ## 1. A small transformers model, built offline
#
# `from_pretrained("meta-llama/...")` would download gigabytes. A model's architecture is its
# configuration, so we build a LLaMA with two layers of width 64 and random weights, save it
# to a temporary folder and load it from there, as a student would load a downloaded one. Its
# vocabulary is the 48 characters of the course's tasks (lesson 3).

# %%
torch.manual_seed(0)
llama_config = transformers.LlamaConfig(
    vocab_size=48, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
)
dense = transformers.LlamaForCausalLM(llama_config)
checkpoint = Path(tempfile.mkdtemp()) / "tiny-llama"
dense.save_pretrained(checkpoint)
n_dense = lora.count_parameters(dense)[1]
linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in dense.named_modules()
                       if isinstance(m, torch.nn.Linear)})
print(f"parameters: {n_dense:,}; Linear layers: {linear_names}")
print("files:", sorted(p.name for p in checkpoint.iterdir()))

# %% [markdown]
# ## 2. Loading it in 4 bits
#
# `BitsAndBytesConfig` holds QLoRA's four settings: NF4 codes (lesson 7), double quantization
# of the block scales (lesson 8) and bf16 arithmetic. `from_pretrained` replaces every
# `nn.Linear` except the output head by bitsandbytes' `Linear4bit` and quantizes its weight
# as it loads.

# %%
bnb_config = transformers.BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)
with warnings_shown():
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=bnb_config, device_map="cpu")
q_proj = model.model.layers[0].self_attn.q_proj
print(type(q_proj).__name__, "weight:", q_proj.weight.dtype, tuple(q_proj.weight.shape))
for key, value in q_proj.state_dict().items():
    print(f"  {key:<45} {str(value.dtype):<14} {tuple(value.shape)}")

# %% [markdown]
# The 64 × 64 weight is 2,048 bytes of packed codes (two per byte), 64 uint8 scale codes (one
# per block of 64), one float32 second-level scale and the two code tables — the tensors of
# lesson 8's `QuantState`. `quant.from_bnb_state_dict` reads this state dict into pedaPEFT's
# `QuantState`; quantizing the dense weight ourselves gives the same bytes. On the CPU,
# bitsandbytes rounds the 8-bit scale codes through a 65,536-bin table (`dq_rounding="cpu_lut"`
# here); its CUDA kernels and pedaPEFT's default pick the exact nearest code, at most one code
# apart (lesson 8).

# %%
state = quant.from_bnb_state_dict(q_proj.state_dict())
ours = quant.quantize_4bit(dense.model.layers[0].self_attn.q_proj.weight.detach(),
                           quant_type="nf4", double_quant=True, dq_rounding="cpu_lut")
same = {field: torch.equal(getattr(state, field), getattr(ours, field))
        for field in ("packed", "absmax", "offset", "nested_absmax", "code", "nested_code")}
print(same)
print("dequantized weights equal:", torch.equal(quant.dequantize_4bit(state),
                                                 quant.dequantize_4bit(ours)))
assert all(same.values())

# %% [markdown]
# ## 3. `prepare_model_for_kbit_training`
#
# PEFT's preparation does three things, which lesson 9's `qlora.quantize_model` does (or does
# not need) too: it freezes every parameter, casts the remaining 16-bit ones (norms,
# embeddings) to float32 for stable training, and turns on gradient checkpointing so that the
# activations of each layer are recomputed in the backward pass instead of stored (QLoRA's
# paper relies on it; our tiny models do without). We choose PyTorch's non-reentrant
# checkpointing, the one PyTorch recommends (it asks for the choice to be explicit).

# %%
with warnings_shown():
    model = peft.prepare_model_for_kbit_training(
        model, gradient_checkpointing_kwargs={"use_reentrant": False})
print("trainable after preparation:", lora.count_parameters(model)[0])
print("dtypes of the parameters:", sorted({str(p.dtype) for p in model.parameters()}))
print("gradient checkpointing:", model.model.gradient_checkpointing)

# %% [markdown]
# The warning comes from inside PEFT: it still calls a `transformers` method that version 5
# renamed (it warns again in the next cell). Nothing to fix in our code; it is the cost of two
# libraries moving at different speeds.
#
# ## 4. `LoraConfig(target_modules="all-linear")`, `get_peft_model`, `print_trainable_parameters`
#
# `"all-linear"` is PEFT's shorthand for QLoRA's choice: every linear layer except the output
# head. pedaPEFT takes the names themselves, so we pass the seven short names found in
# section 1. Same rank, same α, same layers: the same count, to the parameter. PEFT counts a
# 4-bit weight by its *logical* size (two parameters per stored byte), so its "all params"
# is the dense model's count plus the adapters.

# %%
lora_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                              task_type="CAUSAL_LM")
with warnings_shown():
    peft_model = peft.get_peft_model(model, lora_config)
peft_model.print_trainable_parameters()

ours_model = copy.deepcopy(dense)
targets = tuple(name for name in linear_names if name != "lm_head")
wrapped = qlora.quantize_model(ours_model, lora.LoRAConfig(r=8, alpha=16, target_modules=targets),
                               quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
ours_trainable, _ = lora.count_parameters(ours_model)
print(f"pedaPEFT: {len(wrapped)} QLoRA layers, trainable params: {ours_trainable:,} || "
      f"all params: {n_dense + ours_trainable:,}")
peft_trainable, peft_total = peft_model.get_nb_trainable_parameters()
assert (peft_trainable, peft_total) == (ours_trainable, n_dense + ours_trainable)
assert ours_trainable == 2 * (4 * 8 * (64 + 64) + 3 * 8 * (64 + 256))

# %% [markdown]
# Each layer carries $r\,(d_\text{in} + d_\text{out})$ adapter numbers: 8 · (64 + 64) for q, k,
# v, o and 8 · (64 + 256) for each of the MLP's three, times two layers: 11,776 per layer.
#
# The two models compute the same function. Copy PEFT's $A$ and $B$ into ours (both use
# `lora_A` (r, in) and `lora_B` (out, r)) and compare the logits: both dequantize the same
# NF4 bytes and compute in bf16. Both models are put in training mode first: `from_pretrained`
# returns a model in evaluation mode, and on this CPU a bitsandbytes layer run once in
# evaluation mode is repacked for inference and then trains wrong (section 8 measures it).

# %%
generator = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, layer in qlora.qlora_layers(ours_model).items():
        theirs = peft_model.base_model.model.get_submodule(name)
        theirs.lora_B["default"].weight.normal_(0, 0.05, generator=generator)
        layer.lora_A.copy_(theirs.lora_A["default"].weight)
        layer.lora_B.copy_(theirs.lora_B["default"].weight)
batch = data.task_data("shift", "train", 32, 16)
peft_model.train()
ours_model.train()
with torch.no_grad():
    logits_peft = peft_model(input_ids=batch.x).logits.float()
    logits_ours = ours_model(input_ids=batch.x).logits.float()
gap = float((logits_peft - logits_ours).abs().max() / logits_peft.abs().max())
print(f"largest logit difference, relative: {gap:.1e} (bf16 rounding is 3.9e-03)")
assert gap < 2e-2

# %% [markdown]
# ## 5. Training with a paged 32-bit AdamW
#
# QLoRA's paged optimizer keeps AdamW's states (32-bit, 8 bytes per trainable parameter) in
# CUDA unified memory, so the driver can move them to CPU memory when the GPU runs short
# (lesson 10). On a CPU there is no GPU memory to page from: bitsandbytes says so and falls
# back to a plain 32-bit AdamW, which it runs with its CPU kernel. The training step itself is
# PyTorch's: forward, loss, backward, step.

# %%
def shift_loss(net, batch):
    """Cross-entropy of the next-character predictions on a course task (lesson 3)."""
    logits = net(input_ids=batch.x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.y.flatten(),
                           ignore_index=data.IGNORE_INDEX)


def train_steps(net, optimizer, steps=12):
    """The losses of `steps` training steps of net on fresh 'shift' batches of 32."""
    losses = []
    for _ in range(steps):
        loss = shift_loss(net, data.task_data("shift", "train", 32, 16))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


peft_model.config.use_cache = False  # no key/value cache while training (checkpointing)
trainable = [p for p in peft_model.parameters() if p.requires_grad]
with warnings_shown():
    optimizer = bnb.optim.PagedAdamW32bit(trainable, lr=3e-3)
    losses = train_steps(peft_model, optimizer)
print(f"PEFT + bitsandbytes, training loss: step 1 {losses[0]:.3f} -> step 12 {losses[-1]:.3f}")
assert losses[-1] < losses[0]

# %% [markdown]
# pedaPEFT's `paged.PagedAdamW` runs the same update under a byte budget; with a budget that
# holds every state nothing is evicted and it is exactly AdamW (lesson 10). Our copy of the
# model, started from the same adapters, follows the same losses up to bf16 rounding:

# %%
optimizer_ours = paged.PagedAdamW([p for p in ours_model.parameters() if p.requires_grad],
                                  lr=3e-3, weight_decay=0.0, budget_bytes=2**20)
losses_ours = train_steps(ours_model, optimizer_ours)
print(f"pedaPEFT, training loss:               step 1 {losses_ours[0]:.3f} -> step 12 "
      f"{losses_ours[-1]:.3f}; pages evicted: {optimizer_ours.stats.evictions}")
assert max(abs(a - b) for a, b in zip(losses, losses_ours, strict=True)) < 0.05

# %% [markdown]
# (bitsandbytes' AdamW defaults to no weight decay, `torch.optim.AdamW` and ours to 0.01; we
# set 0 to compare like with like.)
#
# ## 6. Saving and loading adapters
#
# `save_pretrained` on a PEFT model writes only the adapter: `adapter_model.safetensors` with
# two tensors per layer and `adapter_config.json`. pedaPEFT's `serialization.save_lora_adapter`
# writes the same two files under the same key names (lesson 5), so an adapter trained with
# pedaPEFT loads into PEFT. We train LoRA on the course's own tiny GPT with pedaPEFT, save
# it, and load it with `PeftModel.from_pretrained` into a fresh copy of the same base.

# %%
adapter_dir = Path(tempfile.mkdtemp())
peft_model.save_pretrained(adapter_dir / "peft")
peft_keys = sorted(load_file(adapter_dir / "peft" / "adapter_model.safetensors"))
print(sorted(p.name for p in (adapter_dir / "peft").iterdir()))
print(f"{len(peft_keys)} tensors, e.g. {peft_keys[0]}")

gpt_base = gpt.load_pretrained("tiny")
tuned_gpt = copy.deepcopy(gpt_base)
lora.apply_lora(tuned_gpt, lora.LoRAConfig(r=8, alpha=16, target_modules=gpt.ALL_LINEAR))
with torch.no_grad():
    for layer in lora.lora_layers(tuned_gpt).values():
        layer.lora_B.normal_(0, 0.05, generator=generator)
serialization.save_lora_adapter(tuned_gpt, adapter_dir / "pedapeft")
our_keys = sorted(load_file(adapter_dir / "pedapeft" / "adapter_model.safetensors"))
print(f"pedaPEFT's file: {len(our_keys)} tensors, e.g. {our_keys[0]}")

with warnings_shown():
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(gpt_base), adapter_dir / "pedapeft")
idx = data.task_data("shift", "test", 16, 16).x
with torch.no_grad():
    gap = float((loaded.eval()(idx) - tuned_gpt.eval()(idx)).abs().max())
print(f"PEFT with pedaPEFT's adapter vs pedaPEFT: largest logit difference {gap:.1e}")
print("PEFT counts the loaded model as pedaPEFT does:",
      loaded.get_nb_trainable_parameters()[1] == lora.count_parameters(tuned_gpt)[1])
assert gap < 1e-5

# %% [markdown]
# And the other way round: pedaPEFT reads PEFT's file. `serialization.load_lora_adapter`
# checks every key, shape and setting before it changes the model, then wraps the named
# layers (here all 14 of the LLaMA's, into the dense copy):

# %%
from_peft = copy.deepcopy(dense)
names = serialization.load_lora_adapter(from_peft, adapter_dir / "peft")
print(f"loaded {len(names)} layers, e.g. {names[0]}")
print("same A and B as PEFT's:", all(
    torch.equal(layer.lora_A, peft_model.base_model.model.get_submodule(n).lora_A["default"].weight)
    for n, layer in lora.lora_layers(from_peft).items()))

# %% [markdown]
# ## 7. `merge_and_unload`
#
# After training, `merge_and_unload` folds $s\,BA$ into each base layer and removes the
# adapters. On a 4-bit base, PEFT dequantizes, adds the update and **quantizes again**, and
# warns about it — lesson 9, section 8 measured why: the new rounding error is a sizeable
# share of the update. pedaPEFT's `qlora.merge_qlora` gives a dense layer by default, and
# re-quantizes only when asked (`requantize=True`). We measure PEFT's new rounding error
# against the exact merge, layer by layer, as lesson 9's `qlora.requantization_error` does.

# %%
def dequantized(linear4bit):
    """The float32 weight a bitsandbytes Linear4bit holds, read through pedaPEFT."""
    return quant.dequantize_4bit(quant.from_bnb_state_dict(linear4bit.state_dict())).float()


peft_layers = {name: peft_model.base_model.model.get_submodule(name)
               for name in qlora.qlora_layers(ours_model)}
with torch.no_grad():
    before = peft_model(input_ids=idx).logits.float()
    deltas = {name: m.get_delta_weight("default").float() for name, m in peft_layers.items()}
    exact = {name: dequantized(m.base_layer) + deltas[name] for name, m in peft_layers.items()}
with warnings_shown():
    merged = peft_model.merge_and_unload()
with torch.no_grad():
    after = merged(input_ids=idx).logits.float()
peft_lost = [float((dequantized(merged.get_submodule(name)) - exact[name]).norm()
                   / deltas[name].norm()) for name in exact]
print(f"PEFT, merged into {type(merged.model.layers[0].self_attn.q_proj).__name__}: "
      f"relative change {float((after - before).abs().max() / before.abs().max()):.3f}; "
      f"re-quantization error {sum(peft_lost) / len(peft_lost):.2f} x the update")

with torch.no_grad():
    before_ours = ours_model(input_ids=idx).logits.float()
errors = [qlora.requantization_error(layer) for layer in qlora.qlora_layers(ours_model).values()]
ours_lost = sum(e["delta_lost"] for e in errors) / len(errors)
qlora.merge_qlora(ours_model)
with torch.no_grad():
    change = float((ours_model(input_ids=idx).logits.float() - before_ours).abs().max()
                   / before_ours.abs().max())
print(f"pedaPEFT, merged into {type(ours_model.model.layers[0].self_attn.q_proj).__name__}: "
      f"relative change {change:.3f}")
print(f"pedaPEFT, re-quantizing instead would add an error of {ours_lost:.2f} x the update "
      f"(mean of {len(errors)} layers)")
assert abs(ours_lost - sum(peft_lost) / len(peft_lost)) < 0.02

# %% [markdown]
# Both libraries lose the same share of the update when they re-quantize; only the dense merge
# keeps the trained model's outputs (up to bf16 rounding).
#
# ## 8. Where the libraries differ: bitsandbytes on the CPU
#
# So far every comparison was exact. Here is one that is not. A 4-bit weight of shape
# (m, n) is quantized as one flat sequence of blocks: element $(i, j)$ sits at position
# $p = i\,n + j$ and is scaled by the absmax of block $\lfloor p / 64 \rfloor$. bitsandbytes'
# CPU backend quantizes exactly so, but its dequantization, when the processor has AVX-512
# and $n$ is a multiple of 16, walks the weight row by row and reads the scale
#
# $$\text{absmax}\big[\, i \cdot \lfloor n / 64 \rfloor + \lfloor j / 64 \rfloor \,\big],$$
#
# which is the flat block only when $n$ is a multiple of the block size. We can *ask* it which
# scale it uses: quantize a weight of ones (every code is NF4's $+1$), set `absmax[b] = b`,
# and dequantize — each element comes back as the number of the block whose scale it got.
#
# What these cells print depends on the processor: the stored outputs come from one with
# AVX-512 BF16. On yours they show what your processor does, and their checks adapt to it.

# %%
# NBVAL_IGNORE_OUTPUT
capability = torch.backends.cpu.get_cpu_capability()
print(f"this CPU: {capability}")
shape = (6, 48)  # rows narrower than a block of 64
print("the block of each element, row by row: flat (the definition) | bitsandbytes CPU")
for flat_row, cpu_row in zip(bnb_cpu.flat_scale_index(shape).tolist(),
                             bnb_cpu.measured_scale_index(shape).tolist(), strict=True):
    print("".join(map(str, flat_row)), "|", "".join(map(str, cpu_row)))

# %% [markdown]
# On this processor, every row takes block 0's scale: rows 2 to 5 are scaled by the absmax of
# other weights. The grid below quantizes random weights of 32 rows to NF4 with both libraries
# for several row widths and block sizes, and compares: `bytes` (packed codes and scales equal),
# `weights` (dequantized weights equal), the elements with a wrong scale and the ratio of the
# RMS errors, bitsandbytes on the CPU over pedaPEFT.

# %%
# NBVAL_IGNORE_OUTPUT
widths = [16, 48, 64, 96, 100, 176, 256]
grid = bnb_cpu.error_grid([(32, n) for n in widths], [32, 64, 128])
print(f"{'shape':<10} {'block':>5}  {'bytes':<6} {'weights':<7} {'wrong scales':>12} "
      f"{'error ratio':>11}")
for row in grid:
    print(f"{str(row['shape']):<10} {row['blocksize']:>5}  {str(row['same_bytes']):<6} "
          f"{str(row['same_weights']):<7} {row['wrong_scales']:>12,} {row['ratio']:>11.2f}")
bad = [row for row in grid if not row["same_weights"]]
if bad:
    print(f"{len(bad)} of {len(grid)} cases differ; error ratio "
          f"{min(r['ratio'] for r in bad):.2f} to {max(r['ratio'] for r in bad):.2f}")
else:
    print(f"none of the {len(grid)} cases differs on this processor")
assert all(2 < r["ratio"] < 4.5 for r in bad)
if capability.startswith("AVX512"):
    for row in grid:
        rule = bnb_cpu.row_scale_index(row["shape"], row["blocksize"])
        flat = bnb_cpu.flat_scale_index(row["shape"], row["blocksize"])
        predicted = row["shape"][1] % 16 == 0 and not torch.equal(rule, flat)
        assert predicted == (row["wrong_scales"] > 0) == (not row["same_weights"])
assert all(row["same_bytes"] for row in grid)

# %% [markdown]
# What the table says:
#
# * **The bytes always agree.** Quantization on the CPU is the definition; the stored file
#   is right, and the same file dequantized on a GPU (or by pedaPEFT) gives the right weights.
# * **Dequantization on the CPU is wrong** where the row width is a multiple of 16 but not of
#   the block size: rows narrower than a block (16 or 48 wide with blocks of 64), rows of
#   96 or 176, and even 64-wide rows with blocks of 128. The error is two to four and a half
#   times NF4's own. Widths that are not multiples of 16 (100) take a slower loop that is right,
#   and widths that are multiples of the block size are right.
# * **bitsandbytes on CUDA computes the flat blocks**, as pedaPEFT does; the GPU tests
#   compare the two bit for bit on these shapes (`tests/test_quant_bnb_gpu.py`). On a
#   processor without AVX-512 the CPU backend takes the right loop everywhere, and this table
#   shows no difference.
#
# Real models are mostly safe: LLaMA's widths (4096, 11008, 14336) are multiples of 64, and
# `BitsAndBytesConfig` uses blocks of 64. The small models of tutorials and tests are not:
# a LLaMA configuration with `intermediate_size=176` would train, on the CPU, against a
# `down_proj` about three times noisier than NF4 (the row (32, 176), block 64) — silently.
# The course's own tests therefore compare pedaPEFT with bitsandbytes' CPU dequantization only
# where the measured scale map is the flat one, and check elsewhere that bitsandbytes reads
# the row-wise scale described above.
#
# ### A layer used once for inference trains wrong
#
# The second difference is in `Linear4bit.forward`. On a processor with AVX-512 BF16, a layer
# called in evaluation mode on an input that needs no gradient repacks its weight into a
# layout for a fast inference kernel, and keeps it. That kernel has no backward: a later
# training step runs the forward right, but no gradient flows back through the frozen weight
# to the layer's input. PyTorch warns that this "may lead to silently incorrect behavior";
# the loss shows nothing. We measure $\partial L / \partial x$ of one layer before and after a
# single evaluation-mode call, against the exact gradient $g\,\mathrm{dequant}(Q)$:

# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(2)
layer4 = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16,
                           quant_type="nf4").to("cpu")
x = torch.randn(8, 64, dtype=torch.bfloat16)
grad_y = torch.randn(8, 64, dtype=torch.bfloat16)
exact = grad_y.float() @ dequantized(layer4)


def input_gradient(layer):
    """dL/dx of one training-mode forward and backward through the layer."""
    x_train = x.clone().requires_grad_(True)
    layer.train()
    layer(x_train).backward(grad_y)
    return x_train.grad


def gradient_error(grad):
    """||grad - g · dequant(Q)|| / ||g · dequant(Q)||."""
    return float((grad.float() - exact).norm() / exact.norm())


def gradient_report(grad):
    """The relative error of a gradient against g · dequant(Q), or that none arrived."""
    if grad is None:
        return "no gradient reaches x (x.grad is None)"
    return f"dL/dx relative error {gradient_error(grad):.4f}"


fresh = input_gradient(layer4)
print(f"fresh layer:                    {gradient_report(fresh)}")
layer4.eval()
with warnings_shown(), torch.no_grad():
    layer4(x)
with warnings_shown():
    after_eval = input_gradient(layer4)
print(f"after one evaluation-mode call: {gradient_report(after_eval)}")
assert fresh is not None and gradient_error(fresh) < 1e-2
if bnb.functional.has_avx512bf16():
    assert after_eval is None or gradient_error(after_eval) > 0.5

# %% [markdown]
# In a model, the layers below then get only the share of the gradient that flows through
# the LoRA branches, so every adapter below the top layer learns from a wrong gradient. The
# remedies are simple once known: call `model.train()` before any forward pass you will train
# after (a `transformers` model comes from `from_pretrained` in evaluation mode), or save the
# model's state dict (saving undoes the repacking). pedaPEFT's `QLoRALinear` has one code path
# for both modes.
#
# The lesson for any library you rely on: test it against a reference you understand, on the
# shapes you will actually use, and on the backend you will run.

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 1.** Write `all_linear_targets(model, head)`: the sorted short names (the last
# part of each module name, like `q_proj`) of every `torch.nn.Linear` in `model`, except the
# output head, the module named `head` — what `target_modules="all-linear"` expands to. A name
# that also belongs to a layer elsewhere in the model stays in the list.

# %%
### BEGIN SOLUTION
def all_linear_targets(model: torch.nn.Module, head: str) -> list[str]:
    """Short names of every nn.Linear of model except the module named head, sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name != head})
### END SOLUTION


# %%
exercises.check("12-all-linear", all_linear_targets)

# %% [markdown]
# **Exercise 2.** Write `cpu_scale_index(shape, blocksize)`: for an (m, n) weight, the
# int64 tensor of shape (m, n) holding, for every element, the index of the absmax that
# bitsandbytes' AVX-512 CPU loop reads for it (section 8's formula).

# %%
### BEGIN SOLUTION
def cpu_scale_index(shape: tuple[int, int], blocksize: int) -> torch.Tensor:
    """i * (n // blocksize) + j // blocksize for every element (i, j)."""
    m, n = shape
    rows = torch.arange(m).unsqueeze(1) * (n // blocksize)
    return rows + (torch.arange(n) // blocksize).unsqueeze(0)
### END SOLUTION


# %%
exercises.check("12-scale-index", cpu_scale_index)

# %% [markdown]
# **Exercise 3.** LLaMA-3-8B has 32 layers of width 4096; its k and v projections map 4096 to
# 1024 (grouped-query attention) and its MLP 4096 to 14336 and back (gate, up and down). How
# many parameters does `LoraConfig(r=16, target_modules="all-linear")` train? Store it in
# `llama3_8b_r16`.

# %%
### BEGIN SOLUTION
per_layer = (4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3
llama3_8b_r16 = 16 * per_layer * 32
### END SOLUTION

# %%
exercises.check("12-llama-lora-count", llama3_8b_r16)
