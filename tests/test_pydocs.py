"""The shipped pydocs base: loads offline, beats the unigram baseline, its recipe reproduces;
the committed real-text fine-tuning results; the finetune command on a text domain."""

import pytest

from pedaPEFT import corpus, gpt, realtext, train, train_text
from pedaPEFT.__main__ import main


@pytest.fixture(scope="module")
def base():
    return gpt.load_pretrained("pydocs")


def test_pydocs_base_is_far_below_the_unigram_baseline(base):
    info = gpt.pretrained_info("pydocs")
    assert base.config == gpt.GPTConfig.preset("pydocs")
    validation = corpus.tokens("validation")
    model_ppl = corpus.perplexity(base, validation)
    unigram_ppl = corpus.unigram_perplexity(corpus.tokens("train"), validation)
    print(f"pydocs validation perplexity {model_ppl:.2f}, unigram baseline {unigram_ppl:.2f}")
    assert model_ppl < unigram_ppl / 10
    # The stored bfloat16 weights score what the recipe measured on its float32 weights.
    assert model_ppl == pytest.approx(info["metrics"]["validation_perplexity"], rel=0.05)


def test_pydocs_recipe_prefix_reproduces_on_cpu():
    info = gpt.pretrained_info("pydocs")
    config = train.TrainConfig(**info["train_config"])
    assert config == train.TrainConfig(**{**vars(train_text.PYDOCS_PRETRAIN_CONFIG),
                                          "progress": True, "device": "auto"})
    fingerprint = train_text.first_batch_sha256("pydocs", config, info["seed"])
    assert fingerprint == info["first_batch_sha256"]
    losses = train_text.pretrain_prefix("pydocs", config, info["seed"])
    assert losses == pytest.approx(info["cpu_prefix_losses"], rel=1e-4)


def test_committed_realtext_results_every_method_lowers_perplexity():
    results = realtext.load_results()
    assert results["base_sha256"] == realtext.base_sha256("pydocs")
    assert {r["label"] for r in results["summary"]} == set(realtext.SETTINGS)
    for run in results["runs"]:
        assert run["perplexity_after"] < run["perplexity_before"], run["label"]
    for row in results["summary"]:
        assert row["n"] == 3


def test_finetune_command_on_a_text_domain_prints_perplexity(capsys):
    assert main(["finetune", "--task", "asyncio", "--method", "qlora", "--steps", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "domain asyncio on base pydocs, method qlora" in out
    assert "held-out perplexity before" in out
