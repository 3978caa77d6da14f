"""Lesson 4's exercises: the bottleneck adapter module, inserting adapters into the GPT, a count.

The adapter is checked on what makes it an adapter: the identity at initialisation (zero
up-projection, residual connection), a live gradient path (a random down-projection), its
parameter count, and, with the reference's random weights copied in, the same outputs as
:class:`pedaPEFT.adapters.BottleneckAdapter`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pedaPEFT import adapters, gpt
from pedaPEFT.exercise_bank.base import Exercise, Mistake, as_int, as_tensor, call

D_MODEL, SIZE = 16, 4


def _forward(module: nn.Module, h: torch.Tensor, what: str) -> torch.Tensor:
    out = as_tensor(call(module, h, name=what), f"the output of {what}")
    if tuple(out.shape) != tuple(h.shape):
        raise Mistake(f"{what} must keep the input's shape {tuple(h.shape)}, got "
                      f"{tuple(out.shape)}.")
    return out


def _run_adapter(adapter_class: Any) -> None:
    adapter = call(adapter_class, D_MODEL, SIZE, name=f"BottleneckAdapter({D_MODEL}, {SIZE})")
    if not isinstance(adapter, nn.Module):
        raise Mistake("BottleneckAdapter must be an nn.Module subclass (call super().__init__()).")
    down, up = getattr(adapter, "down", None), getattr(adapter, "up", None)
    if not (isinstance(down, nn.Linear) and isinstance(up, nn.Linear)):
        raise Mistake("name the projections `down` (d_model -> bottleneck) and `up` "
                      "(bottleneck -> d_model), both nn.Linear.")
    if (down.in_features, down.out_features, up.in_features, up.out_features) != (
            D_MODEL, SIZE, SIZE, D_MODEL):
        raise Mistake("down must map d_model -> bottleneck and up bottleneck -> d_model "
                      f"(for d_model={D_MODEL}, bottleneck={SIZE}).")
    count = sum(p.numel() for p in adapter.parameters())
    if count != adapters.bottleneck_param_count(D_MODEL, SIZE):
        raise Mistake("the adapter's parameter count is off: two weight matrices and the two "
                      "biases (m and d), nothing else.")
    h = torch.randn(3, 5, D_MODEL)
    with torch.no_grad():
        out = _forward(adapter, h, "the adapter")
    if not torch.allclose(out, h, atol=1e-6):
        if torch.allclose(out, torch.zeros_like(out), atol=1e-6):
            raise Mistake("the output is zero at initialisation, not h: add the input h to the "
                          "branch (the residual connection).")
        raise Mistake("not the identity at initialisation: initialise the up-projection "
                      "(weight and bias) to zero, so the branch adds nothing.")
    if not down.weight.detach().abs().sum() > 0:
        raise Mistake("the down-projection is zero too: then up's gradient is zero and the "
                      "adapter never learns; keep a random init for down.")
    reference = adapters.BottleneckAdapter(D_MODEL, SIZE)
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_()
        for mine, theirs in ((down, reference.down), (up, reference.up)):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        out = _forward(adapter, h, "the adapter")
        expected = reference(h)
        if torch.allclose(out, expected, atol=1e-5):
            return
        linear = h + reference.up(reference.down(h))
        relu = h + reference.up(torch.relu(reference.down(h)))
    if torch.allclose(out, linear, atol=1e-5):
        raise Mistake("no nonlinearity between the projections: apply GELU to down's output.")
    if torch.allclose(out, relu, atol=1e-5):
        raise Mistake("that is ReLU: the lesson's adapter uses GELU.")
    raise Mistake("with random weights the output differs from h + up(gelu(down(h))).")


def _tiny_gpt() -> gpt.GPT:
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig.preset("tiny")).eval()


def _run_insert(insert_adapters: Any) -> None:
    model = _tiny_gpt()
    tokens = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        before = model(tokens)
    original = {name for name, _ in model.named_parameters()}
    call(insert_adapters, model, SIZE, name=f"insert_adapters(model, {SIZE})")
    layers = dict(model.named_modules())
    missing = [name for name, module in _tiny_gpt().named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("o", "proj")
               and isinstance(layers.get(name), nn.Linear)]
    if missing:
        raise Mistake(f"{len(missing)} of the o and proj layers have no adapter: put one after "
                      "every o and every proj (two per block).")
    extra = [name for name, module in _tiny_gpt().named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in ("o", "proj")
             and not isinstance(layers.get(name), nn.Linear)]
    if extra:
        raise Mistake("layers other than o and proj were wrapped: adapters go after the "
                      "attention output (o) and the MLP output (proj) only.")
    sizes = {module.d_model for module in model.modules()
             if isinstance(module, adapters.BottleneckAdapter)}
    if sizes and sizes != {model.config.n_embd}:
        raise Mistake("an adapter has the wrong d_model: size it by the wrapped layer's "
                      "out_features (its output is what the adapter reads).")
    with torch.no_grad():
        after = as_tensor(call(model, tokens, name="the model after insert_adapters"),
                          "the model's output")
    if tuple(after.shape) != tuple(before.shape) or not torch.allclose(after, before, atol=1e-5):
        raise Mistake("the model's output changed: freshly inserted adapters must be the "
                      "identity (adapters.BottleneckAdapter is).")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if any(name in original for name, _ in trainable):
        raise Mistake("the base model still trains: freeze every parameter except the "
                      "adapters' (requires_grad = False).")
    expected = 2 * model.config.n_layer * adapters.bottleneck_param_count(model.config.n_embd,
                                                                          SIZE)
    if sum(p.numel() for _, p in trainable) != expected:
        raise Mistake("not every adapter parameter trains: the adapters' requires_grad must "
                      "stay True.")


def _bert_adapter() -> int:
    return adapters.bottleneck_param_count(768, 64)


def _run_bert(answer: Any) -> None:
    value = as_int(answer, "bert_base_adapter")
    expected = _bert_adapter()
    if value == expected:
        return
    if value == adapters.bottleneck_param_count(768, 64, bias=False):
        raise Mistake("add the biases: one per output of each projection (m and d).")
    if value in (expected - 64, expected - 768):
        raise Mistake("both projections have a bias: m for down and d for up.")
    raise Mistake("the count is " + ("too large" if value > expected else "too small") + ": two "
                  "d x m weight matrices plus the biases.")


EXERCISES = [
    Exercise("04-bottleneck-adapter", 4, "BottleneckAdapter(d_model, bottleneck): "
             "h + up(gelu(down(h))), the identity at initialisation", "code", _run_adapter),
    Exercise("04-insert-adapters", 4, "insert_adapters(model, bottleneck): adapters after every "
             "o and proj, everything else frozen", "code", _run_insert),
    Exercise("04-bert-adapter", 4, "bert_base_adapter: parameters of one adapter with d = 768, "
             "m = 64", "number", _run_bert,
             lambda: [str(_bert_adapter()), f"{_bert_adapter():,}"]),
]

