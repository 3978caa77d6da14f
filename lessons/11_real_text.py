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
# # Lesson 11 — QLoRA on real text
#
# Every earlier lesson fine-tunes on synthetic tasks over 48 symbols: fast and exact, but a
# model never *writes* anything. This lesson fine-tunes a language model on real English and
# measures it the way language models are measured, by **perplexity**, and still downloads
# nothing: every Python installation ships its own documentation as text. The package holds a
# frozen copy of it, a tokenizer trained on it and a small GPT pretrained on it.
#
# **You will learn:** how byte-pair encoding turns text into tokens, what perplexity measures
# and what a model must beat, and what full fine-tuning, LoRA and QLoRA each buy on a domain
# the base model has never read — in perplexity, trainable parameters, bytes and samples.

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
from collections import Counter

import matplotlib.pyplot as plt
import torch

from pedaPEFT import bpe, corpus, exercises, figures, gpt, lora, qlora, realtext, train, train_text

# %% [markdown]
# ## 1. The corpus: Python's documentation, frozen
#
# `tools/freeze_pydocs.py` extracted, once, the pydoc *topics* (`pydoc_data.topics`, the
# language reference behind `help("for")`) and the docstrings of about 230 standard-library
# modules, and stored them compressed in the package (`pedaPEFT/texts/pydocs.json.xz`, with the
# PSF licence beside it). The package never reads the running interpreter's copy, so every
# number below is the same on every Python version.
#
# Documents are split by a hash of their name. The `asyncio` modules are a held-out **domain**:
# neither the tokenizer nor the base model ever saw them. Fine-tuning trains on two thirds of
# them (`domain-train`) and is scored on the rest (`domain-test`).

# %%
docs = corpus.documents()
print(f"corpus from Python {corpus.load()['python_version']}: {len(docs)} documents, "
      f"{sum(len(d['text']) for d in docs):,} characters")
print(f"{'split':<13}{'documents':>10}{'characters':>12}{'tokens':>9}")
for split in corpus.SPLITS:
    texts = corpus.split_texts(split)
    print(f"{split:<13}{len(texts):>10}{sum(map(len, texts)):>12,}"
          f"{corpus.tokens(split).numel():>9,}")

# %%
print(corpus.split_texts("domain-train")[0][:400])

# %% [markdown]
# ## 2. Tokens: byte-pair encoding
#
# A language model predicts one token after another from a fixed vocabulary. Characters make
# sequences long; whole words make the vocabulary endless and leave unseen words unreadable.
# **Byte-pair encoding** (BPE; Sennrich et al. 2016, GPT-2's tokenizer) sits between: start
# from the 256 byte values, so every text can be written, then repeatedly
#
# 1. count every pair of adjacent tokens in the training text,
# 2. make the most frequent pair a new token (ties: the smallest pair), and
# 3. replace the pair by the new token everywhere,
#
# until the vocabulary has the size you want. The list of merges *is* the tokenizer: encoding
# replays them in the order they were learnt. Pairs never cross a word boundary: the text is
# first cut into words (letters with the space before them, digits, punctuation, spaces).
#
# Here are three merges by hand on a classic toy string.

# %%
tokens = list(b"aaabdaaabac")
merges_by_hand = []
for new_id in (256, 257, 258):
    counts = Counter(zip(tokens, tokens[1:], strict=False))
    best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, then smallest
    merges_by_hand.append(best)
    tokens = bpe.merge_pair(tokens, best, new_id)
    print(f"merge {best} -> {new_id}: {tokens}")
assert merges_by_hand == bpe.train(["aaabdaaabac"], 259)
print("the package's bpe.train learns the same merges")

# %% [markdown]
# The course's tokenizer learnt 2,048 − 256 = 1,792 merges on the `train` split. Frequent
# words become one token; rare ones (like the held-out domain's) split into pieces:

# %%
tok = corpus.tokenizer()
sentence = "Return a coroutine that waits for the event loop."
print(" | ".join(tok.token_strings(tok.encode(sentence))))
print("last merges learnt:", [tok.vocab[i].decode() for i in range(2040, 2048)])
for split in ("train", "domain-test"):
    chars = sum(map(len, corpus.split_texts(split)))
    print(f"{split:<12} {chars / corpus.tokens(split).numel():.2f} characters per token")
assert all(tok.decode(tok.encode(d["text"])) == d["text"] for d in docs[:50])

# %% [markdown]
# ## 3. Perplexity, and the number to beat
#
# A language model gives every next token a probability. Its **perplexity** on a text of $n$
# predicted tokens is
#
# $$\mathrm{PPL} = \exp\Big(-\frac{1}{n}\sum_{t} \log p(x_t \mid x_{<t})\Big),$$
#
# the exponential of the mean cross-entropy loss: a perplexity of 20 means the model is, on
# average, as unsure as a fair choice among 20 tokens. Guessing uniformly gives the vocabulary
# size, 2,048. A model that ignores context can at best use each token's frequency, the
# **unigram** baseline. The `pydocs` base must be far below it.

# %%
base = gpt.load_pretrained("pydocs")
info = gpt.pretrained_info("pydocs")
print(f"pydocs base: {sum(p.numel() for p in base.parameters()):,} parameters "
      f"(analytic {gpt.parameter_count(base.config):,}), context {base.config.block_size} "
      f"tokens, {base.config.n_layer} layers, width {base.config.n_embd}")
print(f"pretrained {info['train_config']['steps']} steps on {info['device']}, kept step "
      f"{info['metrics']['kept_step']} (lowest validation perplexity)")
validation = corpus.tokens("validation")[:8193]
domain_test = corpus.tokens("domain-test")
train_stream = corpus.tokens("train")
print(f"{'':<32}{'validation':>11}{'asyncio test':>14}")
for name, ppl in (
    ("uniform guess", lambda s: float(corpus.VOCAB_SIZE)),
    ("unigram frequencies", lambda s: corpus.unigram_perplexity(train_stream, s)),
    ("pydocs base", lambda s: corpus.perplexity(base, s)),
):
    print(f"{name:<32}{ppl(validation):>11.1f}{ppl(domain_test):>14.1f}")

# %% [markdown]
# The base is more than ten times better than the unigram baseline on documents it never
# trained on (the first 8,192 validation tokens here, to keep the lesson fast; the test suite
# scores them all). The unseen `asyncio` documents score *lower* than the validation split:
# perplexity depends on the text as much as on the model (docstrings repeat signatures and
# stock phrases; the language reference in the validation split does not), which is why every
# comparison below scores the same `asyncio` test documents before and after.

# %% [markdown]
# ## 4. QLoRA's memory on this model
#
# QLoRA stores every linear layer of the blocks in NF4 with double quantization (lessons 7–8)
# and trains rank-8 adapters on all of them. The embedding, the tied head and the LayerNorms
# stay in float32; the quantized base is read-only.

# %%
quantized = gpt.load_pretrained("pydocs")
qlora.prepare_qlora(quantized, r=8, alpha=16, targets=gpt.ALL_LINEAR)
print(f"model bytes, float32:       {qlora.model_bytes(base):>10,}")
print(f"model bytes, QLoRA:         {qlora.model_bytes(quantized):>10,}")
print(f"stored bits per base weight: {qlora.base_bits_per_parameter(quantized):.3f}")
lora.print_trainable_parameters(quantized)
print(f"perplexity on the asyncio test, quantized, before training: "
      f"{corpus.perplexity(quantized, domain_test):.1f}")

# %% [markdown]
# ## 5. Fine-tuning on the unseen domain, live
#
# A small configuration (20 steps of 8 windows of 128 tokens; the full one below is 100 steps
# of 16 × 256 over three seeds) is enough to see the perplexity fall on the held-out
# `asyncio` documents. Perplexity is measured every 10 steps on windows of 128 tokens.

# %%
seed_everything(0)
live = gpt.load_pretrained("pydocs")
config = train.TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=2, weight_decay=0.0,
                           eval_interval=10, progress=False, device="cpu")
result = train_text.finetune_text(live, "asyncio", "qlora", config,
                             {"r": 8, "alpha": 16, "targets": gpt.ALL_LINEAR},
                             block_size=128)
print(f"step  0: perplexity {result.perplexity_before:.1f}")
for row in result.run.evals:
    print(f"step {row['step']:>2}: perplexity {row['perplexity']:.1f}")
assert result.perplexity < result.perplexity_before

# %% [markdown]
# ## 6. Full fine-tuning, LoRA and QLoRA, three seeds
#
# `python -m pedaPEFT realtext-experiment --scale full` fine-tunes the base with each method
# (100 steps of 16 windows of 256 tokens, three seeds; about a minute on an H200) and commits
# the numbers to `figures/data/realtext_asyncio.json`. Full fine-tuning uses a peak learning
# rate of 5·10⁻⁴, the adapters 3·10⁻³; every adapter has r = 8, α = 16. *Stored* is what one
# task must keep besides the shared base (its trained tensors, float32); *model* is the memory
# of all weights during fine-tuning.

# %%
results = realtext.load_results()
print(f"{'method':<17}{'trainable':>10}{'stored':>11}{'model':>11}"
      f"{'PPL before':>11}{'PPL after':>16}")
for row in results["summary"]:
    print(f"{row['label']:<17}{row['trainable']:>10,}{row['stored_bytes'] / 2**20:>7.2f} MiB"
          f"{row['model_bytes'] / 2**20:>7.2f} MiB{row['perplexity_before']:>11.1f}"
          f"{row['perplexity_after']:>10.1f} ± {row['perplexity_after_std']:.1f}")
print(f"device: {results['device']}")

# %%
figure = figures.realtext_perplexity()
plt.show()

# %% [markdown]
# Peak GPU memory and wall time of each run (weights, gradients, optimizer states and
# activations at 16 × 256 tokens, bf16 autocast). At this size QLoRA saves no *peak* memory:
# the weights are a few megabytes, the activations and CUDA's workspace dominate, and each
# quantized layer is dequantized to bf16 on the fly. Its saving is the model itself, 8.9 MiB →
# 2.8 MiB above; lesson 9 shows where that becomes the whole story (LLaMA-3-8B). The first run
# of the sweep also pays for CUDA's start, hence the spread in time.

# %%
for row in results["summary"]:
    print(f"{row['label']:<17} peak {row['peak_memory_bytes'] / 2**20:6.1f} MiB, "
          f"{row['seconds']:4.1f} ± {row['seconds_std']:.1f} s")

# %% [markdown]
# ## 7. What the model writes, before and after
#
# The same three prompts, continued for 40 tokens by the base and by the QLoRA model of
# seed 0: greedily (always the most likely token) and by sampling at temperature 0.8.
# After fine-tuning the model writes in the domain's own voice (*event loop*, *coroutine*,
# *transport*, method signatures). `class Queue` shows the classic failure of a small model:
# it repeats one token pair; greedy decoding never escapes, sampling does only after
# fine-tuning.

# %%
for kind in results["samples_before"]:
    print(f"===== {kind} =====")
    for before, after in zip(results["samples_before"][kind], results["samples_after"][kind],
                             strict=True):
        print(f"--- before:\n{before}\n--- after QLoRA:\n{after}\n")

# %% [markdown]
# ## Exercises

# %% [markdown]
# **Exercise 1.** Write `most_frequent_pair(tokens)`: the most frequent pair of adjacent tokens
# of a list, ties going to the smallest pair — the choice BPE training makes at every merge.
# The check compares it with the first merge `bpe.train` learns, on random token lists.

# %%
### BEGIN SOLUTION
def most_frequent_pair(tokens: list[int]) -> tuple[int, int]:
    """The most frequent adjacent pair of ``tokens``; among equals, the smallest."""
    counts = Counter(zip(tokens, tokens[1:], strict=False))
    return min(counts, key=lambda pair: (-counts[pair], pair))
### END SOLUTION


# %%
exercises.check("11-most-frequent-pair", most_frequent_pair)

# %% [markdown]
# **Exercise 2.** Write `merge_pair(tokens, pair, new_id)`: a new list in which every
# occurrence of `pair` is replaced by `new_id`, scanning left to right without overlaps (in
# `[a, a, a]` only the first two merge), every other token kept — BPE's step 3. The check
# compares it with `bpe.merge_pair`.

# %%
### BEGIN SOLUTION
def merge_pair(tokens: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``tokens`` with each non-overlapping ``pair``, left to right, replaced by ``new_id``."""
    merged, i = [], 0
    while i < len(tokens):
        if i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(tokens[i])
            i += 1
    return merged
### END SOLUTION


# %%
exercises.check("11-merge-pair", merge_pair)

# %% [markdown]
# **Exercise 3.** A model's mean cross-entropy on a text is 3.2 nats per token. What is its
# perplexity? Store it in `ppl_from_loss`.

# %%
### BEGIN SOLUTION
ppl_from_loss = float(torch.tensor(3.2).exp())
### END SOLUTION

# %%
exercises.check("11-ppl-from-loss", ppl_from_loss)
