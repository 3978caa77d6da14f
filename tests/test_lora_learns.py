"""The what-LoRA-learns experiment (pedaPEFT.lora_learns, lesson 5 §9) on a few steps."""

import pytest
import torch

from pedaPEFT import experiments, gpt, lora_learns

TINY_SCALE = experiments.Scale(steps=3, batch_size=8, n_train=32, seeds=(0,), n_test=8)


@pytest.fixture(scope="module")
def updates():
    return {label: lora_learns.finetune_update(label, "shift", TINY_SCALE, seed=0)
            for label in lora_learns.SETTINGS}


def test_updates_have_the_rank_their_method_allows(updates):
    names = lora_learns.layer_names(4)
    for label, r in (("r8", 8), ("r64", 64)):
        assert set(updates[label]["A"]) == set(names)
        for name in names:
            delta = updates[label]["delta"][name]
            assert delta.shape == (64, 64)
            assert int(torch.linalg.matrix_rank(delta.double(), rtol=1e-4)) <= r  # float32 BA
            assert updates[label]["A"][name].shape == (r, 64)
    full = updates["full"]["delta"][names[0]]
    assert float(full.norm()) > 0 and updates["full"]["A"] == {}


def test_r8_and_r64_start_from_different_initialisations(updates):
    name = lora_learns.layer_names(4)[0]
    a8, a64 = updates["r8"]["A"][name], updates["r64"]["A"][name]
    assert not torch.allclose(a8, a64[:8], atol=1e-3)


def test_analysis_of_a_layer_is_consistent(updates):
    name = "blocks.1.attn.q"
    weight = gpt.load_pretrained("tiny").get_submodule(name).weight.detach()
    row = lora_learns.analyze_layer(weight, updates, name)
    assert row["layer"] == name and row["norm_W"] == pytest.approx(float(weight.norm()))
    for label in lora_learns.SETTINGS:
        entry = row[label]
        assert entry["amplification"] == pytest.approx(entry["norm"] / entry["projected"])
        assert 0 < entry["energy_top"] <= 1 + 1e-12
    assert row["r8"]["energy_top"] == pytest.approx(1.0)  # rank <= 8: all in the top 8
    assert len(row["phi_A"]) == lora_learns.PHI_MAX_I
    assert len(row["phi_A"][0]) == lora_learns.PHI_MAX_J
    assert row["projected_random"] < row["projected_W_top"] <= row["norm_W"]


def test_unknown_setting_and_scale_are_rejected():
    with pytest.raises(ValueError, match="label must be one of"):
        lora_learns.finetune_update("r4", "shift", TINY_SCALE, seed=0)
    with pytest.raises(ValueError, match="scale must be one of"):
        lora_learns.experiment("huge")
