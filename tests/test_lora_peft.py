"""Equivalence with Hugging Face PEFT 0.21 (the ``reference`` extra).

Same base weights and the same A and B give the same outputs (fp32, ≤ 1e-6), the same merged
weights, the same trainable count and the same printed line; adapter files cross-load.
"""

import contextlib
import copy
import io

import pytest
import torch
from torch import nn

from pedaPEFT import lora, serialization

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.reference


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 24)
        self.hidden = nn.Linear(24, 24)
        self.out = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(torch.relu(self.fc(x)))))


def peft_lora(model: nn.Module, config: lora.LoRAConfig):
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        use_rslora=config.rslora,
    )
    return peft.get_peft_model(model, peft_config)


def copy_adapters_into_peft(ours: nn.Module, theirs) -> int:
    """Copy our A and B (made non-trivial) into PEFT's modules of the same name."""
    copied = 0
    generator = torch.Generator().manual_seed(3)
    for name, layer in lora.lora_layers(ours).items():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
        module = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
        copied += 1
    return copied


def printed(fn) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn()
    return buffer.getvalue()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


CONFIGS = [
    lora.LoRAConfig(r=4, alpha=8, target_modules=("fc", "out")),
    lora.LoRAConfig(r=2, alpha=16, target_modules=("hidden",), rslora=True),
    lora.LoRAConfig(r=8, alpha=8, dropout=0.1, target_modules=("fc", "hidden", "out")),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_mlp_matches_peft(config):
    torch.manual_seed(0)
    base = TinyMLP()
    ours = copy.deepcopy(base)
    assert lora.apply_lora(ours, config) == [
        n for n in ("fc", "hidden", "out") if n in config.target_modules
    ]
    theirs = peft_lora(copy.deepcopy(base), config)
    assert copy_adapters_into_peft(ours, theirs) == len(config.target_modules)
    ours.eval()
    theirs.eval()
    x = torch.randn(16, 12)
    assert max_diff(ours(x), theirs(x)) <= 1e-6
    assert lora.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert printed(lambda: lora.print_trainable_parameters(ours)) == printed(
        theirs.print_trainable_parameters
    )
    for name, layer in lora.lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert layer.scaling == peft_layer.scaling["default"]
        assert max_diff(layer.delta_weight(), peft_layer.get_delta_weight("default")) <= 1e-6

    merged_ours = lora.merge_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    for (n1, p1), (n2, p2) in zip(
        merged_ours.named_parameters(), merged_theirs.named_parameters(), strict=True
    ):
        assert n1 == n2
        assert max_diff(p1, p2) <= 1e-6
    assert max_diff(merged_ours(x), merged_theirs(x)) <= 1e-6


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o", "fc", "proj")])
def test_gpt_matches_peft(targets):
    gpt = pytest.importorskip("pedaPEFT.gpt")
    torch.manual_seed(0)
    base = gpt.GPT(gpt.GPTConfig.preset("tiny"))
    config = lora.LoRAConfig(r=4, alpha=16, target_modules=targets)
    ours = copy.deepcopy(base)
    wrapped = lora.apply_lora(ours, config)
    assert len(wrapped) == base.config.n_layer * len(targets)
    theirs = peft_lora(copy.deepcopy(base), config)
    copy_adapters_into_peft(ours, theirs)
    ours.eval()
    theirs.eval()
    idx = torch.randint(0, base.config.vocab_size, (3, base.config.block_size))
    assert max_diff(ours(idx), theirs(idx)) <= 1e-6
    assert lora.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert printed(lambda: lora.print_trainable_parameters(ours)) == printed(
        theirs.print_trainable_parameters
    )
    merged_ours = lora.merge_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    assert max_diff(merged_ours(idx), merged_theirs(idx)) <= 1e-6
    for (n1, p1), (n2, p2) in zip(
        merged_ours.named_parameters(), merged_theirs.named_parameters(), strict=True
    ):
        assert n1 == n2
        assert max_diff(p1, p2) <= 1e-6


def test_dropout_in_training_matches_peft():
    torch.manual_seed(0)
    config = lora.LoRAConfig(r=4, alpha=4, dropout=0.3, target_modules=("hidden",))
    base = TinyMLP()
    ours = copy.deepcopy(base)
    lora.apply_lora(ours, config)
    theirs = peft_lora(copy.deepcopy(base), config)
    copy_adapters_into_peft(ours, theirs)
    ours.train()
    theirs.train()
    x = torch.randn(16, 12)
    torch.manual_seed(11)
    y_ours = ours(x)
    torch.manual_seed(11)
    y_theirs = theirs(x)
    assert max_diff(y_ours, y_theirs) <= 1e-6


def test_unmerge_matches_peft():
    torch.manual_seed(0)
    config = lora.LoRAConfig(r=3, alpha=6, target_modules=("fc",))
    base = TinyMLP()
    ours = copy.deepcopy(base)
    lora.apply_lora(ours, config)
    theirs = peft_lora(copy.deepcopy(base), config)
    copy_adapters_into_peft(ours, theirs)
    ours.fc.merge()
    theirs.base_model.model.fc.merge()
    assert max_diff(ours.fc.base_layer.weight, theirs.base_model.model.fc.base_layer.weight) == 0
    ours.fc.unmerge()
    theirs.base_model.model.fc.unmerge()
    assert max_diff(ours.fc.base_layer.weight, theirs.base_model.model.fc.base_layer.weight) == 0


def test_peft_loads_our_adapter(tmp_path):
    torch.manual_seed(0)
    base = TinyMLP()
    ours = copy.deepcopy(base)
    lora.apply_lora(ours, lora.LoRAConfig(r=4, alpha=8, target_modules=("fc", "out")))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora.lora_layers(ours).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
    serialization.save_lora_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = torch.randn(8, 12)
    assert max_diff(ours.eval()(x), theirs.eval()(x)) <= 1e-6


def test_peft_loads_our_gpt_adapter(tmp_path):
    gpt = pytest.importorskip("pedaPEFT.gpt")
    torch.manual_seed(0)
    base = gpt.GPT(gpt.GPTConfig.preset("tiny"))
    ours = copy.deepcopy(base)
    lora.apply_lora(ours, lora.LoRAConfig(r=4, alpha=8, target_modules=("q", "k", "v", "o")))
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for layer in lora.lora_layers(ours).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))
    serialization.save_lora_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    idx = torch.randint(0, base.config.vocab_size, (2, base.config.block_size))
    assert max_diff(ours.eval()(idx), theirs.eval()(idx)) <= 1e-6
    assert lora.count_parameters(ours)[1] == theirs.get_nb_trainable_parameters()[1]


def test_we_load_peft_adapter(tmp_path):
    torch.manual_seed(0)
    base = TinyMLP()
    config = lora.LoRAConfig(r=2, alpha=6, target_modules=("hidden", "out"))
    theirs = peft_lora(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name in ("hidden", "out"):
            weight = theirs.base_model.model.get_submodule(name).lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
    theirs.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    assert serialization.load_lora_adapter(ours, tmp_path) == ["hidden", "out"]
    x = torch.randn(8, 12)
    assert max_diff(ours.eval()(x), theirs.eval()(x)) <= 1e-6
    assert lora.count_parameters(ours) == theirs.get_nb_trainable_parameters()


def mt0_large_config():
    transformers = pytest.importorskip("transformers")
    # bigscience/mt0-large = mT5-large: published config.json values
    return transformers.MT5Config(
        vocab_size=250112,
        d_model=1024,
        d_kv=64,
        d_ff=2816,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=16,
        feed_forward_proj="gated-gelu",
    )


def test_mt0_large_printout_is_reproduced():
    transformers = pytest.importorskip("transformers")
    config = mt0_large_config()
    with torch.device("meta"):
        model = transformers.MT5ForConditionalGeneration(config)
        # mt0-large's lm_head is its own matrix; transformers 5 builds MT5 with it tied to the
        # shared embedding (encoder and decoder embeddings stay shared, as in the checkpoint)
        model.lm_head.weight = nn.Parameter(torch.empty(250112, 1024))
    base_total = sum(p.numel() for p in model.parameters())
    ours = copy.deepcopy(model)
    lora.apply_lora(ours, lora.LoRAConfig(r=8, alpha=32, dropout=0.1, target_modules=("q", "v")))
    assert lora.count_parameters(ours) == (2_359_296, 1_231_940_608)
    assert base_total == 1_231_940_608 - 2_359_296
    assert lora.trainable_parameters_line(ours) == (
        "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915"
    )
    theirs = peft.get_peft_model(
        model,
        peft.LoraConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=32, lora_dropout=0.1),
    )
    assert theirs.get_nb_trainable_parameters() == (2_359_296, 1_231_940_608)
    assert printed(theirs.print_trainable_parameters) == printed(
        lambda: lora.print_trainable_parameters(ours)
    )
