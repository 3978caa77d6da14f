"""Deterministic synthetic character data, generated on the spot (nothing is downloaded).

Every example is one line ``<tag>:<input>=<answer>\\n`` over a fixed 41-character alphabet.
The model reads the prompt ``<tag>:<input>=`` and must write the answer and the newline.

* Pretraining mixture (``PRETRAIN_TASKS``): copying six letters (``c:abcdef=abcdef``) and
  continuing the alphabet (``n:kl=mnopqr``). The base learns to read a tag, to route
  characters through attention and the successor map a -> b -> ... -> z -> a.
* Downstream tasks (``TASKS``): the copy prompt ``c:<six letters>=`` with a new answer. The
  base confidently copies, so it scores zero, and what fine-tuning must change differs:
  ``shift`` (every letter to its successor: the copy routing stays, only the letter map
  changes), ``reverse`` (attention must look at other positions) and ``swap`` (swap
  neighbours: routing that alternates with position).

Exact-match accuracy counts an example correct when every answer character (and the
closing newline) is the arg-max prediction given the gold prefix. For a prompt that is the
same as greedy decoding producing the whole answer: the first wrong character is wrong in
both.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

PAD = "_"
CHARS = PAD + "\n:=|" + string.ascii_lowercase + string.digits
STOI = {c: i for i, c in enumerate(CHARS)}
PAD_ID = STOI[PAD]
IGNORE_INDEX = -100  # targets with this value take no part in the loss (PyTorch's default)
LETTERS = string.ascii_lowercase


def encode(text: str) -> list[int]:
    """Character ids of ``text`` in the synthetic alphabet ``CHARS``.

    Introduced in lesson 3, section "1. The workbench: a tiny GPT and synthetic tasks".
    """
    unknown = sorted(set(text) - set(STOI))
    if unknown:
        raise ValueError(f"text contains characters outside the alphabet: {unknown}")
    return [STOI[c] for c in text]


def decode(ids: list[int] | torch.Tensor) -> str:
    """Inverse of ``encode``; every id must be an integer in [0, len(CHARS)).

    Introduced in lesson 3, section "1. The workbench: a tiny GPT and synthetic tasks".
    """
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must hold integers, got a tensor of dtype {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < len(CHARS):
            raise ValueError(f"ids must be integers in [0, {len(CHARS)}), got {i!r}")
    return "".join(CHARS[i] for i in ids)


def _successor(c: str) -> str:
    return LETTERS[(LETTERS.index(c) + 1) % 26]


def _continue_alphabet(s: str) -> str:
    """The six letters that follow the input's last letter, wrapping z -> a."""
    out, c = [], s[-1]
    for _ in range(6):
        c = _successor(c)
        out.append(c)
    return "".join(out)


def _swap_pairs(s: str) -> str:
    chars = list(s)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


@dataclass(frozen=True)
class Task:
    """A string-to-string task: ``answer = solve(input)`` with inputs of ``min_len..max_len``."""

    name: str
    tag: str
    solve: Callable[[str], str]
    min_len: int = 4
    max_len: int = 8
    description: str = ""

    def prompt(self, text: str) -> str:
        return f"{self.tag}:{text}="

    def example(self, rng: np.random.Generator) -> tuple[str, str]:
        """A random (prompt, answer) pair; the answer ends with a newline."""
        n = int(rng.integers(self.min_len, self.max_len + 1))
        text = "".join(rng.choice(list(LETTERS), size=n))
        return self.prompt(text), self.solve(text) + "\n"


PRETRAIN_TASKS: dict[str, Task] = {
    "copy": Task("copy", "c", lambda s: s, 6, 6, "repeat the input"),
    "next": Task("next", "n", _continue_alphabet, 1, 6, "the six letters after the last one"),
}

TASKS: dict[str, Task] = {
    "shift": Task("shift", "c", lambda s: "".join(map(_successor, s)), 6, 6,
                  "replace every letter by the next one (z -> a)"),
    "reverse": Task("reverse", "c", lambda s: s[::-1], 6, 6, "write the input backwards"),
    "swap": Task("swap", "c", _swap_pairs, 6, 6, "swap each pair of neighbouring letters"),
}

SPLIT_SEEDS = {"train": 1, "test": 2}
TEST_SIZE = 512  # the test split's size (``task_data(name, "test", TEST_SIZE)``)


def get_task(name: str) -> Task:
    """The downstream or pretraining task called ``name``."""
    tasks = {**TASKS, **PRETRAIN_TASKS}
    if name not in tasks:
        raise ValueError(f"task must be one of {sorted(tasks)}, got {name!r}")
    return tasks[name]


def encode_examples(
    examples: list[tuple[str, str]], block_size: int, answer_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack (prompt, answer) pairs into inputs ``x`` and next-character targets ``y``.

    Row i holds ``prompt + answer`` left-aligned and padded with ``PAD``; ``y[t] = x[t + 1]``.
    Targets are ``IGNORE_INDEX`` on padding and, if ``answer_only``, on the prompt (a
    prediction made inside the prompt is not scored), so the loss is the answer's.
    """
    x = torch.full((len(examples), block_size), PAD_ID, dtype=torch.long)
    y = torch.full((len(examples), block_size), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, answer) in enumerate(examples):
        ids = encode(prompt + answer)
        if len(ids) > block_size + 1:
            raise ValueError(
                f"example {prompt + answer!r} needs block_size >= {len(ids) - 1}, "
                f"got block_size={block_size}"
            )
        inputs, targets = ids[:-1], ids[1:]
        x[i, : len(inputs)] = torch.tensor(inputs)
        first_scored = len(prompt) - 1 if answer_only else 0
        y[i, first_scored : len(targets)] = torch.tensor(targets[first_scored:])
    return x, y


@dataclass
class TaskData:
    """A fixed split of a task: inputs ``x``, targets ``y`` (both (n, block_size) long)."""

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, step: int, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step``: ``batch_size`` rows drawn at random, a pure function of the step.

        Because a batch depends only on (seed, step), training can stop and resume anywhere
        and several processes can each cut their share out of the same global batch.
        """
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = torch.randint(len(self), (batch_size,), generator=g)
        return self.x[rows], self.y[rows]


def task_data(name: str, split: str, n: int, block_size: int = 16) -> TaskData:
    """``n`` examples of downstream task ``name``; ``split`` is ``"train"`` or ``"test"``.

    The two splits come from different random streams, and test inputs are removed from
    the training split, so test accuracy measures generalisation to unseen strings.

    Introduced in lesson 3, section "1. The workbench: a tiny GPT and synthetic tasks";
    used again in lesson 9.
    """
    task = get_task(name)
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], sum(map(ord, name))])
    held_out: set[str] = set()
    if split == "train":
        test_rng = np.random.default_rng([SPLIT_SEEDS["test"], sum(map(ord, name))])
        held_out = {task.example(test_rng)[0] for _ in range(TEST_SIZE)}
    examples: list[tuple[str, str]] = []
    while len(examples) < n:
        prompt, answer = task.example(rng)
        if prompt not in held_out:
            examples.append((prompt, answer))
    x, y = encode_examples(examples, block_size)
    return TaskData(name, split, x, y)



def pretrain_batch(
    step: int, batch_size: int, block_size: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of the pretraining mixture (equal shares of ``PRETRAIN_TASKS``).

    Fresh examples each step, a pure function of (seed, step). Every character after the
    first is a target (language modelling), padding is not.

    Introduced in lesson 3, section "Checking the accounting against real tensors";
    used again in lesson 10.
    """
    rng = np.random.default_rng([seed, step])
    tasks = list(PRETRAIN_TASKS.values())
    examples = [tasks[i % len(tasks)].example(rng) for i in range(batch_size)]
    return encode_examples(examples, block_size, answer_only=False)


@torch.no_grad()
def exact_match(model: torch.nn.Module, data: TaskData, batch_size: int = 256) -> float:
    """Fraction of examples whose whole answer is predicted correctly (teacher-forced arg-max).

    Introduced in lesson 3, section "1. The workbench: a tiny GPT and synthetic tasks".
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        y = data.y[start : start + batch_size].to(device)
        pred = model(x).argmax(dim=-1)
        scored = y != IGNORE_INDEX
        correct += ((pred == y) | ~scored).all(dim=1).sum().item()
    model.train(was_training)
    return correct / len(data)
