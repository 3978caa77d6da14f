"""The course in one command: ``python -m pedaPEFT demo``.

QLoRA fine-tuning of the shipped tiny GPT, start to finish (lesson 9 explains every number
it prints): quantize the base to NF4 with double quantization, add LoRA to every linear layer,
train, and report the trainable share, the storage, the predicted memory and the accuracy.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from pedaPEFT import data, figures, gpt, memory, qlora, train


def demo(task: str = "shift", out_dir: str | os.PathLike = "runs", progress: bool = True,
         steps: int | None = None) -> dict:
    """The course in one run: the shipped tiny GPT base, quantized to NF4 with double
    quantization, fine-tuned with QLoRA (r = 8, α = 16, all linear layers) on ``task``.

    Prints a table (trainable parameters and share, storage bits per weight, memory,
    exact-match accuracy before and after), writes ``<out_dir>/qlora_demo.png`` and returns the
    numbers. Uses the GPU when there is one (bf16 compute), float32 on a CPU.
    """
    if task not in data.TASKS:
        raise ValueError(f"task must be one of {sorted(data.TASKS)}, got {task!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = gpt.load_pretrained("tiny").to(device)
    n_base = gpt.parameter_count(model.config)
    dense_bytes = qlora.model_bytes(model)
    config = dataclasses.replace(train.FINETUNE_CONFIG, progress=progress)
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    result = train.finetune(model, task, "qlora", config, method_options={"r": 8, "alpha": 16})
    quant_bytes = qlora.model_bytes(model)
    # Only the Linear weights are quantized; embeddings, LayerNorms and biases keep fp32.
    quantized = sum(m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, qlora.QuantLinear))
    predicted = memory.finetune_memory(
        n_base, "qlora", trainable=result.trainable, quantized=quantized,
        base_bits=qlora.base_bits_per_parameter(model),
    )
    compute_dtype = next(iter(qlora.qlora_layers(model).values())).compute_dtype
    rows = [
        ("device, compute dtype", f"{device.type}, {str(compute_dtype).removeprefix('torch.')}"),
        ("trainable parameters", f"{result.trainable:,} of {result.total:,} "
                                 f"({100 * result.trainable_fraction:.2f}%, as PEFT counts)"),
        ("storage of quantized weights",
         f"{qlora.base_bits_per_parameter(model):.3f} bits per weight"),
        ("model memory, dense fp32 -> QLoRA", f"{dense_bytes / 2**20:.2f} MiB -> "
                                              f"{quant_bytes / 2**20:.2f} MiB"),
        ("training memory predicted (memory.py)", f"{predicted.static / 2**20:.2f} MiB without "
                                                  "activations"),
        (f"exact match on '{task}', before", f"{result.accuracy_before:.3f}"),
        (f"exact match on '{task}', after QLoRA", f"{result.accuracy:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = figures.qlora_demo(result.run.losses, result.accuracy_before, result.accuracy, task)
    figure_path = out / "qlora_demo.png"
    figures.save_figure(figure, figure_path)
    print(f"wrote {figure_path}")
    return {"rows": dict(rows), "result": result, "figure": figure_path}
