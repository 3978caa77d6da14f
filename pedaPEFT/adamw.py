"""The AdamW update, elementwise: what ``paged.PagedAdamW`` runs on each page (lesson 10).

AdamW (Loshchilov & Hutter) keeps two running moments per parameter and updates, at step t,

    θ ← θ · (1 − lr·λ)                                  decoupled weight decay
    m ← β₁ m + (1 − β₁) g                               first moment (exp_avg)
    v ← β₂ v + (1 − β₂) g²                              second moment (exp_avg_sq)
    θ ← θ − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)   bias-corrected step

Every operation is elementwise, so a slice of θ can be updated with the same slices of g, m
and v alone: the fact that makes paging the states possible.
"""

from __future__ import annotations

import torch
from torch import Tensor


def adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update, in place, on lists of same-device tensors (the module docstring's
    math; lesson 10 derives it and checks it against ``torch.optim.AdamW``).

    ``steps[i]`` is the step number t of tensor i after this step (1 on the first step). The
    operations and their order are those of ``torch.optim.AdamW``, so results agree bit for bit.
    """
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_sizes = [-(lr / (1 - beta1**t)) for t in steps]
    bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, bias_correction2_sqrt)
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)


def state_bytes(param: Tensor) -> int:
    """Bytes of AdamW state for ``param``: two moments of its shape and dtype.

    Introduced in lesson 10.
    """
    return 2 * param.numel() * param.element_size()
