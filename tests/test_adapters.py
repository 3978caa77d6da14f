"""Bottleneck adapters: counts, identity at init, insertion, freezing, bad input, properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pedaPEFT import adapters, targets


class Block(nn.Module):
    """A toy transformer-like block whose projections are named like pedaPEFT.gpt's."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o(torch.tanh(self.q(x)))
        return x + self.proj(torch.relu(self.fc(x)))


def toy_model(d: int = 16, layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(d) for _ in range(layers)])


def test_lecture_counts():
    assert adapters.bottleneck_param_count(1024, 24, bias=False) == 49_152
    assert adapters.bottleneck_param_count(1024, 24) == 49_152 + 24 + 1024
    assert 1024 * 1024 == 1_048_576
    adapter = adapters.BottleneckAdapter(1024, 24)
    assert sum(p.numel() for p in adapter.parameters()) == adapters.bottleneck_param_count(1024, 24)
    weights = adapter.down.weight.numel() + adapter.up.weight.numel()
    assert weights == adapters.bottleneck_param_count(1024, 24, bias=False)


def test_identity_at_init_and_learns():
    torch.manual_seed(0)
    adapter = adapters.BottleneckAdapter(32, 4)
    h = torch.randn(5, 32)
    torch.testing.assert_close(adapter(h), h, atol=0, rtol=0)
    adapter(h).sum().backward()
    assert adapter.up.weight.grad.abs().sum() > 0
    assert adapter.up.bias.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("d_model", "bottleneck", "error"),
    [
        (16, 0, ValueError),
        (16, -1, ValueError),
        (16, 16, ValueError),
        (16, 20, ValueError),
        (0, 4, ValueError),
        (16, 2.0, TypeError),
        (16, True, TypeError),
    ],
)
def test_bad_sizes(d_model, bottleneck, error):
    with pytest.raises(error, match="bottleneck|d_model"):
        adapters.BottleneckAdapter(d_model, bottleneck)
    with pytest.raises(error, match="bottleneck|d_model"):
        adapters.bottleneck_param_count(d_model, bottleneck)


def test_bad_activation_and_input():
    with pytest.raises(ValueError, match="activation must be one of"):
        adapters.BottleneckAdapter(16, 4, activation="softmax")
    with pytest.raises(ValueError, match="last dimension"):
        adapters.BottleneckAdapter(16, 4)(torch.randn(2, 8))


def test_add_adapters_after_o_and_proj_and_freeze():
    model = toy_model(d=16, layers=2)
    x = torch.randn(3, 16)
    before = model(x)
    wrapped = adapters.add_adapters(model, bottleneck=4)
    assert wrapped == ["0.o", "0.proj", "1.o", "1.proj"]
    assert isinstance(model[0].o, adapters.WithAdapter)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * adapters.bottleneck_param_count(16, 4)
    assert all(".adapter." in n for n, p in model.named_parameters() if p.requires_grad)


def test_add_adapters_errors():
    model = toy_model()
    with pytest.raises(ValueError, match="matched no module.*proj"):
        adapters.add_adapters(model, 4, targets=("c_proj",))
    with pytest.raises(ValueError, match="bottleneck must satisfy"):
        adapters.add_adapters(model, 16)
    with pytest.raises(TypeError, match="targets"):
        adapters.add_adapters(model, 4, targets=5)
    adapters.add_adapters(model, 4, targets=("o",))
    with pytest.raises(ValueError, match="already has an adapter"):
        adapters.add_adapters(model, 4, targets=("o",))


def test_name_matches_is_exact_or_dotted_suffix():
    assert targets.name_matches("h.0.attn.q", ["q"])
    assert targets.name_matches("q", ["q"])
    assert targets.name_matches("h.0.attn.q", ["attn.q"])
    assert not targets.name_matches("h.0.attn.kq", ["q"])


@settings(max_examples=20, deadline=None)
@given(
    d=st.integers(4, 24),
    m_fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 99),
    activation=st.sampled_from(sorted(adapters.ACTIVATIONS)),
)
def test_property_identity_and_only_adapters_get_gradients(d, m_fraction, seed, activation):
    m = max(1, min(d - 1, int(d * m_fraction)))
    model = toy_model(d=d, layers=1, seed=seed)
    x = torch.randn(2, d)
    before = model(x)
    wrapped = adapters.add_adapters(model, m, activation=activation)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    with torch.no_grad():
        for name in wrapped:
            model.get_submodule(name).adapter.up.weight.normal_()
    model(x).square().sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (".adapter." in name), name
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(
        wrapped
    ) * adapters.bottleneck_param_count(d, m)


def test_prepare_adapters_wraps_o_and_proj():
    model = toy_model(d=16, layers=3)
    assert adapters.prepare_adapters(model, bottleneck=2) is model
    wrapped = [n for n, m in model.named_modules() if isinstance(m, adapters.WithAdapter)]
    assert wrapped == [f"{i}.{t}" for i in range(3) for t in ("o", "proj")]
