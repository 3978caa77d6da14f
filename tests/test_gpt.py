"""The small GPT: shapes, names, parameter counts, causality, attention maths, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pedaPEFT import gpt
from pedaPEFT.gpt import GPT, GPTConfig


def small_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16),
                        **overrides})


@pytest.mark.parametrize("preset", sorted(gpt.PRESETS))
@pytest.mark.parametrize("tied", [True, False])
def test_analytic_count_equals_real_count(preset, tied):
    config = GPTConfig.preset(preset, tie_embeddings=tied)
    with torch.device("meta"):
        model = GPT(config)
    real = sum(p.numel() for p in model.parameters())  # a tied weight is yielded once
    assert gpt.parameter_count(config) == real


def test_gpt2_preset_has_gpt2_small_published_size():
    # GPT-2 small as released (tied head, vocabulary 50257): 124,439,808 parameters.
    assert gpt.parameter_count(GPTConfig.preset("gpt2")) == 124_439_808


def test_projection_names_and_shapes():
    config = small_config()
    model = GPT(config)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    for name in ("q", "k", "v", "o"):
        layer = getattr(attn, name)
        assert isinstance(layer, nn.Linear)
        assert tuple(layer.weight.shape) == (16, 16)
    assert tuple(mlp.fc.weight.shape) == (64, 16)
    assert tuple(mlp.proj.weight.shape) == (16, 64)
    logits = model(torch.randint(11, (3, 5)))
    assert tuple(logits.shape) == (3, 5, 11)


def test_head_is_tied_and_untie_copies():
    model = GPT(small_config())
    assert model.lm_head.weight is model.wte.weight
    gpt.untie_head(model)
    assert model.lm_head.weight is not model.wte.weight
    torch.testing.assert_close(model.lm_head.weight, model.wte.weight, rtol=0, atol=0)


def test_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    config = small_config()
    attn = GPT(config).blocks[0].attn
    x = torch.randn(2, 6, 16)
    B, T, d, h = 2, 6, 16, 2

    def heads(t):
        return t.view(B, T, h, d // h).transpose(1, 2)

    q, k, v = heads(attn.q(x)), heads(attn.k(x)), heads(attn.v(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = attn.o((weights @ v).transpose(1, 2).reshape(B, T, d))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(11, (1, 8))
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 11
    torch.testing.assert_close(model(idx)[:, :5], model(changed)[:, :5])
    assert not torch.allclose(model(idx)[:, 5:], model(changed)[:, 5:])


def test_block_is_pre_layernorm():
    torch.manual_seed(0)
    block = GPT(small_config()).blocks[0]
    x = torch.randn(2, 4, 16)
    a = x + block.attn(block.ln_1(x))
    torch.testing.assert_close(block(x), a + block.mlp(block.ln_2(a)))
    torch.testing.assert_close(
        block.mlp(x), block.mlp.proj(F.gelu(block.mlp.fc(x), approximate="tanh"))
    )


def test_generate_is_greedy():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    prompt = torch.randint(11, (2, 3))
    out = model.generate(prompt, 4)
    assert tuple(out.shape) == (2, 7)
    for t in range(3, 7):
        torch.testing.assert_close(out[:, t], model(out[:, :t])[:, -1].argmax(-1))


def test_flops_per_token_matches_the_6n_rule():
    config = GPTConfig.preset("gpt2")
    d, L, V, T = 768, 12, 50257, 1024
    assert gpt.flops_per_token(config) == 6 * (12 * L * d * d + V * d) + 12 * L * T * d


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: GPTConfig.preset("huge"), "preset must be one of"),
        (lambda: small_config(n_embd=10, n_head=4), "n_embd must be divisible by n_head"),
        (lambda: small_config(n_layer=0), "n_layer must be a positive integer"),
        (lambda: small_config(dropout=1.0), "dropout must be in"),
        (lambda: GPTConfig.from_dict({"width": 3}), "unknown GPTConfig fields"),
        (lambda: GPT(small_config())(torch.zeros(1, 9, dtype=torch.long)), "block_size=8"),
        (lambda: GPT(small_config())(torch.zeros(9, dtype=torch.long)), "idx must have shape"),
        (lambda: GPT(small_config()).generate(torch.zeros(1, 6, dtype=torch.long), 3),
         "exceeds block_size"),
        (lambda: gpt.load_pretrained("gpt3"), "preset must be one of the shipped bases"),
    ],
)
def test_bad_input_raises_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_config_type_checked():
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT({"n_layer": 2})


def test_shipped_base_loads_and_matches_its_record():
    model = gpt.load_pretrained("tiny")
    info = gpt.pretrained_info("tiny")
    assert model.config == GPTConfig.preset("tiny")
    assert info["made_by"] == "python -m pedaPEFT pretrain --preset tiny"
    assert not model.training
    assert model.lm_head.weight is model.wte.weight  # the tie survives the file


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(small_config())
    gpt.save_pretrained(model, {"note": "x"}, tmp_path, "mini")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini.json", "mini.safetensors"]
    from safetensors.torch import load_model

    other = GPT(small_config())
    load_model(other, str(tmp_path / "mini.safetensors"))
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
