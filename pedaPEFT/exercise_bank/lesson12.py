"""Lesson 12's exercises: what "all-linear" expands to, bitsandbytes' CPU scale index, and the
LoRA count of LLaMA-3-8B.

``all_linear_targets`` is checked on small models built here, with the output head in
different places, a Linear nested in a Sequential (a name like ``"0"``), a short name shared
by the head and another layer, and layers that are not Linear. ``cpu_scale_index`` is checked
against :func:`pedaPEFT.bnb_cpu.row_scale_index` on seeded shapes and blocksizes, widths above,
below and equal to a block. The count is ``r · Σ (d_in + d_out)`` over LLaMA-3-8B's seven
linear layers per block, 32 blocks.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from pedaPEFT import bnb_cpu
from pedaPEFT.exercise_bank.base import Exercise, Mistake, as_int, call

SEED = 12


class _Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


class _Model(nn.Module):
    """Blocks of attention and an MLP (one Linear inside a Sequential), then a head."""

    def __init__(self, width: int, n_blocks: int, head_name: str, mlp_name: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "attn": _Attention(width),
            mlp_name: nn.Sequential(nn.Linear(width, 2 * width), nn.GELU()),
        }) for _ in range(n_blocks))
        self.add_module(head_name, nn.Linear(width, 10))


def _models() -> list[tuple[nn.Module, str]]:
    cases = [(_Model(8, 2, "lm_head", "mlp"), "lm_head"), (_Model(4, 1, "out", "ffn"), "out")]
    shared = _Model(4, 1, "v_proj", "mlp")  # the head's short name is also an attention layer's
    cases.append((shared, "v_proj"))
    nested = nn.Sequential(_Model(4, 1, "lm_head", "mlp"))
    cases.append((nested, "0.lm_head"))
    return cases


def _expected(model: nn.Module, head: str) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and name != head})


def _run_all_linear(answer: Any) -> None:
    for model, head in _models():
        got = call(answer, model, head, name=f"all_linear_targets(model, {head!r})")
        if got is None:
            raise Mistake("all_linear_targets returns nothing: return the sorted list of names.")
        if isinstance(got, str) or not all(isinstance(name, str) for name in got):
            raise Mistake("return a list of module names (strings), such as ['q_proj', ...].")
        got = list(got)
        expected = _expected(model, head)
        if got == expected:
            continue
        full = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        if any("." in name for name in got) and set(got) <= full:
            raise Mistake("give the short names, the last part after the final '.', as "
                          "target_modules takes them (q_proj, not blocks.0.attn.q_proj).")
        if len(got) != len(set(got)):
            raise Mistake("each short name once: layers of every block share their names.")
        head_short = head.rsplit(".", 1)[-1]
        if head_short in got and head_short not in expected:
            raise Mistake("the output head is in the list: leave out the module named head.")
        if sorted(got) == expected:
            raise Mistake("sort the names.")
        missing = sorted(set(expected) - set(got))
        if missing and any(name.isdigit() for name in missing):
            raise Mistake("a Linear inside an nn.Sequential is missing: walk every module with "
                          "named_modules(), not only named attributes.")
        if missing and head_short in missing:
            raise Mistake("a layer that shares its short name with the head was dropped: "
                          "compare full names with head, not short names.")
        if set(got) - set(expected):
            raise Mistake("the list holds names of modules that are not nn.Linear (or the "
                          "head): keep only isinstance(module, torch.nn.Linear).")
        raise Mistake("some linear layers are missing: every nn.Linear but the head counts.")


def _scale_cases(seed: int) -> list[tuple[tuple[int, int], int]]:
    rng = random.Random(seed)
    cases = [((6, 48), 64), ((4, 96), 64), ((3, 128), 64), ((2, 64), 128), ((1, 40), 32)]
    for _ in range(12):
        cases.append(((rng.randint(1, 7), 16 * rng.randint(1, 20)), rng.choice((32, 64, 128))))
    return cases


def _run_scale_index(answer: Any) -> None:
    for shape, blocksize in _scale_cases(SEED):
        where = f"cpu_scale_index({shape}, {blocksize})"
        got = call(answer, shape, blocksize, name=where)
        if not isinstance(got, torch.Tensor):
            raise Mistake(f"{where} must return a torch tensor, got {type(got).__name__}.")
        if tuple(got.shape) != shape:
            raise Mistake(f"{where} has shape {tuple(got.shape)}: one index per element, "
                          "shape (m, n).")
        if got.dtype.is_floating_point:
            raise Mistake("the indices must be integers (int64): use // and torch.arange.")
        expected = bnb_cpu.row_scale_index(shape, blocksize)
        if torch.equal(got.long(), expected):
            continue
        if torch.equal(got.long(), bnb_cpu.flat_scale_index(shape, blocksize)):
            raise Mistake(f"{where} is the flat block (i·n + j) // blocksize, the definition; "
                          "the CPU loop adds i times the whole blocks per row, n // blocksize.")
        m, n = shape
        ceil_rows = torch.arange(m).unsqueeze(1) * (-(-n // blocksize))
        if torch.equal(got.long(), ceil_rows + torch.arange(n) // blocksize):
            raise Mistake("n // blocksize rounds down: the loop counts only whole blocks per "
                          "row, not ceil(n / blocksize).")
        raise Mistake(f"{where} differs from the loop's index i·(n // blocksize) + "
                      "j // blocksize.")


# LLaMA-3-8B: (d_in, d_out) of q, k, v, o, gate, up, down in each of its 32 blocks
LLAMA3_8B_LINEAR = ((4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                    (4096, 14336), (4096, 14336), (14336, 4096))
LLAMA3_8B_BLOCKS, RANK = 32, 16


def _llama_count(shapes: tuple[tuple[int, int], ...] = LLAMA3_8B_LINEAR,
                 blocks: int = LLAMA3_8B_BLOCKS, r: int = RANK) -> int:
    return r * blocks * sum(d_in + d_out for d_in, d_out in shapes)


def _run_llama_count(answer: Any) -> None:
    value = as_int(answer, "llama3_8b_r16")
    expected = _llama_count()
    if value == expected:
        return
    square_kv = tuple((4096, 4096) if i in (1, 2) else s for i, s in enumerate(LLAMA3_8B_LINEAR))
    wrongs = (
        (_llama_count(square_kv), "k and v map 4096 to 1024 (grouped-query attention), "
                                  "not to 4096."),
        (_llama_count(LLAMA3_8B_LINEAR[:4]), "all-linear includes the MLP's gate, up and down "
                                             "projections too."),
        (_llama_count(LLAMA3_8B_LINEAR[:1] + LLAMA3_8B_LINEAR[2:3]), "that is q and v only: "
                                                                     "all-linear takes all seven."),
        (_llama_count(blocks=1), "count all 32 layers."),
        (_llama_count(r=1), "multiply by the rank r = 16."),
        (RANK * LLAMA3_8B_BLOCKS * sum(a * b for a, b in LLAMA3_8B_LINEAR) // 4096,
         "A is r × d_in and B is d_out × r: r · (d_in + d_out) per layer."),
    )
    for wrong, hint in wrongs:
        if value == wrong:
            raise Mistake(hint)
    raise Mistake("add r · (d_in + d_out) over the seven linear layers of a block, times 32.")


EXERCISES = [
    Exercise("12-all-linear", 12, "all_linear_targets(model, head): the short names "
             "target_modules='all-linear' expands to", "code", _run_all_linear),
    Exercise("12-scale-index", 12, "cpu_scale_index(shape, blocksize): the absmax index "
             "bitsandbytes' AVX-512 CPU loop reads for each element", "code", _run_scale_index),
    Exercise("12-llama-lora-count", 12, "llama3_8b_r16: LoRA parameters of r = 16 on all "
             "linear layers of LLaMA-3-8B", "number", _run_llama_count,
             lambda: [f"{_llama_count():,}", str(_llama_count()), f"{_llama_count() / 1e6:.1f}"]),
]
