"""Bottleneck (Houlsby) adapters: a small residual MLP inserted into a frozen network.

An adapter maps a hidden vector ``h`` of size ``d`` (``d_model``) through a bottleneck of
size ``m`` and adds the result back::

    adapter(h) = h + W_up · f(W_down · h + b_down) + b_up,
    W_down: (m, d),  W_up: (d, m),  f a nonlinearity (GELU by default).

Its parameter count is ``2·d·m`` weights plus ``m + d`` biases (:func:`bottleneck_param_count`);
for d = 1024, m = 24 that is 49,152 weights, against 1,048,576 for one dense d×d layer.

Houlsby et al. (2019) place one adapter after the attention output projection and one after
the feed-forward output projection of every transformer block, before each residual sum, and
initialise both projections near zero so the adapted network starts as (almost) the original
one.  Here the up-projection starts at exactly zero (like LoRA's ``B``), so a fresh adapter is
exactly the identity; the down-projection gets PyTorch's default ``nn.Linear`` initialisation
so that the up-projection receives a useful gradient from the first step.

:func:`add_adapters` inserts adapters into any model by wrapping the modules whose names match
(exact name or dotted suffix, the rule PEFT uses for LoRA targets) and freezes everything else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pedaPEFT.gpt import ADAPTER_TARGETS
from pedaPEFT.targets import check_targets, find_targets

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}




def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def _check_bottleneck(d_model: object, bottleneck: object) -> tuple[int, int]:
    d_model = _check_positive_int(d_model, "d_model")
    bottleneck = _check_positive_int(bottleneck, "bottleneck")
    if bottleneck >= d_model:
        raise ValueError(
            f"bottleneck must satisfy 0 < bottleneck < d_model = {d_model}, got {bottleneck}"
        )
    return d_model, bottleneck


def bottleneck_param_count(d_model: int, bottleneck: int, bias: bool = True) -> int:
    """Parameters of one bottleneck adapter: ``2·d·m`` weights, plus ``m + d`` biases if ``bias``.

    >>> bottleneck_param_count(1024, 24, bias=False)
    49152
    >>> bottleneck_param_count(1024, 24)
    50200

    Introduced in lesson 4, section "2. Counting parameters: the lecture's example".
    """
    d_model, bottleneck = _check_bottleneck(d_model, bottleneck)
    weights = 2 * d_model * bottleneck
    return weights + (bottleneck + d_model if bias else 0)


class BottleneckAdapter(nn.Module):
    """``h + up(f(down(h)))`` with ``down: d → m``, ``up: m → d``; exactly the identity at init.

    Args:
        d_model: size ``d`` of the hidden vectors the adapter reads and writes.
        bottleneck: size ``m`` of the bottleneck, ``0 < m < d``.
        activation: one of ``"gelu"``, ``"relu"``, ``"swish"``, ``"tanh"``.

    Introduced in lesson 4, section "3. An adapter, step by step".
    """

    def __init__(self, d_model: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        d_model, bottleneck = _check_bottleneck(d_model, bottleneck)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.d_model = d_model
        self.bottleneck = bottleneck
        self.activation_name = activation
        self.down = nn.Linear(d_model, bottleneck)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Down-projection: PyTorch's Linear init, U(±1/√d), zero bias; up-projection: zeros."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.d_model:
            raise ValueError(
                f"h must have last dimension d_model = {self.d_model}, got shape {tuple(h.shape)}"
            )
        return h + self.up(self.activation(self.down(h)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}"


class WithAdapter(nn.Module):
    """Runs ``base_layer`` and then a :class:`BottleneckAdapter` on its output."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.adapter(self.base_layer(*args, **kwargs))


def _output_size(module: nn.Module, name: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    raise TypeError(
        f"add_adapters can only follow nn.Linear modules; {name!r} is {type(module).__name__}"
    )


def add_adapters(
    model: nn.Module,
    bottleneck: int,
    targets: Iterable[str] = ADAPTER_TARGETS,
    activation: str = "gelu",
    freeze: bool = True,
) -> list[str]:
    """Put a :class:`BottleneckAdapter` after every ``nn.Linear`` whose name matches ``targets``.

    The wrapped modules are replaced in place by :class:`WithAdapter`; the adapter's size is the
    wrapped layer's ``out_features``.  With ``freeze`` (the default) every parameter except the
    adapters' is frozen, so only ``len(result) · bottleneck_param_count(d, m)`` parameters train.
    The adapters are created on the device and in the dtype of the layer they follow.

    Returns the names of the wrapped modules, in ``model.named_modules()`` order.

    Introduced in lesson 4, section "4. Where adapters go".
    """
    targets = check_targets(targets)
    _check_positive_int(bottleneck, "bottleneck")
    matches = find_targets(model, targets, "targets")
    for name, module in matches:
        if isinstance(module, WithAdapter) or name.endswith(".base_layer"):
            raise ValueError(f"targets: module {name!r} already has an adapter")
    for name, module in matches:
        d_model = _output_size(module, name)
        if bottleneck >= d_model:
            raise ValueError(
                f"bottleneck must satisfy 0 < bottleneck < d_model = {d_model} "
                f"(output size of {name!r}), got {bottleneck}"
            )
    wrapped = []
    for name, module in matches:
        adapter = BottleneckAdapter(module.out_features, bottleneck, activation)
        adapter.to(device=module.weight.device, dtype=module.weight.dtype)
        model.set_submodule(name, WithAdapter(module, adapter))
        wrapped.append(name)
    if freeze:
        for param_name, param in model.named_parameters():
            param.requires_grad = ".adapter." in f".{param_name}"
    return wrapped


def prepare_adapters(
    model: nn.Module,
    bottleneck: int = 16,
    targets: Iterable[str] = ADAPTER_TARGETS,
    activation: str = "gelu",
) -> nn.Module:
    """Fine-tuning method ``"adapter"`` for :func:`pedaPEFT.train.finetune`: Houlsby adapters
    after ``o`` and ``proj`` of every block, everything else frozen; returns ``model``."""
    add_adapters(model, bottleneck, targets, activation)
    return model
