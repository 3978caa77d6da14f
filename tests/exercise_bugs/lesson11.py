"""Planted bugs for lesson 11's exercises, each with the hint that must name it."""

import math
from collections import Counter


def _pairs(tokens):
    return list(zip(tokens, tokens[1:], strict=False))


def pair_ties_to_largest(tokens):
    counts = Counter(_pairs(tokens))
    return max(counts, key=lambda pair: (counts[pair], pair))


def pair_most_common(tokens):
    return Counter(_pairs(tokens)).most_common(1)[0][0]


def pair_disjoint(tokens):
    counts = Counter(zip(tokens[::2], tokens[1::2], strict=False))
    return min(counts, key=lambda pair: (-counts[pair], pair))


def pair_count_instead(tokens):
    return Counter(_pairs(tokens)).most_common(1)[0][1]


def merge(tokens, pair, new_id, step_after_merge=2, keep_last=True):
    """The solution, with switches that plant the usual mistakes."""
    merged, i = [], 0
    while i < len(tokens) - (0 if keep_last else 1):
        if i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == pair:
            merged.append(new_id)
            i += step_after_merge
        else:
            merged.append(tokens[i])
            i += 1
    return merged


def merge_overlapping(tokens, pair, new_id):
    return merge(tokens, pair, new_id, step_after_merge=1)


def merge_drops_last(tokens, pair, new_id):
    return merge(tokens, pair, new_id, keep_last=False)


def merge_right_to_left(tokens, pair, new_id):
    return merge(tokens[::-1], (pair[1], pair[0]), new_id)[::-1]


def merge_first_only(tokens, pair, new_id):
    for i in range(len(tokens) - 1):
        if (tokens[i], tokens[i + 1]) == pair:
            return tokens[:i] + [new_id] + tokens[i + 2:]
    return list(tokens)


def merge_in_place(tokens, pair, new_id):
    tokens[:] = merge(tokens, pair, new_id)
    return tokens


BUGS = {
    "11-most-frequent-pair": [
        (pair_ties_to_largest, "ties go to the largest pair"),
        (pair_most_common, "Counter.most_common breaks ties by order of appearance"),
        (pair_disjoint, "not disjoint pairs"),
        (pair_count_instead, "return the pair itself"),
    ],
    "11-merge-pair": [
        (merge_overlapping, "occurrences overlap"),
        (merge_drops_last, "loses the last token"),
        (merge_right_to_left, "merge left to right"),
        (merge_first_only, "only the first occurrence was replaced"),
        (merge_in_place, "changed the list it was given"),
    ],
    "11-ppl-from-loss": [
        (2**3.2, "the loss is in nats"),
        (math.exp(-3.2), "exp(-loss)"),
        (3.2, "the loss itself"),
    ],
}
