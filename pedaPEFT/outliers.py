"""Weight outliers and activation outliers, measured (lesson 6).

LLM.int8 (Dettmers et al., 2022) found that the weights of trained language models are close
to normal, while a few **feature dimensions** of the activations (the hidden states entering a
linear layer) carry magnitudes far above the rest, in every layer and most tokens. These
functions measure both on any model:

* :func:`kurtosis` of a weight, ``E[(x - μ)^4] / σ^4``: 3 for a normal distribution, larger
  when a few values lie far out;
* :func:`feature_absmax` of activations, ``max |x|`` per feature (last) dimension, and
  :func:`outlier_features`, the dimensions whose ``max |x|`` is at least ``factor`` times the
  median dimension's;
* :func:`linear_inputs`, the input of every ``nn.Linear`` of a model on a batch, and
  :func:`block_outputs`, the residual stream after each block;
* :func:`pydocs_sample`, the course's model of real text and a batch of held-out text to
  measure them on.
"""

from __future__ import annotations

import torch
from torch import nn

from pedaPEFT import corpus, gpt


def _check_tensor(x: object, name: str, min_dim: int = 1) -> torch.Tensor:
    """``x`` as float64, or a TypeError / ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim or x.numel() < 2:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s) and 2 values, "
                         f"got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must hold finite values only")
    return x


def kurtosis(x: torch.Tensor) -> float:
    """``E[(x - μ)^4] / σ^4`` over all values of ``x`` (3 for a normal distribution).

    Introduced in lesson 6, section "6. Weight outliers and activation outliers".
    """
    x = _check_tensor(x, "x")
    centred = x - x.mean()
    variance = float(centred.square().mean())
    if variance == 0.0:
        raise ValueError("x must not be constant (its kurtosis would be 0 / 0)")
    return float(centred.pow(4).mean()) / variance**2


def feature_absmax(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` per feature: over every axis but the last, shape ``(x.shape[-1],)``.

    Introduced in lesson 6, section "6. Weight outliers and activation outliers".
    """
    x = _check_tensor(x, "x", min_dim=2)
    return x.abs().reshape(-1, x.shape[-1]).amax(dim=0)


def outlier_features(x: torch.Tensor, factor: float = 3.0) -> list[int]:
    """The feature dimensions whose ``max |x|`` is at least ``factor`` times the median
    feature's, largest first.

    Introduced in lesson 6, section "6. Weight outliers and activation outliers".
    """
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 1:
        raise ValueError(f"factor must be a number > 1, got {factor!r}")
    peaks = feature_absmax(x)
    outliers = torch.nonzero(peaks >= factor * peaks.median()).flatten()
    return sorted(outliers.tolist(), key=lambda i: -float(peaks[i]))


def _capture(model: nn.Module, idx: torch.Tensor, modules: dict[str, nn.Module],
             which: str) -> dict[str, torch.Tensor]:
    """Run ``model(idx)`` without gradients; record each module's input or output as rows."""
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            value = inputs[0] if which == "input" else output
            captured[name] = value.detach().reshape(-1, value.shape[-1]).clone()
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def linear_inputs(model: nn.Module, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every ``nn.Linear`` of ``model`` on the batch ``idx`` (the output head
    excluded), as ``(tokens, in_features)`` rows; name -> activations.

    Introduced in lesson 6, section "6. Weight outliers and activation outliers".
    """
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name != "lm_head"}
    if not layers:
        raise ValueError("model has no nn.Linear layer to record")
    return _capture(model, idx, layers, "input")


def block_outputs(model: nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after each block of ``model.blocks`` on the batch ``idx``, as
    ``(tokens, d_model)`` rows.

    Introduced in lesson 6, section "6. Weight outliers and activation outliers".
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError("model must have a non-empty nn.ModuleList `blocks` (a pedaPEFT GPT)")
    captured = _capture(model, idx, {str(i): block for i, block in enumerate(blocks)}, "output")
    return [captured[str(i)] for i in range(len(blocks))]


def pydocs_sample(batch_size: int = 8) -> tuple[gpt.GPT, torch.Tensor]:
    """The shipped ``pydocs`` base (lesson 11's GPT, pretrained on Python's documentation) in
    eval mode, and ``batch_size`` windows of its full context (256 tokens) of held-out
    (validation) documentation, shape ``(batch_size, 256)``.

    Introduced in lesson 6, section "6. Weight outliers and activation outliers".
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    model = gpt.load_pretrained("pydocs").eval()
    text, _ = corpus.batch(corpus.tokens("validation"), step=0, batch_size=batch_size,
                           block_size=model.config.block_size)
    return model, text
