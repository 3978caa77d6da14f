"""BitFit (Ben Zaken et al., 2021): fine-tune the bias vectors only.

Every weight matrix stays frozen; what trains is each bias vector ``b`` of the network (the
biases of every ``nn.Linear`` and the shift ``β`` of every LayerNorm). A linear layer then
computes ``W₀ x + b`` with ``W₀`` fixed: the method can move each layer's output by a learned
constant vector, but cannot change how the layer mixes its inputs.

Parameter count. In a GPT block of width ``d`` with an MLP of width ``4d`` the bias vectors
are ``q, k, v, o`` (``4d``), ``fc`` (``4d``), ``proj`` (``d``) and the two LayerNorm shifts
(``2d``), so for ``L`` blocks and the final LayerNorm

    |Θ_BitFit| = L · 11 d + d                      (:func:`bitfit_param_count`)

and ``L · 13 d + 2d`` when the LayerNorm gains ``γ`` train too (``layernorm_gain=True``).
For GPT-3 175B (L = 96, d = 12,288) that is 12,988,416, or 15,360,000 with the gains.
"""

from __future__ import annotations

from torch import nn


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    return value


def bitfit_param_count(n_layer: int, d_model: int, layernorm_gain: bool = False) -> int:
    """Bias parameters of a GPT with ``n_layer`` blocks of width ``d_model``:
    ``L · 11 d + d``, or ``L · 13 d + 2 d`` with the LayerNorm gains.

    >>> bitfit_param_count(96, 12_288)
    12988416

    Introduced in lesson 4, section "6. Other PEFT families: BitFit and prefix tuning".
    """
    n_layer = _check_int(n_layer, "n_layer", 1)
    d_model = _check_int(d_model, "d_model", 1)
    if not isinstance(layernorm_gain, bool):
        raise TypeError(f"layernorm_gain must be a bool, got {type(layernorm_gain).__name__}")
    if layernorm_gain:
        return n_layer * 13 * d_model + 2 * d_model
    return n_layer * 11 * d_model + d_model


def apply_bitfit(model: nn.Module, layernorm_gain: bool = False) -> list[str]:
    """Freeze every parameter of ``model`` except its bias vectors, in place.

    A bias is a parameter whose own name is ``bias`` (``nn.Linear``, ``nn.LayerNorm``, ...);
    with ``layernorm_gain`` the ``weight`` (``γ``) of every ``nn.LayerNorm`` trains as well.
    Returns the names of the parameters left trainable, in ``named_parameters()`` order.

    Introduced in lesson 4, section "6. Other PEFT families: BitFit and prefix tuning".
    """
    if not isinstance(layernorm_gain, bool):
        raise TypeError(f"layernorm_gain must be a bool, got {type(layernorm_gain).__name__}")
    model.requires_grad_(False)
    trained = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            is_gain = layernorm_gain and isinstance(module, nn.LayerNorm) and param_name == "weight"
            if param_name == "bias" or is_gain:
                param.requires_grad_(True)
                trained.add(f"{module_name}.{param_name}" if module_name else param_name)
    if not trained:
        raise ValueError("model has no bias parameters: BitFit would train nothing")
    return [name for name, _ in model.named_parameters() if name in trained]


def prepare_bitfit(model: nn.Module, layernorm_gain: bool = False) -> nn.Module:
    """Fine-tuning method ``"bitfit"`` for :func:`pedaPEFT.train.finetune`: only the biases
    train (:func:`apply_bitfit`); returns ``model``."""
    apply_bitfit(model, layernorm_gain)
    return model
