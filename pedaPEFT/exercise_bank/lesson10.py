"""Lesson 10 exercises: one AdamW update, the page plan of a paged optimizer, its pages.

The update is compared with ``torch.optim.AdamW`` over several steps; the plan and the pages
with what ``paged.PagedAdamW`` decides and counts on the simulated (CPU) device. Known wrong
variants are recognised and named.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pedaPEFT import paged
from pedaPEFT.exercise_bank.base import Exercise, Mistake
from pedaPEFT.exercise_bank.tensor_checks import call, close, seeded

# --------------------------------------------------------------------------- AdamW


def _variant(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int,
             lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
             mistake: str) -> None:
    """One AdamW step with one known mistake planted (in place), to recognise it."""
    if mistake == "coupled decay":
        grad = grad + weight_decay * param
    elif mistake == "decay without lr":
        param.mul_(1 - weight_decay)
    else:
        param.mul_(1 - lr * weight_decay)
    m.mul_(beta1).add_((1 - beta1) * grad)
    v.mul_(beta2).add_((1 - beta2) * grad * grad)
    m_hat = m if mistake == "no bias correction" else m / (1 - beta1**t)
    v_hat = v if mistake == "no bias correction" else v / (1 - beta2**t)
    if mistake == "eps inside":
        param.sub_(lr * m_hat / (v_hat + eps).sqrt())
    else:
        param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


MISTAKES = {
    "no bias correction": "bias correction missing: divide m by 1 - β₁ᵗ and v by 1 - β₂ᵗ "
                          "(t counts from 1)",
    "coupled decay": "weight decay added to the gradient (Adam with L2): AdamW decays the "
                     "weights directly, θ ← θ(1 - lr·λ), before the moments",
    "decay without lr": "the decay is scaled by the learning rate: θ ← θ(1 - lr·λ)",
    "eps inside": "ε goes outside the square root: m̂ / (√v̂ + ε)",
}

SETTINGS = (
    dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    dict(lr=0.003, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0),
    dict(lr=0.05, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.3),
)


def _run_student(answer: Callable, setting: dict, steps: int, g: torch.Generator,
                 shape: tuple[int, ...] = (7, 5)) -> None:
    """Compare ``steps`` student updates with torch.optim.AdamW; recognise known mistakes."""
    lr, (beta1, beta2), eps, wd = (setting["lr"], setting["betas"], setting["eps"],
                                   setting["weight_decay"])
    start = torch.randn(shape, generator=g)
    reference = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([reference], **setting)
    param, m, v = start.clone(), torch.zeros(shape), torch.zeros(shape)
    variants = {name: [start.clone(), torch.zeros(shape), torch.zeros(shape)] for name in MISTAKES}
    for t in range(1, steps + 1):
        grad = torch.randn(shape, generator=g)
        reference.grad = grad.clone()
        optimizer.step()
        before = (param.clone(), m.clone(), v.clone())
        call(answer, param, grad.clone(), m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
             weight_decay=wd, when_it_fails=f"adamw_step fails at step t={t}")
        for name, (p, mm, vv) in variants.items():
            _variant(p, grad, mm, vv, t, lr, beta1, beta2, eps, wd, name)
        if torch.equal(param, before[0]):
            raise Mistake("param must be updated in place (param.mul_, param.add_, ...): the "
                          "function returns nothing")
        if torch.equal(m, before[1]) or torch.equal(v, before[2]):
            raise Mistake("update exp_avg and exp_avg_sq in place: they are the optimizer's "
                          "state, carried to the next step")
        if not bool(torch.isfinite(param).all()):
            raise Mistake("NaN in the weights: the second moment averages g², which is never "
                          "negative")
        if close(param, reference.detach(), rtol=1e-5, atol=1e-7):
            continue
        for name, (p, _, _) in variants.items():
            if close(param, p, rtol=1e-5, atol=1e-7):
                raise Mistake(MISTAKES[name])
        state = optimizer.state[reference]
        if not close(v, state["exp_avg_sq"], rtol=1e-5, atol=1e-12):
            raise Mistake("the second moment differs: v ← β₂ v + (1 - β₂) g²")
        if not close(m, state["exp_avg"], rtol=1e-5, atol=1e-9):
            raise Mistake("the first moment differs: m ← β₁ m + (1 - β₁) g")
        raise Mistake(f"the weights differ from torch.optim.AdamW after step {t}")


def check_adamw_step(answer: Callable) -> None:
    """The student's ``adamw_step(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1,
    beta2, eps, weight_decay)``, in place, against torch.optim.AdamW."""
    g = seeded(10)
    for setting in SETTINGS:
        _run_student(answer, setting, steps=6, g=g)


# --------------------------------------------------------------------------- page plan


def _plan_cases() -> list[tuple[list[torch.Tensor], int, int]]:
    """(params, budget_bytes, page_bytes): fits, first fit past a large tensor, bf16, tight."""
    sizes = [(64, 64), (256, 64), (32,), (64, 32), (128, 128), (16, 16)]
    params = [torch.zeros(shape) for shape in sizes]
    mixed = [torch.zeros(100, 40, dtype=torch.bfloat16), torch.zeros(50, 50),
             torch.zeros(10, 10, dtype=torch.bfloat16), torch.zeros(300, dtype=torch.bfloat16)]
    total = sum(paged.state_bytes(p) for p in params)
    mixed_total = sum(paged.state_bytes(p) for p in mixed)
    return [
        (params, total, 1024),
        (params, total // 2, 1024),
        (params, total - 8, 2048),
        (params, total // 3, 512),
        (mixed, mixed_total // 2, 256),
        (mixed, mixed_total - 1, 64),
    ]


def check_page_plan(answer: Callable) -> None:
    """The student's ``page_plan(params, budget_bytes, page_bytes) -> (evicted, staging)``."""
    for params, budget, page_bytes in _plan_cases():
        result = call(answer, list(params), budget, page_bytes,
                      when_it_fails=f"page_plan fails for {len(params)} tensors, budget_bytes="
                      f"{budget}, page_bytes={page_bytes}")
        if not isinstance(result, tuple | list) or len(result) != 2:
            raise Mistake("return a tuple (evicted indices, staging bytes)")
        evicted, staging = result
        try:
            evicted, staging = sorted(int(i) for i in evicted), int(staging)
        except (TypeError, ValueError):
            raise Mistake("evicted must be a list of parameter indices and staging a number of "
                          "bytes") from None
        stats = paged.PagedAdamW(params, budget_bytes=budget, page_bytes=page_bytes).stats
        if evicted == stats.evicted_params and staging == stats.staging_bytes:
            continue
        if not stats.evicted_params:
            raise Mistake("when every state fits the budget nothing is paged: no evictions and "
                          "no page buffers (staging 0)")
        if not evicted and staging == 0:
            raise Mistake("the states do not all fit this budget: each parameter has 2 moments "
                          "x numel x element_size bytes of state")
        if staging != stats.staging_bytes:
            raise Mistake("the page buffers: 2 slots x 2 moments of page_bytes each, needed as "
                          "soon as anything is evicted")
        if evicted and evicted == list(range(evicted[0], len(params))):
            raise Mistake("first fit: after a state that does not fit, keep trying the later "
                          "ones; a smaller state may still fit")
        raise Mistake("the evicted states differ: the page buffers come out of the budget first, "
                      "then each parameter's states (2 moments x numel x element_size bytes) "
                      "are placed in parameter order while they fit")


# --------------------------------------------------------------------------- pages


def _page_cases() -> list[tuple[torch.Tensor, int]]:
    g = seeded(100)
    return [
        (torch.randn(64, 256, generator=g), 4096),
        (torch.randn(1000, generator=g), 1024),
        (torch.randn(30, 7, generator=g).to(torch.bfloat16), 64),
        (torch.randn(5, generator=g), 8),
    ]


def _pages_moved(param: torch.Tensor, page_bytes: int) -> tuple[int, int]:
    """(pages in, bytes in) of one PagedAdamW step with ``param``'s states evicted.

    The states of ``param`` must exceed the 4 page buffers, or they would fit the budget.
    """
    resident = torch.zeros(page_bytes // 4)  # its states fill what the page buffers leave
    budget = 4 * page_bytes + paged.state_bytes(resident)
    param = param.clone().requires_grad_(True)
    optimizer = paged.PagedAdamW([resident, param], budget_bytes=budget, page_bytes=page_bytes)
    assert optimizer.stats.evicted_params == [1]
    param.grad = torch.ones_like(param)
    optimizer.step()
    return optimizer.stats.pages_in, optimizer.stats.bytes_in


def check_pages(answer: Callable) -> None:
    """The student's ``pages(param, page_bytes) -> [(start, stop), ...]`` (element ranges)."""
    for param, page_bytes in _page_cases():
        result = call(answer, param, page_bytes, when_it_fails=f"pages fails for a "
                      f"{param.dtype} tensor of {param.numel()} elements, page_bytes={page_bytes}")
        try:
            ranges = [(int(start), int(stop)) for start, stop in result]
        except (TypeError, ValueError):
            raise Mistake("return a list of (start, stop) element ranges") from None
        per_page = page_bytes // param.element_size()
        pages_in, bytes_in = _pages_moved(param, page_bytes)
        full = ranges[:-1]
        if full and per_page != page_bytes and all(stop - start == page_bytes
                                                   for start, stop in full):
            raise Mistake("page_bytes counts bytes: a page holds page_bytes // element_size "
                          "elements of the parameter")
        covered = [i for start, stop in ranges for i in range(start, stop)]
        if covered != list(range(param.numel())):
            raise Mistake("the pages must cover the flattened parameter exactly once, in order: "
                          "the last, partial page too")
        if any(stop - start > per_page for start, stop in ranges):
            raise Mistake("a page holds at most page_bytes // element_size elements")
        moved = 2 * param.numel() * param.element_size()
        if len(ranges) != pages_in or bytes_in != moved:
            raise Mistake("the pages differ from what PagedAdamW copies: full pages of "
                          "page_bytes // element_size elements, then one partial page")


EXERCISES: list[Exercise] = [
    Exercise(
        id="10-adamw-step",
        lesson=10,
        title="adamw_step(...): one AdamW update in place, equal to torch.optim.AdamW",
        kind="code",
        run=check_adamw_step,
    ),
    Exercise(
        id="10-page-plan",
        lesson=10,
        title="page_plan(params, budget_bytes, page_bytes): which states leave the device",
        kind="code",
        run=check_page_plan,
    ),
    Exercise(
        id="10-pages",
        lesson=10,
        title="pages(param, page_bytes): the element ranges one evicted tensor is copied in",
        kind="code",
        run=check_pages,
    ),
]
