"""Choosing the layers a PEFT method modifies: PEFT's name rule and one validator.

Adapters, LoRA and QLoRA all name their targets the way PEFT's ``target_modules`` does: a
module matches a target when its full name equals it or ends with ``"." + target`` (so ``"q"``
matches ``blocks.0.attn.q`` in every block). This module is that rule, the check of a target
list, and the error message that lists what exists when nothing matches.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def name_matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT's target rule: ``name`` equals a target or ends with ``"." + target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def check_targets(
    targets: object, argument: str = "targets", example: str = "('o', 'proj')"
) -> tuple[str, ...]:
    """``targets`` as a tuple of module names; a clear error naming ``argument`` otherwise.

    A string is one name (``"proj"`` means the layers named ``proj``, never the letters
    p, r, o, j), as in PEFT.
    """
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, Iterable):
        raise TypeError(
            f"{argument} must be a list or tuple of module names such as {example}, "
            f"got {targets!r}"
        )
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{argument} must be a non-empty list of module names, got {targets!r}")
    if any("," in t for t in targets):
        raise ValueError(f"{argument}: module names never contain ','; pass a list of names "
                         f"such as {example}, got {targets!r}")
    return targets


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in ``model``; a wrapped layer is named by its wrapper."""
    return [
        name.removesuffix(".base_layer")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]


def no_match_message(argument: str, targets: tuple[str, ...], model: nn.Module) -> str:
    """Error text for targets that match nothing, listing the Linear layers that exist."""
    names = linear_names(model)
    short = sorted({name.rsplit(".", 1)[-1] for name in names})
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return (
        f"{argument}={list(targets)} matched no module. Available nn.Linear names "
        f"(match by exact name or by last component): {short}; full names: {shown}"
    )


def find_targets(
    model: nn.Module, targets: tuple[str, ...], argument: str
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module matching ``targets`` by PEFT's rule, in model order.

    Raises ``ValueError`` naming ``argument`` and listing the model's Linear layers when nothing
    matches.
    """
    matches = [
        (name, module)
        for name, module in model.named_modules()
        if name and name_matches(name, targets)
    ]
    if not matches:
        raise ValueError(no_match_message(argument, targets, model))
    return matches
