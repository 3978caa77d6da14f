"""BitFit and prefix tuning: what trains, the counts, the attention with a prefix, bad input."""

import math

import pytest
import torch
from torch import nn

from pedaPEFT import bitfit, data, gpt, prefix, train


def micro_model(seed: int = 0, **overrides) -> gpt.GPT:
    torch.manual_seed(seed)
    shape = dict(vocab_size=48, block_size=16, n_layer=3, n_head=4, n_embd=32)
    return gpt.GPT(gpt.GPTConfig(**{**shape, **overrides}))


def train_briefly(model: gpt.GPT, steps: int = 2) -> None:
    examples = data.task_data("shift", "train", 16)
    config = train.TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=0,
                               weight_decay=0.0, progress=False, device="cpu")
    train.train(model, lambda step: examples.batch(step, 8), config)


# ----------------------------------------------------------------------------------- BitFit


@pytest.mark.parametrize("layernorm_gain", [False, True])
def test_bitfit_trains_exactly_the_bias_vectors(layernorm_gain):
    model = micro_model()
    names = bitfit.apply_bitfit(model, layernorm_gain=layernorm_gain)
    expected = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.LayerNorm) and module.bias is not None:
            expected.add(f"{module_name}.bias")
        if layernorm_gain and isinstance(module, nn.LayerNorm):
            expected.add(f"{module_name}.weight")
    assert set(names) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == bitfit.bitfit_param_count(3, 32, layernorm_gain=layernorm_gain)


def test_bitfit_count_of_gpt3_by_vector():
    # Per block: q, k, v, o, proj and the two LayerNorm shifts are d long, fc's bias is 4d.
    d, L = 12_288, 96
    per_block = [d] * 4 + [4 * d, d] + [d, d]
    assert bitfit.bitfit_param_count(L, d) == L * sum(per_block) + d
    with_gains = L * (sum(per_block) + 2 * d) + 2 * d
    assert bitfit.bitfit_param_count(L, d, layernorm_gain=True) == with_gains


def test_bitfit_method_trains_only_biases():
    model = micro_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, trainable, _ = train.prepare(model, "bitfit")
    assert trainable == bitfit.bitfit_param_count(3, 32)
    train_briefly(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".bias") for n in changed)


def test_bitfit_bad_input():
    with pytest.raises(ValueError, match="no bias parameters"):
        bitfit.apply_bitfit(nn.Linear(3, 3, bias=False))
    with pytest.raises(TypeError, match="layernorm_gain must be a bool"):
        bitfit.apply_bitfit(micro_model(), layernorm_gain="yes")
    with pytest.raises(ValueError, match="n_layer must be an integer >= 1"):
        bitfit.bitfit_param_count(0, 64)
    with pytest.raises(TypeError, match="d_model must be an int"):
        bitfit.bitfit_param_count(4, 64.0)


# ------------------------------------------------------------------------------ prefixes


def attention_by_hand(attn: prefix.PrefixAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention over [prefix; input] written out with explicit loops over heads."""
    base = attn.attention
    B, T, d = x.shape
    h = base.n_head
    dh = d // h
    keys = torch.cat([attn.prefix_keys.expand(B, -1, -1), base.k(x)], dim=1)
    values = torch.cat([attn.prefix_values.expand(B, -1, -1), base.v(x)], dim=1)
    queries = base.q(x)
    P = attn.n_prefix
    out = torch.empty(B, T, d)
    for head in range(h):
        cols = slice(head * dh, (head + 1) * dh)
        scores = queries[..., cols] @ keys[..., cols].transpose(1, 2) / math.sqrt(dh)
        for t in range(T):
            scores[:, t, P + t + 1:] = -math.inf  # the input is causal; the prefix is not
        out[..., cols] = torch.softmax(scores, dim=-1) @ values[..., cols]
    return base.o(out)


def test_prefix_attention_matches_the_formula():
    model = micro_model()
    prefix.add_prefixes(model, n_prefix=5)
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.prefix_values.normal_()
        attn.prefix_keys.normal_()
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attn(x), attention_by_hand(attn, x), atol=1e-5, rtol=1e-5)


def test_prefix_keeps_the_model_causal_and_uses_the_prefix():
    model = micro_model().eval()
    prefix.add_prefixes(model, n_prefix=4)
    idx = torch.randint(0, 48, (1, 10))
    later = idx.clone()
    later[0, 6:] = (later[0, 6:] + 1) % 48
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0, :6], model(later)[0, :6])
        before = model(idx)
        model.blocks[0].attn.prefix_values.add_(1.0)
        assert not torch.allclose(model(idx), before)


def test_prefix_counts_and_what_trains():
    model = micro_model()
    added = prefix.add_prefixes(model, n_prefix=6)
    assert added == prefix.prefix_param_count(3, 32, 6) == 2 * 3 * 6 * 32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.prefix_{kind}" for i in range(3)
                         for kind in ("keys", "values")}
    assert prefix.prefix_layer_count(96, 12_288, 16) == 96 * 12_288 * 16
    assert prefix.prefix_embedding_count(12_288, 264) == 12_288 * 264


def test_prefix_method_trains_only_the_prefixes():
    model = micro_model()
    model, trainable, total = train.prepare(model, "prefix", {"n_prefix": 3})
    assert trainable == prefix.prefix_param_count(3, 32, 3)
    assert total == sum(p.numel() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_briefly(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"blocks.{i}.attn.prefix_{kind}" for i in range(3)
                       for kind in ("keys", "values")}


def test_prefix_bad_input():
    with pytest.raises(ValueError, match="n_prefix must be an integer >= 1"):
        prefix.add_prefixes(micro_model(), 0)
    with pytest.raises(TypeError, match="model must be a pedaPEFT.gpt.GPT"):
        prefix.add_prefixes(nn.Linear(2, 2), 4)
    model = micro_model()
    prefix.add_prefixes(model, 2)
    with pytest.raises(ValueError, match="already have prefixes"):
        prefix.add_prefixes(model, 2)
    with pytest.raises(TypeError, match="attention must be a CausalSelfAttention"):
        prefix.PrefixAttention(nn.Linear(2, 2), 2)
    with pytest.raises(TypeError, match="n_virtual must be an int"):
        prefix.prefix_embedding_count(64, 2.5)
