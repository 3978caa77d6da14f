"""The frozen pydocs corpus, its splits, the byte-level BPE and perplexity."""

import math
import sys

import pytest
import torch

from pedaPEFT import bpe, corpus


def test_bpe_merges_by_hand():
    # "aaabdaaabac": aa occurs 4 times -> 256; then (97, 98) and (256, 97) both occur twice,
    # the tie goes to the smaller pair (97, 98) -> 257; then (256, 257) twice -> 258.
    assert bpe.train(["aaabdaaabac"], 259) == [(97, 97), (97, 98), (256, 257)]
    tok = bpe.Tokenizer(bpe.train(["aaabdaaabac"], 259))
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.vocab[258] == b"aaab"


def test_bpe_round_trip_any_text_and_bad_input():
    tok = corpus.tokenizer()
    text = "naïve café → 😀\t\r\n  x=1  \n\n\n"
    assert tok.decode(tok.encode(text)) == text
    assert "".join(bpe.words(text)) == text
    with pytest.raises(ValueError, match="ids must be in"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train(["abc"], 100)
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")


def test_whole_corpus_round_trips_through_the_shipped_tokenizer():
    tok = corpus.tokenizer()
    assert tok.vocab_size == corpus.VOCAB_SIZE
    for document in corpus.documents():
        assert tok.decode(tok.encode(document["text"])) == document["text"], document["id"]


def test_shipped_tokenizer_is_the_one_trained_on_the_train_split():
    assert corpus.train_tokenizer().merges == corpus.tokenizer().merges


def test_splits_are_by_document_disjoint_and_hold_the_domain_out():
    ids = [d["id"] for d in corpus.documents()]
    assert len(ids) == len(set(ids))
    split = {i: corpus.split_of(i) for i in ids}
    assert set(split.values()) == set(corpus.SPLITS)
    domain = [i for i in ids if i.startswith(corpus.DOMAINS["asyncio"])]
    assert domain and all(split[i].startswith("domain-") for i in domain)
    assert not any(split[i].startswith("domain-") for i in ids if i not in domain)
    sizes = {s: len(corpus.split_texts(s)) for s in corpus.SPLITS}
    assert sum(sizes.values()) == len(ids)
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.split_texts("dev")
    with pytest.raises(ValueError, match="domain must be one of"):
        corpus.split_of("topic:for", domain="email")


def test_corpus_is_frozen_not_read_from_the_interpreter(monkeypatch):
    # With the interpreter's documentation made unimportable, the corpus still loads.
    monkeypatch.setitem(sys.modules, "pydoc_data", None)
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    frozen = corpus.load.__wrapped__()
    assert frozen["documents"] == corpus.documents()
    assert frozen["python_version"].count(".") == 2


def test_batch_is_a_pure_function_of_the_step_and_targets_are_shifted():
    stream = torch.arange(1000)
    x, y = corpus.batch(stream, 7, 4, 16, seed=3)
    x2, y2 = corpus.batch(stream, 7, 4, 16, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (4, 16) and torch.equal(y, x + 1)
    assert not torch.equal(x, corpus.batch(stream, 8, 4, 16, seed=3)[0])
    with pytest.raises(ValueError, match="too short"):
        corpus.batch(torch.arange(10), 0, 2, 16)


class _Uniform(torch.nn.Module):
    """Equal logits for every token: perplexity must be exactly the vocabulary size."""

    def __init__(self, vocab: int, block: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = type("C", (), {"block_size": block})()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab) + self.dummy


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = _Uniform(50, 8)
    assert corpus.perplexity(model, torch.randint(50, (100,))) == pytest.approx(50.0)
    # Unigram: a stream of one token repeated, after training on the same, is nearly certain.
    repeated = torch.zeros(1000, dtype=torch.long)
    assert corpus.unigram_perplexity(repeated, repeated, 50) == pytest.approx(
        1050 / 1001, rel=1e-9)
    assert math.isfinite(corpus.unigram_perplexity(repeated, torch.ones(10, dtype=torch.long)))
