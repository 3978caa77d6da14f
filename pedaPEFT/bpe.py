"""Byte-level byte-pair encoding (BPE), the tokenizer of GPT-2, small enough to read in one sitting.

A text is first cut into *words* by ``PATTERN`` (a run of letters with the space before it, a
run of digits, a run of punctuation, a run of spaces), and every word is its UTF-8 bytes: ids
0 ... 255, so any text whatsoever can be encoded and decoded back exactly.

Training (Sennrich et al. 2016; Radford et al. 2019) repeats ``vocab_size - 256`` times:

    count every pair (a, b) of adjacent tokens inside the words, weighted by word frequency;
    the most frequent pair becomes the new token id 256 + i, written merges[i] = (a, b);
    replace every (a, b) in every word by the new id.

Ties go to the smallest pair (a, b), so training is a pure function of the text.

Encoding a word replays the merges in the order they were learnt: while some adjacent pair of
the word is in ``merges``, merge every occurrence of the pair learnt *earliest*. Decoding
concatenates the bytes of the ids, ``vocab[id]``, where ``vocab[256 + i] = vocab[a] + vocab[b]``
for ``merges[i] = (a, b)``, and reads them as UTF-8.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from pedaPEFT.files import atomic_write_text

PATTERN = re.compile(r" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z_0-9]+|\s+(?!\S)|\s+")
"""Words: letters (and ``_``), digits or punctuation, each with at most one leading space;
whitespace runs keep their last space for the word that follows. The pieces cover the text."""

N_BYTES = 256


def words(text: str) -> list[str]:
    """Cut ``text`` into the pieces merges never cross; ``"".join(words(text)) == text``."""
    return PATTERN.findall(text)


def merge_pair(tokens: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """``tokens`` with each non-overlapping ``pair``, left to right, replaced by ``new_id``."""
    out, i = [], 0
    while i < len(tokens):
        if i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return out


def train(texts: Iterable[str], vocab_size: int) -> list[tuple[int, int]]:
    """Learn ``vocab_size - 256`` merges from ``texts`` (see the module docstring).

    Pair counts are kept up to date word by word instead of recounted after every merge, and
    a heap finds the most frequent pair (entries that went stale are skipped when popped).
    """
    if not isinstance(vocab_size, int) or vocab_size < N_BYTES:
        raise ValueError(f"vocab_size must be an integer >= {N_BYTES}, got {vocab_size!r}")
    frequency = Counter(w for text in texts for w in words(text))
    vocab_words = [list(w.encode("utf-8")) for w in frequency]
    counts = list(frequency.values())
    pair_count: Counter[tuple[int, int]] = Counter()
    words_with: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for index, tokens in enumerate(vocab_words):
        for pair in zip(tokens, tokens[1:], strict=False):
            pair_count[pair] += counts[index]
            words_with[pair].add(index)
    heap = [(-n, pair) for pair, n in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < vocab_size - N_BYTES and heap:
        negative, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negative or -negative == 0:
            continue  # stale entry: the count changed after it was pushed
        new_id = N_BYTES + len(merges)
        merges.append(pair)
        changed = set()
        for index in words_with.pop(pair):
            old = vocab_words[index]
            new = merge_pair(old, pair, new_id)
            if len(new) == len(old):
                continue
            for p in zip(old, old[1:], strict=False):
                pair_count[p] -= counts[index]
                changed.add(p)
            for p in zip(new, new[1:], strict=False):
                pair_count[p] += counts[index]
                words_with[p].add(index)
                changed.add(p)
            vocab_words[index] = new
        del pair_count[pair]
        changed.discard(pair)
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return merges


class Tokenizer:
    """A trained byte-level BPE: ``encode(text) -> ids``, ``decode(ids) -> text``."""

    def __init__(self, merges: Iterable[tuple[int, int]]) -> None:
        self.merges = [tuple(pair) for pair in merges]
        self.rank = {pair: i for i, pair in enumerate(self.merges)}
        self.vocab = [bytes([b]) for b in range(N_BYTES)]
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < N_BYTES + i and 0 <= b < N_BYTES + i):
                raise ValueError(f"merges[{i}] = {(a, b)} uses an id not yet defined")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_word(self, word: str) -> list[int]:
        """Apply the merges to one word, earliest-learnt pair first."""
        if word not in self._cache:
            tokens = list(word.encode("utf-8"))
            while len(tokens) > 1:
                pair = min(zip(tokens, tokens[1:], strict=False),
                           key=lambda p: self.rank.get(p, len(self.rank)))
                if pair not in self.rank:
                    break
                tokens = merge_pair(tokens, pair, N_BYTES + self.rank[pair])
            self._cache[word] = tokens
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [i for word in words(text) for i in self.encode_word(word)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; a cut through a multi-byte character shows as U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {bad[0]}")
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each id's text on its own (to show where the token boundaries fall)."""
        return [self.vocab[int(i)].decode("utf-8", errors="replace") for i in ids]

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps({"merges": self.merges}) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(json.loads(Path(path).read_text())["merges"])
