"""Training on real text: the ``pydocs`` base's recipe and fine-tuning scored by perplexity.

The loop, the optimizer and the fine-tuning methods are ``pedaPEFT.train``'s; what changes is
the data (windows of tokens drawn from ``pedaPEFT.corpus``) and the score: perplexity on
documents the model did not train on, instead of exact match on a synthetic task.

* ``pretrain_base("pydocs")`` is the recipe of the shipped text base (``python -m pedaPEFT
  pretrain --preset pydocs``): language-model pretraining on the corpus' ``train`` split,
  keeping the weights of the evaluation with the lowest validation perplexity; it records the
  losses of its first steps run on the CPU, so a test can rerun them.
* ``finetune_text`` fine-tunes such a base on a held-out domain with any method of
  ``train.METHODS`` and scores perplexity on the domain's unseen documents before and after.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from pedaPEFT import corpus
from pedaPEFT.gpt import GPT, GPTConfig
from pedaPEFT.train import METHODS, TrainConfig, TrainResult, prepare, train

TEXT_FINETUNE_CONFIG = TrainConfig(steps=100, batch_size=16, lr=3e-3, warmup_steps=10,
                                   weight_decay=0.0, progress=False)


@dataclass
class TextFinetuneResult:
    """Outcome of ``finetune_text``: counts and held-out-domain perplexity before and after."""

    domain: str
    method: str
    trainable: int
    total: int
    perplexity_before: float
    perplexity: float
    run: TrainResult

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total


def finetune_text(
    model: GPT,
    domain: str = "asyncio",
    method: str = "qlora",
    config: TrainConfig | None = None,
    method_options: dict | None = None,
    block_size: int | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
) -> TextFinetuneResult:
    """Fine-tune a base trained on ``pedaPEFT.corpus`` on the held-out ``domain``.

    Trains on windows of ``block_size`` tokens (default: the model's context) drawn from the
    ``domain-train`` documents and scores perplexity on the unseen ``domain-test`` documents,
    read in windows of the same length, before and after.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    config = TEXT_FINETUNE_CONFIG if config is None else config
    block_size = block_size or model.config.block_size
    if not 1 <= block_size <= model.config.block_size:
        raise ValueError(f"block_size must be in [1, {model.config.block_size}], "
                         f"got {block_size}")
    train_stream = corpus.tokens("domain-train", domain)
    test_stream = corpus.tokens("domain-test", domain)
    before = corpus.perplexity(model, test_stream, block_size)
    model, trainable, total = prepare(model, method, method_options)
    run = train(
        model,
        lambda step: corpus.batch(train_stream, step, config.batch_size, block_size, seed),
        config,
        evaluate=lambda m: {"perplexity": corpus.perplexity(m, test_stream, block_size)},
        checkpoint=checkpoint,
    )
    return TextFinetuneResult(domain, method, trainable, total, before,
                              run.evals[-1]["perplexity"], run)


PYDOCS_PRETRAIN_CONFIG = TrainConfig(steps=3000, batch_size=32, lr=2e-3, warmup_steps=100,
                                     weight_decay=0.1, eval_interval=250, progress=False)
"""The ``pydocs`` recipe: 3000 steps of 32 windows of 256 tokens (about 50 passes over the
456k training tokens); dropout 0.1 (in the preset) and keeping the best evaluation guard
against the overfitting that many passes invite."""

TEXT_PRESETS = ("pydocs",)
CPU_PREFIX_STEPS = 2


def pretrain_text(model: GPT, config: TrainConfig = PYDOCS_PRETRAIN_CONFIG, seed: int = 0,
                  checkpoint: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Language-model pretraining on the corpus' ``train`` split, evaluated by validation
    perplexity every ``eval_interval`` steps; the model ends with the weights of the best
    evaluation (of this process, when resumed)."""
    stream, validation = corpus.tokens("train"), corpus.tokens("validation")
    best: dict = {"perplexity": math.inf}

    def evaluate(m: nn.Module) -> dict[str, float]:
        value = corpus.perplexity(m, validation)
        if value < best["perplexity"]:
            best.update(perplexity=value, state={k: v.detach().clone()
                                                 for k, v in m.state_dict().items()})
        return {"validation_perplexity": value}

    result = train(
        model,
        lambda step: corpus.batch(stream, step, config.batch_size, model.config.block_size, seed),
        config,
        evaluate=evaluate,
        checkpoint=checkpoint,
        resume=resume,
    )
    if "state" in best:
        model.load_state_dict(best["state"])
    return result


def first_batch_sha256(preset: str, config: TrainConfig, seed: int = 0) -> str:
    """Fingerprint of the recipe's first batch of token ids (data pipeline check)."""
    x, y = corpus.batch(corpus.tokens("train"), 0, config.batch_size,
                        GPTConfig.preset(preset).block_size, seed)
    return hashlib.sha256(torch.cat([x, y]).numpy().tobytes()).hexdigest()


def pretrain_prefix(preset: str, config: TrainConfig, seed: int = 0,
                    steps: int = CPU_PREFIX_STEPS) -> list[float]:
    """Losses of the recipe's first ``steps`` steps, run on the CPU in float32.

    During warm-up the learning rate does not depend on the total number of steps, so a run
    of ``steps <= warmup_steps`` steps is exactly the beginning of the full recipe.
    """
    if not 1 <= steps <= max(1, config.warmup_steps):
        raise ValueError(f"steps must be in [1, warmup_steps={config.warmup_steps}], got {steps}")
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset(preset))
    prefix = replace(config, steps=steps, device="cpu", eval_interval=0, progress=False)
    stream = corpus.tokens("train")
    return train(model, lambda step: corpus.batch(stream, step, prefix.batch_size,
                                                  model.config.block_size, seed), prefix).losses


def _check_preset(preset: str) -> str:
    if preset not in TEXT_PRESETS:
        raise ValueError(f"preset must be one of the text presets {TEXT_PRESETS}, got {preset!r}")
    return preset


def pretrain_base(preset: str = "pydocs", config: TrainConfig = PYDOCS_PRETRAIN_CONFIG,
                  seed: int = 0, checkpoint: str | Path | None = None, resume: bool = False
                  ) -> tuple[GPT, dict]:
    """The recipe of a shipped text base: seed, build ``preset``, pretrain; (model, info).

    ``info`` is the record written next to the weights: the recipe, the validation perplexity
    of every evaluation and of the one kept, the training time and device, the losses of the
    recipe's first steps on the CPU and a fingerprint of its first batch.
    """
    _check_preset(preset)
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset(preset))
    result = pretrain_text(model, config, seed, checkpoint=checkpoint, resume=resume)
    best = min(result.evals, key=lambda e: e["validation_perplexity"])
    return model, {
        "preset": preset,
        "seed": seed,
        "train_config": {k: v for k, v in asdict(config).items()
                         if k not in ("progress", "device")},
        "final_loss": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 4),
        "metrics": {"validation_perplexity": round(best["validation_perplexity"], 4),
                    "kept_step": best["step"]},
        "evals": [{k: round(v, 4) for k, v in e.items()} for e in result.evals],
        "seconds": round(result.seconds, 1),
        "device": (torch.cuda.get_device_name() if next(model.parameters()).is_cuda
                   else "cpu"),
        "cpu_prefix_losses": pretrain_prefix(preset, config, seed),
        "first_batch_sha256": first_batch_sha256(preset, config, seed),
        "made_by": f"python -m pedaPEFT pretrain --preset {preset}",
        "torch_version": torch.__version__,
    }
