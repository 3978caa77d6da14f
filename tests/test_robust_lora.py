"""LoRA and QLoRA under bad input: flags, layers LoRA cannot wrap, merged training, targets,
and adapter files that are corrupted, hostile or of another configuration."""

import pytest
import torch
from torch import nn

from pedaPEFT import data, lora, train
from pedaPEFT.gpt import GPT, GPTConfig


def micro_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=16))


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_rslora_must_be_a_bool(value):
    with pytest.raises(TypeError, match="rslora must be True or False"):
        lora.LoRAConfig(rslora=value)
    with pytest.raises(TypeError, match="rslora must be True or False"):
        lora.LoRALinear(nn.Linear(4, 4), 2, 2, rslora=value)


def test_multihead_attention_out_proj_is_refused_before_anything_changes():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    before = [name for name, _ in model.named_modules()]
    with pytest.raises(TypeError, match="MultiheadAttention"):
        lora.apply_lora(model, lora.LoRAConfig(target_modules=("out_proj", "1")))
    assert [name for name, _ in model.named_modules()] == before


def test_training_a_merged_model_is_refused():
    model = micro_model()
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=("q",)))
    for layer in lora.lora_layers(model).values():
        layer.merge()
    config = train.TrainConfig(steps=1, batch_size=8, progress=False, device="cpu")
    with pytest.raises(ValueError, match="merged"):
        train.train(model, lambda step: data.pretrain_batch(step, 8, 16), config)
