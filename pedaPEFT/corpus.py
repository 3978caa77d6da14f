"""Real text, offline: Python's own documentation as a frozen corpus, its splits and perplexity.

The corpus (``texts/pydocs.json.xz``, made once by ``tools/freeze_pydocs.py``; PSF licence in
``texts/PSF-LICENSE.txt``) holds two kinds of document: the pydoc *topics* (the language
reference behind ``help("for")``) and the docstrings of standard-library *modules*, one
document per module. It is read from the package, never from the running interpreter, so every
number derived from it is the same on every Python version.

Splits are by document, decided by a hash of the document's id (stable, no random state):

* a held-out *domain* (``DOMAINS``: the ``asyncio`` modules) is never seen in pretraining, nor
  by the tokenizer; its documents split into ``domain-train`` (2/3) and ``domain-test`` (1/3)
  for fine-tuning;
* every other document goes to ``train`` (18/20), ``validation`` (1/20) or ``test`` (1/20).

Perplexity of a model on a token stream x_1 ... x_N is exp of the mean next-token
cross-entropy, PPL = exp(-(1/n) sum_t log p(x_t | x_<t)): the number of equally likely tokens
the model is, on average, choosing among. A model that ignores context does best with the
unigram distribution p(x) = (count(x) + 1) / (N + V) (add-one smoothed), the baseline here.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
from collections import Counter
from functools import cache
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from pedaPEFT.bpe import Tokenizer

DOMAINS = {"asyncio": "module:asyncio"}
"""Held-out domains: name -> prefix of the ids of its documents."""

SPLITS = ("train", "validation", "test", "domain-train", "domain-test")
VOCAB_SIZE = 2048
TEXTS = resources.files("pedaPEFT") / "texts"


def _check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    return domain


@cache
def load() -> dict:
    """The frozen corpus: ``{"python_version": ..., "documents": [{"id", "kind", "text"}]}``."""
    return json.loads(lzma.decompress((TEXTS / "pydocs.json.xz").read_bytes()))


def documents() -> list[dict[str, str]]:
    return load()["documents"]


def _bucket(doc_id: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") % n


def split_of(doc_id: str, domain: str = "asyncio") -> str:
    """The split of the document ``doc_id`` when ``domain`` is held out (see the module doc)."""
    if doc_id.startswith(DOMAINS[_check_domain(domain)]):
        return "domain-test" if _bucket(doc_id, 3) == 0 else "domain-train"
    return {0: "validation", 1: "test"}.get(_bucket(doc_id, 20), "train")


def split_texts(split: str, domain: str = "asyncio") -> list[str]:
    """The texts of the documents in ``split``, in corpus order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [d["text"] for d in documents() if split_of(d["id"], domain) == split]


@cache
def tokenizer() -> Tokenizer:
    """The shipped BPE (``texts/pydocs_bpe.json``), trained by ``train_tokenizer()``."""
    with resources.as_file(TEXTS / "pydocs_bpe.json") as path:
        return Tokenizer.load(path)


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the BPE on the ``train`` split (a few seconds); the shipped one was made by this."""
    from pedaPEFT import bpe

    return Tokenizer(bpe.train(split_texts("train"), vocab_size))


@cache
def tokens(split: str, domain: str = "asyncio") -> torch.Tensor:
    """The documents of ``split`` encoded one after another, as one int64 stream."""
    encode = tokenizer().encode
    return torch.tensor([i for text in split_texts(split, domain) for i in encode(text)],
                        dtype=torch.long)


def batch(stream: torch.Tensor, step: int, batch_size: int, block_size: int,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch: ``batch_size`` windows of ``block_size + 1`` tokens at start
    positions drawn uniformly, as a pure function of (seed, step); y is x shifted by one."""
    if stream.numel() <= block_size + 1:
        raise ValueError(f"stream of {stream.numel()} tokens is too short for "
                         f"block_size={block_size}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(stream.numel() - block_size - 1, (batch_size,), generator=generator)
    windows = torch.stack([stream[s : s + block_size + 1] for s in starts.tolist()])
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


@torch.no_grad()
def perplexity(model: nn.Module, stream: torch.Tensor, block_size: int | None = None,
               batch_size: int = 16) -> float:
    """exp(mean cross-entropy) of ``model`` on ``stream``, read in consecutive windows of
    ``block_size`` tokens (the model's context by default), each predicting its next tokens."""
    block_size = block_size or model.config.block_size
    device = next(model.parameters()).device
    n_windows = (stream.numel() - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"stream of {stream.numel()} tokens is shorter than one window")
    x = stream[: n_windows * block_size].view(n_windows, block_size)
    y = stream[1 : n_windows * block_size + 1].view(n_windows, block_size)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n_windows, batch_size):
        logits = model(x[i : i + batch_size].to(device)).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i : i + batch_size].flatten()
                                       .to(device), reduction="sum"))
    model.train(was_training)
    return math.exp(total / y.numel())


def unigram_perplexity(train_stream: torch.Tensor, stream: torch.Tensor,
                       vocab_size: int = VOCAB_SIZE) -> float:
    """Perplexity on ``stream`` of add-one-smoothed token frequencies of ``train_stream``."""
    counts = Counter(train_stream.tolist())
    total = train_stream.numel() + vocab_size
    log_p = sum(math.log((counts[i] + 1) / total) for i in stream[1:].tolist())
    return math.exp(-log_p / (stream.numel() - 1))
