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

import math

import torch
from torch import Tensor

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")  # per parameter, as torch.optim.AdamW keeps them


def check_hyperparameters(lr: object, betas: object, eps: object, weight_decay: object,
                          where: str = "") -> None:
    """``torch.optim.AdamW``'s checks, NaN and inf refused as well; ``ValueError`` names the
    hyperparameter (prefixed by ``where``, e.g. the parameter group of a state dict)."""
    def real(value: object) -> bool:
        return isinstance(value, float | int) and not isinstance(value, bool) and (
            math.isfinite(value))

    if not (real(lr) and lr >= 0):
        raise ValueError(f"{where}lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(betas, tuple | list) and len(betas) == 2
            and all(real(beta) and 0.0 <= beta < 1.0 for beta in betas)):
        raise ValueError(f"{where}betas must be two numbers in [0, 1), got {betas!r}")
    if not (real(eps) and eps >= 0):
        raise ValueError(f"{where}eps must be a finite number >= 0, got {eps!r}")
    if not (real(weight_decay) and weight_decay >= 0):
        raise ValueError(f"{where}weight_decay must be a finite number >= 0, got {weight_decay!r}")


def check_state_dict(state_dict: dict) -> tuple[list[dict], dict]:
    """Check an AdamW state dict in torch's layout; returns its (param_groups, state).

    Every group has ``params`` (indexes, each used once) and valid hyperparameters; ``state``
    is keyed by those indexes only (a string key would be dropped silently otherwise), and
    each entry holds a ``step >= 0`` and float ``exp_avg``/``exp_avg_sq``. ``ValueError``
    names what is wrong; nothing is changed, so a caller can check before it loads.
    """
    groups, states = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ) or not isinstance(states, dict):
        raise ValueError("state_dict must hold 'param_groups' (a list of dicts with 'params') "
                         "and 'state' (a dict)")
    indexes = [index for group in groups for index in group["params"]]
    if len(set(indexes)) != len(indexes) or not set(states) <= set(indexes):
        unknown = sorted(map(repr, set(states) - set(indexes)))
        raise ValueError(f"state_dict's 'state' keys must be the parameter indexes of its "
                         f"param_groups ({len(indexes)}, each once), got unknown keys "
                         f"{unknown[:5]}")
    for number, group in enumerate(groups):
        missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in group]
        if missing:
            raise ValueError(f"state_dict param_groups[{number}] lacks {missing}")
        check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                              f"state_dict param_groups[{number}]: ")
    for index, values in states.items():
        if not isinstance(values, dict) or set(values) != set(STATE_KEYS):
            found = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"state of parameter {index} must have the keys "
                             f"{sorted(STATE_KEYS)}, got {found}")
        step = values["step"]
        step = step.item() if isinstance(step, Tensor) and step.numel() == 1 else step
        if not (isinstance(step, int | float) and math.isfinite(step) and step >= 0):
            raise ValueError(f"state 'step' of parameter {index} must be a number >= 0, "
                             f"got {step!r}")
        for key in ("exp_avg", "exp_avg_sq"):
            if not isinstance(values[key], Tensor) or not values[key].is_floating_point():
                raise ValueError(f"state {key!r} of parameter {index} must be a float tensor")
    return groups, states


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

    Introduced in lesson 10, section "1. What AdamW keeps, and why it can be updated in slices".
    """
    return 2 * param.numel() * param.element_size()


def check_byte_count(value: object, name: str) -> int:
    """``value`` if it is a positive int (a number of bytes), else a ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer number of bytes, got {value!r}")
    return value
