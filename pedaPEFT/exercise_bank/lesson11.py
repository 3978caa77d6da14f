"""Lesson 11's exercises: BPE's pair choice, BPE's merge step, perplexity from a mean loss.

``most_frequent_pair`` is checked against :func:`pedaPEFT.bpe.train` itself: a token list over
a few ids is relabelled, order kept, to letters, so the text is one word and the first merge
``bpe.train`` learns is exactly the most frequent adjacent pair, ties to the smallest.
``merge_pair`` is checked against :func:`pedaPEFT.bpe.merge_pair` on seeded random lists with
runs of equal tokens, where overlapping and right-to-left merging differ. Perplexity is
``exp(mean loss in nats)``.
"""

from __future__ import annotations

import math
import random
import string
from collections import Counter
from typing import Any

from pedaPEFT import bpe
from pedaPEFT.exercise_bank.base import Exercise, Mistake, as_int, as_real, call

SEED = 11
ALPHABET = string.ascii_lowercase


def _token_lists(seed: int, n_lists: int = 40) -> list[list[int]]:
    """Seeded lists over a few ids (some above 255, as after merges): many ties and runs."""
    rng = random.Random(seed)
    lists = [[97, 97, 97, 98, 100, 97, 97, 97, 98, 97, 99], [7, 7, 7], [5, 1, 5, 1, 2, 3, 2, 3]]
    for _ in range(n_lists):
        ids = rng.sample([1, 2, 3, 97, 98, 256, 300, 301], rng.randint(2, 4))
        lists.append([rng.choice(ids) for _ in range(rng.randint(2, 14))])
    return lists


def _reference_pair(tokens: list[int]) -> tuple[int, int]:
    """The first merge ``bpe.train`` learns on ``tokens`` written as one word of letters."""
    ids = sorted(set(tokens))
    letter = {token: ALPHABET[i] for i, token in enumerate(ids)}
    (first,) = bpe.train(["".join(letter[t] for t in tokens)], bpe.N_BYTES + 1)
    back = {ord(letter[t]): t for t in ids}
    return back[first[0]], back[first[1]]


def _as_pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise Mistake("return the pair itself, a tuple (a, b) of two token ids, not its count "
                      "or a list of pairs.")
    return as_int(value[0], "the pair's first id"), as_int(value[1], "the pair's second id")


def _run_most_frequent_pair(answer: Any) -> None:
    wrong_tie = None
    for tokens in _token_lists(SEED):
        got = _as_pair(call(answer, list(tokens), name=f"most_frequent_pair({tokens})"))
        expected = _reference_pair(tokens)
        if got == expected:
            continue
        counts = Counter(zip(tokens, tokens[1:], strict=False))
        top = counts[expected]
        if counts[got] == 0:
            raise Mistake(f"for {tokens} the pair returned is not a pair of adjacent tokens.")
        if counts[got] < top:
            disjoint = Counter(zip(tokens[::2], tokens[1::2], strict=False))
            if disjoint and got == min(disjoint, key=lambda p: (-disjoint[p], p)):
                raise Mistake("count every adjacent pair, at every position "
                              "(zip(tokens, tokens[1:])), not disjoint pairs.")
            raise Mistake(f"for {tokens} a more frequent pair exists: count every adjacent "
                          "pair and take the largest count.")
        tied = [pair for pair in counts if counts[pair] == top]
        first_seen = next(pair for pair in zip(tokens, tokens[1:], strict=False) if pair in tied)
        if got == first_seen == max(tied):
            wrong_tie = tokens  # both mistakes give this answer: let a later list tell them apart
            continue
        if got == first_seen:
            raise Mistake("ties go to the pair seen first (Counter.most_common breaks ties by "
                          "order of appearance); BPE takes the smallest pair (a, b).")
        if got == max(tied):
            raise Mistake("ties go to the largest pair: BPE takes the smallest pair (a, b), "
                          "e.g. min with key (-count, pair).")
        raise Mistake(f"for {tokens} several pairs are equally frequent: take the smallest "
                      "pair (a, b).")
    if wrong_tie is not None:
        raise Mistake(f"for {wrong_tie} several pairs are equally frequent: take the smallest "
                      "pair (a, b).")


def _merge_cases(seed: int, n_cases: int = 40) -> list[tuple[list[int], tuple[int, int]]]:
    rng = random.Random(seed)
    cases = [([1, 1, 1], (1, 1)), ([1, 2, 1, 2, 3], (1, 2)), ([4, 5, 6], (5, 6)),
             ([1, 1, 1, 1, 1], (1, 1)), ([2, 3], (9, 9))]
    for _ in range(n_cases):
        tokens = [rng.choice((1, 2, 3)) for _ in range(rng.randint(2, 16))]
        i = rng.randrange(len(tokens) - 1)
        cases.append((tokens, (tokens[i], tokens[i + 1])))
    return cases


def _run_merge_pair(answer: Any) -> None:
    new_id = 256
    for tokens, pair in _merge_cases(SEED):
        given = list(tokens)
        got = call(answer, given, pair, new_id,
                   name=f"merge_pair({tokens}, {pair}, {new_id})")
        if given != tokens:
            raise Mistake("merge_pair changed the list it was given: build and return a new "
                          "list (encoding reuses the input).")
        if got is None:
            raise Mistake("merge_pair returns nothing: return the new list of tokens.")
        try:
            got = [as_int(t, "a token") for t in got]
        except TypeError:
            raise Mistake("return a list of token ids.") from None
        expected = bpe.merge_pair(tokens, pair, new_id)
        if got == expected:
            continue
        where = f"merge_pair({tokens}, {pair}, {new_id})"
        if got == expected[:-1] or (len(got) == len(expected) - 1 and got == expected[:len(got)]):
            raise Mistake(f"{where} loses the last token: a token that starts no pair must be "
                          "kept too.")
        if new_id not in got and new_id in expected:
            raise Mistake(f"{where} replaces nothing: compare (tokens[i], tokens[i + 1]) with "
                          "the pair.")
        if got.count(new_id) > expected.count(new_id) and len(got) > len(expected):
            raise Mistake("occurrences overlap: after a merge, skip both tokens of the pair "
                          "(i += 2), so in [a, a, a] only the first two merge.")
        if got == _right_to_left(tokens, pair, new_id):
            raise Mistake("merge left to right: in [a, a, a] the first two tokens merge, not "
                          "the last two.")
        if got.count(new_id) == 1 < expected.count(new_id):
            raise Mistake("only the first occurrence was replaced: replace every "
                          "non-overlapping occurrence.")
        raise Mistake(f"{where} differs from the merge: replace each (a, b), left to right, "
                      "without overlaps, and keep every other token.")


def _right_to_left(tokens: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    reversed_pair = (pair[1], pair[0])
    return bpe.merge_pair(tokens[::-1], reversed_pair, new_id)[::-1]


LOSS_NATS = 3.2


def _run_ppl_from_loss(answer: Any) -> None:
    value = as_real(answer, "ppl_from_loss")
    expected = math.exp(LOSS_NATS)
    if math.isclose(value, expected, rel_tol=1e-6):
        return
    for wrong, hint in ((2**LOSS_NATS, "that is 2 ** loss: the loss is in nats, so the base "
                         "is e (exp)."),
                        (10**LOSS_NATS, "that is 10 ** loss: the loss is in nats, so the base "
                         "is e (exp)."),
                        (math.exp(-LOSS_NATS), "exp(-loss): the cross-entropy is already the "
                         "negative log-probability; perplexity is exp(+loss)."),
                        (LOSS_NATS, "that is the loss itself: perplexity is its exponential."),
                        (math.log(LOSS_NATS), "log(loss): perplexity is the exponential of "
                         "the loss, not its logarithm.")):
        if math.isclose(value, wrong, rel_tol=1e-4):
            raise Mistake(hint)
    raise Mistake("perplexity is the exponential of the mean loss in nats.")


EXERCISES = [
    Exercise("11-most-frequent-pair", 11, "most_frequent_pair(tokens): the most frequent "
             "adjacent pair, ties to the smallest (BPE's choice)", "code",
             _run_most_frequent_pair),
    Exercise("11-merge-pair", 11, "merge_pair(tokens, pair, new_id): every pair replaced by "
             "new_id, left to right, without overlaps", "code", _run_merge_pair),
    Exercise("11-ppl-from-loss", 11, "ppl_from_loss: the perplexity of a mean cross-entropy "
             "of 3.2 nats per token", "number", _run_ppl_from_loss,
             lambda: [f"{math.exp(LOSS_NATS):.{digits}f}" for digits in (2, 3, 4)]),
]
