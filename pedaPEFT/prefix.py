"""Prefix tuning (Li & Liang, 2021): trainable key/value prefixes in every attention layer.

The network stays frozen. Each attention layer gets ``P`` extra key vectors ``K_p`` and
value vectors ``V_p`` (each ``P × d``) that every position may attend to, as if ``P``
virtual tokens stood before the input in that layer:

    attention(x) = o( softmax( Q [K_p; K]ᵀ / √(d/h) + M ) [V_p; V] ),
    Q = q(x), K = k(x), V = v(x),   M: 0 on the prefix, causal on the input,

split into ``h`` heads as usual. Only ``K_p`` and ``V_p`` train, so for ``L`` layers

    |Θ_prefix| = 2 · L · P · d                     (:func:`prefix_param_count`).

The LoRA paper's *PreLayer* baseline counts one ``d``-vector per layer and virtual token
(the hidden activation, from which the frozen ``k`` and ``v`` make the key and value):
``L · d · (l_p + l_i)``; its *PreEmbed* learns the virtual tokens at the input embedding only,
``d · (l_p + l_i)`` (prompt tuning), :func:`prefix_layer_count`, :func:`prefix_embedding_count`.

A prefix changes the output from the first step (the input's attention weights now share
their softmax with ``P`` more keys), unlike LoRA or the adapters, which start as the identity.
Here keys and values start from small random numbers; Li & Liang reparameterise them through
an MLP for stable training of large models, which this small version leaves out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pedaPEFT.gpt import GPT, CausalSelfAttention

INIT_STD = 0.02
"""Standard deviation of the initial prefix keys and values (the GPT's own init scale)."""


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    return value


def prefix_param_count(n_layer: int, d_model: int, n_prefix: int) -> int:
    """Key and value prefixes of ``n_prefix`` virtual tokens in ``n_layer`` layers: ``2 L P d``.

    >>> prefix_param_count(4, 64, 8)
    4096

    Introduced in lesson 4, section "6. Other PEFT families: BitFit and prefix tuning".
    """
    n_layer = _check_int(n_layer, "n_layer", 1)
    d_model = _check_int(d_model, "d_model", 1)
    return 2 * n_layer * _check_int(n_prefix, "n_prefix", 1) * d_model


def prefix_layer_count(n_layer: int, d_model: int, n_virtual: int) -> int:
    """The LoRA paper's PreLayer count: one ``d``-vector per layer and virtual token, ``L d n``
    with ``n = l_p + l_i``.

    Introduced in lesson 4, section "6. Other PEFT families: BitFit and prefix tuning".
    """
    n_layer = _check_int(n_layer, "n_layer", 1)
    return n_layer * prefix_embedding_count(d_model, n_virtual)


def prefix_embedding_count(d_model: int, n_virtual: int) -> int:
    """The LoRA paper's PreEmbed count (prompt tuning): ``d · n`` with ``n = l_p + l_i``.

    Introduced in lesson 4, section "6. Other PEFT families: BitFit and prefix tuning".
    """
    return _check_int(d_model, "d_model", 1) * _check_int(n_virtual, "n_virtual", 1)


class PrefixAttention(nn.Module):
    """A frozen :class:`~pedaPEFT.gpt.CausalSelfAttention` with trainable key/value prefixes.

    ``prefix_keys`` and ``prefix_values`` have shape ``(n_prefix, d)``; every position attends
    to all of them and, causally, to the input.

    Introduced in lesson 4, section "6. Other PEFT families: BitFit and prefix tuning".
    """

    def __init__(self, attention: CausalSelfAttention, n_prefix: int) -> None:
        super().__init__()
        if not isinstance(attention, CausalSelfAttention):
            raise TypeError(
                f"attention must be a CausalSelfAttention, got {type(attention).__name__}"
            )
        self.n_prefix = _check_int(n_prefix, "n_prefix", 1)
        self.attention = attention
        d = attention.q.out_features
        weight = attention.q.weight
        self.prefix_keys = nn.Parameter(
            INIT_STD * torch.randn(n_prefix, d, device=weight.device, dtype=weight.dtype))
        self.prefix_values = nn.Parameter(
            INIT_STD * torch.randn(n_prefix, d, device=weight.device, dtype=weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.attention
        B, T, d = x.shape
        h, P = base.n_head, self.n_prefix

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, -1, h, d // h).transpose(1, 2)  # (B, h, length, d/h)

        keys = torch.cat([self.prefix_keys.expand(B, P, d), base.k(x)], dim=1)
        values = torch.cat([self.prefix_values.expand(B, P, d), base.v(x)], dim=1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        allowed = torch.cat([torch.ones(T, P, dtype=torch.bool, device=x.device), causal], dim=1)
        y = F.scaled_dot_product_attention(
            heads(base.q(x)), heads(keys.to(x.dtype)), heads(values.to(x.dtype)),
            attn_mask=allowed, dropout_p=base.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, d)
        return base.resid_dropout(base.o(y))

    def extra_repr(self) -> str:
        return f"n_prefix={self.n_prefix}"


def add_prefixes(model: GPT, n_prefix: int, freeze: bool = True) -> int:
    """Replace every block's attention by a :class:`PrefixAttention` with ``n_prefix`` virtual
    tokens, in place; with ``freeze`` only the prefixes train. Returns the number of prefix
    parameters, ``2 · L · n_prefix · d``.

    Introduced in lesson 4, section "6. Other PEFT families: BitFit and prefix tuning".
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a pedaPEFT.gpt.GPT, got {type(model).__name__}")
    n_prefix = _check_int(n_prefix, "n_prefix", 1)
    if any(isinstance(block.attn, PrefixAttention) for block in model.blocks):
        raise ValueError("model: its attention layers already have prefixes")
    if freeze:
        model.requires_grad_(False)
    for block in model.blocks:
        block.attn = PrefixAttention(block.attn, n_prefix)
    added = sum(block.attn.prefix_keys.numel() + block.attn.prefix_values.numel()
                for block in model.blocks)
    return added


def prepare_prefix(model: GPT, n_prefix: int = 8) -> GPT:
    """Fine-tuning method ``"prefix"`` for :func:`pedaPEFT.train.finetune`: key/value
    prefixes of ``n_prefix`` virtual tokens in every attention layer, all else frozen."""
    add_prefixes(model, n_prefix)
    return model

