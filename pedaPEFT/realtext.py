"""The real-text experiment of lesson 11: full fine-tuning, LoRA and QLoRA measured by perplexity.

The shipped ``pydocs`` base (a GPT pretrained on Python's documentation, ``pedaPEFT.corpus``)
never saw the ``asyncio`` modules. Each method fine-tunes it on the ``domain-train`` asyncio
documents and is scored by perplexity on the unseen ``domain-test`` ones:

* ``full FT``: every weight trains (a smaller learning rate, as usual for full fine-tuning);
* ``LoRA q,v``: rank-8 adapters on W_q and W_v, the LoRA paper's choice;
* ``LoRA all-linear``: rank 8 on every linear layer of the blocks (q, k, v, o, fc, proj);
* ``QLoRA NF4+DQ``: the same adapters over a frozen base stored in NF4 with double quantization.

For each run it records the held-out perplexity before and after, the trainable parameters,
the bytes a task must store (its trainable tensors), the bytes of the model in memory, the
wall time and, on a GPU, the peak memory. ``samples`` continues fixed prompts greedily and at a
temperature before and after fine-tuning. ``SCALES["full"]`` (3 seeds, about a minute on a GPU)
writes the committed ``figures/data/realtext_asyncio.json``; ``SCALES["small"]`` runs live.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pedaPEFT import corpus, course_files, experiments, gpt, qlora, train_text
from pedaPEFT.experiments import base_sha256

DOMAIN = "asyncio"
ADAPTER = {"r": 8, "alpha": 16}
SETTINGS: dict[str, tuple[str, dict, float]] = {  # label -> (method, options, peak lr)
    "full FT": ("full", {}, 5e-4),
    "LoRA q,v": ("lora", {**ADAPTER, "targets": ("q", "v")}, 3e-3),
    "LoRA all-linear": ("lora", {**ADAPTER, "targets": gpt.ALL_LINEAR}, 3e-3),
    "QLoRA NF4+DQ": ("qlora", {**ADAPTER, "targets": gpt.ALL_LINEAR, "quant_type": "nf4",
                               "double_quant": True}, 3e-3),
}
PROMPTS = ("The event loop", "async def ", "class Queue")
SAMPLE_TOKENS = 40
TEMPERATURE = 0.8


@dataclass(frozen=True)
class Scale:
    """Size of a run: optimiser steps, windows per batch, window length, seeds."""

    steps: int
    batch_size: int
    block_size: int
    seeds: tuple[int, ...]


SCALES = {
    "small": Scale(steps=30, batch_size=8, block_size=128, seeds=(0,)),
    "full": Scale(steps=100, batch_size=16, block_size=256, seeds=(0, 1, 2)),
}


def _check_scale(name: str) -> Scale:
    if name not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {name!r}")
    return SCALES[name]


def run(label: str, seed: int, scale: Scale) -> tuple[dict, gpt.GPT]:
    """Fine-tune a fresh copy of the ``pydocs`` base with setting ``label``; (record, model)."""
    if label not in SETTINGS:
        raise ValueError(f"label must be one of {list(SETTINGS)}, got {label!r}")
    method, options, lr = SETTINGS[label]
    config = replace(train_text.TEXT_FINETUNE_CONFIG, steps=scale.steps,
                     batch_size=scale.batch_size, lr=lr, warmup_steps=max(1, scale.steps // 10))
    torch.manual_seed(seed)
    model = gpt.load_pretrained("pydocs")
    if torch.cuda.is_available():
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_text.finetune_text(model, DOMAIN, method, config, options,
                                      scale.block_size, seed)
    seconds = time.perf_counter() - start
    model = model.eval()
    record = {
        "label": label, "method": method, "seed": seed, "lr": lr,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "perplexity_before": result.perplexity_before, "perplexity_after": result.perplexity,
        "trainable": result.trainable, "total": result.total,
        "stored_bytes": sum(p.numel() * p.element_size() for p in model.parameters()
                            if p.requires_grad),
        "model_bytes": qlora.model_bytes(model),
        "seconds": seconds,
        "losses": [round(x, 4) for x in result.run.losses],
    }
    if torch.cuda.is_available():
        record["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return record, model


def samples(model: gpt.GPT, prompts: tuple[str, ...] = PROMPTS,
            max_new_tokens: int = SAMPLE_TOKENS, seed: int = 0) -> dict[str, list[str]]:
    """Continuations of each prompt: ``greedy`` and at ``TEMPERATURE`` (seeded), as text."""
    tok = corpus.tokenizer()
    device = next(model.parameters()).device
    out: dict[str, list[str]] = {"greedy": [], f"temperature {TEMPERATURE}": []}
    generator = torch.Generator().manual_seed(seed)
    for prompt in prompts:
        idx = torch.tensor([tok.encode(prompt)], device=device)
        for key, temperature in zip(out, (0.0, TEMPERATURE), strict=True):
            ids = model.generate(idx, max_new_tokens, temperature, generator)[0].tolist()
            out[key].append(tok.decode(ids))
    return out


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds of each setting's numbers."""
    rows = []
    for label in SETTINGS:
        mine = [r for r in runs if r["label"] == label]
        if not mine:
            continue
        row = {"label": label, "n": len(mine)}
        for key in ("perplexity_before", "perplexity_after", "seconds"):
            values = [r[key] for r in mine]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ("trainable", "total", "stored_bytes", "model_bytes", "peak_memory_bytes"):
            if key in mine[0]:
                row[key] = mine[0][key]
        rows.append(row)
    return rows


def experiment(scale_name: str = "small", log: Callable[[str], object] | None = None) -> dict:
    """Every setting at every seed of the scale, the summary, and samples before and after
    (after: the QLoRA model of the first seed)."""
    scale = _check_scale(scale_name)
    base = gpt.load_pretrained("pydocs")
    if torch.cuda.is_available():
        base.cuda()
    results = {
        "domain": DOMAIN, "scale": scale_name, "base_sha256": base_sha256("pydocs"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "settings": {k: {"method": m, "lr": lr} for k, (m, _, lr) in SETTINGS.items()},
        "samples_before": samples(base), "runs": [],
    }
    for label in SETTINGS:
        for seed in scale.seeds:
            record, model = run(label, seed, scale)
            results["runs"].append(record)
            if log is not None:
                log(f"{label:16s} seed {seed}: perplexity {record['perplexity_before']:.2f} -> "
                    f"{record['perplexity_after']:.2f} ({record['seconds']:.1f} s)")
            if label == "QLoRA NF4+DQ" and seed == scale.seeds[0]:
                results["samples_after"] = samples(model)
    results["summary"] = summarize(results["runs"])
    return results


RESULTS_NAME = f"realtext_{DOMAIN}"


def results_path() -> Path:
    """``results/realtext_asyncio.json`` in the working directory: where the experiment command
    writes (the committed copy ships as ``pedaPEFT/results/realtext_asyncio.json``)."""
    return experiments.results_path(RESULTS_NAME)


def load_results() -> dict:
    """The committed full-scale results, shipped with the package."""
    return course_files.load_shipped_results(
        f"{RESULTS_NAME}.json",
        "python -m pedaPEFT realtext-experiment --scale full "
        f"--out pedaPEFT/results/{RESULTS_NAME}.json (in a clone)",
    )
