"""Synthetic tasks, encoding, exact-match scoring and the text-file loader."""

import pytest
import torch

from pedaPEFT import data, gpt
from pedaPEFT.gpt import GPTConfig


def test_encode_decode_round_trip_and_alphabet():
    text = "r:abcxyz=zyxcba\n"
    assert data.decode(data.encode(text)) == text
    assert len(data.CHARS) == len(set(data.CHARS)) <= GPTConfig.preset("tiny").vocab_size
    with pytest.raises(ValueError, match="outside the alphabet"):
        data.encode("ABC")


@pytest.mark.parametrize(
    ("name", "text", "answer"),
    [
        ("shift", "abcxyz", "bcdyza"),
        ("reverse", "abcdef", "fedcba"),
        ("swap", "abcdef", "badcfe"),
        ("copy", "qwerty", "qwerty"),
        ("next", "wxy", "zabcde"),
    ],
)
def test_task_answers(name, text, answer):
    assert data.get_task(name).solve(text) == answer


def test_encoding_scores_only_the_answer():
    x, y = data.encode_examples([("r:abcdef=", "fedcba\n")], 16)
    assert data.decode(x[0, :15]) == "r:abcdef=fedcba"
    assert (x[0, 15:] == data.PAD_ID).all()
    scored = y[0] != data.IGNORE_INDEX
    # The prediction made at "=" (position 8) is the first answer character.
    assert scored.nonzero().flatten().tolist() == list(range(8, 15))
    assert data.decode(y[0, scored]) == "fedcba\n"
    with pytest.raises(ValueError, match="needs block_size >= 15"):
        data.encode_examples([("r:abcdef=", "fedcba\n")], 8)


def test_task_data_is_deterministic_and_splits_are_disjoint():
    a = data.task_data("reverse", "train", 300)
    b = data.task_data("reverse", "train", 300)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    test = data.task_data("reverse", "test", data.TEST_SIZE)
    train_prompts = {data.decode(row[:9]) for row in a.x}
    test_prompts = {data.decode(row[:9]) for row in test.x}
    assert len(test_prompts) > 400
    assert not train_prompts & test_prompts
    xb, yb = a.batch(step=3, batch_size=16)
    xb2, _ = a.batch(step=3, batch_size=16)
    xb3, _ = a.batch(step=4, batch_size=16)
    assert torch.equal(xb, xb2) and not torch.equal(xb, xb3)
    assert xb.shape == yb.shape == (16, 16)


def test_pretrain_batch_mixes_tasks_and_is_a_function_of_the_step():
    x, y = data.pretrain_batch(5, 8, 16)
    x2, _ = data.pretrain_batch(5, 8, 16)
    assert torch.equal(x, x2)
    tags = {data.decode(row[:2]) for row in x}
    assert tags == {f"{t.tag}:" for t in data.PRETRAIN_TASKS.values()}
    assert (y[:, 0] != data.IGNORE_INDEX).all()  # language modelling: the prompt is scored too


class Oracle(torch.nn.Module):
    """Puts all its mass on the gold next character, except where told to be wrong."""

    def __init__(self, targets: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.targets, self.vocab = targets, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        gold = self.targets[: x.shape[0]].clamp(min=0)
        return torch.nn.functional.one_hot(gold, self.vocab).float()


def test_exact_match_counts_whole_answers():
    split = data.task_data("swap", "test", 64)
    targets = split.y.clone()
    assert data.exact_match(Oracle(targets, 48), split) == 1.0
    # Break one answer character in 16 rows: exactly those rows become wrong.
    rows = torch.arange(0, 64, 4)
    first_answer = (split.y[rows] != data.IGNORE_INDEX).float().argmax(1)
    targets[rows, first_answer + 2] = (targets[rows, first_answer + 2] + 1) % 26 + 5
    assert data.exact_match(Oracle(targets, 48), split) == pytest.approx(48 / 64)


def test_exact_match_equals_greedy_decoding():
    # The shipped base copies (pretraining task) but cannot shift: a mix of right and wrong rows.
    model = gpt.load_pretrained("tiny")
    copy, shift = data.task_data("copy", "test", 8), data.task_data("shift", "test", 8)
    mixed = data.TaskData(
        "mixed", "test", torch.cat([copy.x, shift.x]), torch.cat([copy.y, shift.y])
    )
    greedy_right = []
    for row_x, row_y in zip(mixed.x, mixed.y, strict=True):
        scored = row_y != data.IGNORE_INDEX
        prompt_len = int(scored.float().argmax()) + 1
        out = model.generate(row_x[None, :prompt_len], int(scored.sum()))[0, prompt_len:]
        greedy_right.append(torch.equal(out, row_y[scored]))
    assert 0 < sum(greedy_right) < len(mixed)
    assert data.exact_match(model, mixed) == sum(greedy_right) / len(mixed)


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="task must be one of"):
        data.task_data("translate", "train", 4)
    with pytest.raises(ValueError, match="split must be one of"):
        data.task_data("reverse", "validation", 4)
    with pytest.raises(ValueError, match="n must be >= 1"):
        data.task_data("reverse", "train", 0)
