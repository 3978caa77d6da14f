"""Fine-tuning experiments on the small GPT behind lessons 4, 5 and 9, and their result files.

Each experiment fine-tunes the shipped pretrained base (``gpt.load_pretrained``) on one
downstream task of :mod:`pedaPEFT.data` with several methods or LoRA settings and several
seeds, and reports exact-match accuracy on the unseen test split.  A seed changes the random
initialisation of the new parameters (LoRA's ``A``, the adapters' down-projections) and the
order of the training batches. One runner (:func:`run`, :func:`run_many`), one summary
(:func:`summarize`) and one place for result files (:func:`results_path`) serve them all.

* ``adapters``: full fine-tuning, top-layer fine-tuning, bottleneck adapters and LoRA at
  their trainable share (lesson 4; the lecture's adapter slide).
* ``tables``: the LoRA paper's tables 5 and 6 in miniature (lesson 5): which attention
  weights to adapt at an equal budget of ``8 · L · 2d`` trainable numbers (r = 8 for one
  type, 4 for two, 2 for four), and which rank r ∈ {1, 2, 4, 8, 64} for {W_q, W_v} and
  {W_q, W_k, W_v, W_o} (plus W_q alone at r = 64).  As in the paper, α is fixed to the
  first r tried (α = 8), so the scale α/r shrinks as r grows.

* ``alpha_scaling``: why LoRA scales ``BA`` by α/r (lesson 5), on the planted low-rank task
  of :func:`pedaPEFT.linalg.planted_update_task` (seconds on a CPU): the size of the update
  a fixed learning rate makes after a few Adam steps, and the loss after a few steps as a
  function of the learning rate, for several r, under α/r, α/√r (rsLoRA) and no scaling.

* ``qlora_table3``: the QLoRA paper's table 3 in miniature (lesson 9): full fine-tuning,
  LoRA on a float32 base and QLoRA on int8, FP4 and NF4 + DQ bases, at the same r and α.
* ``qlora_qv``: table 3's two W_q, W_v rows again, each with its learning rate chosen from
  ``LR_GRID`` on a validation split as ``adapters`` and ``tables`` choose theirs (lesson 9).

``SCALES["small"]`` runs in seconds (the lessons and tests use it); ``SCALES["full"]`` is
what ``python -m pedaPEFT lora-experiment NAME --scale full`` runs; its results, committed in
``pedaPEFT/results/`` (package data, see :mod:`pedaPEFT.course_files`), are what the figures
plot and the lessons read.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pedaPEFT import course_files, data, gpt, linalg, lora, qlora, train
from pedaPEFT.files import atomic_write_text


@dataclass(frozen=True)
class Scale:
    """How big an experiment is: optimiser steps, batch, training-set size, seeds."""

    steps: int
    batch_size: int
    n_train: int
    seeds: tuple[int, ...]
    n_test: int = data.TEST_SIZE


SCALES: dict[str, Scale] = {
    "small": Scale(steps=30, batch_size=32, n_train=512, seeds=(0,), n_test=128),
    "full": Scale(steps=300, batch_size=32, n_train=1024, seeds=(0, 1, 2)),
}

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
"""Peak learning rates tried for each setting; the best on a validation split is used."""
N_VALIDATION = 512

TABLE5 = (("q",), ("k",), ("v",), ("o",), ("q", "v"), ("q", "k", "v", "o"))
TABLE6 = (("q", "v"), ("q", "k", "v", "o"))
RANKS = (1, 2, 4, 8, 64)
TABLE6_EXTRA = ((("q",), 64),)  # W_q alone: does a high rank rescue it?
LORA_ALPHA = 8
BUDGET_RANK = 8  # table 5: r = BUDGET_RANK / (number of weight types)

def train_prepared(
    model: nn.Module,
    train_set: data.TaskData,
    scale: Scale,
    lr: float,
    seed: int,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> train.TrainResult:
    """Train a prepared model as every experiment here does: ``scale.steps`` AdamW steps with
    10 % warm-up, no weight decay, batches drawn from ``train_set`` in the order ``seed``
    sets; ``evaluate`` (if given) runs four times along the way and at the end."""
    config = train.TrainConfig(
        steps=scale.steps,
        batch_size=scale.batch_size,
        lr=lr,
        warmup_steps=max(1, scale.steps // 10),
        weight_decay=0.0,
        eval_interval=max(1, scale.steps // 4) if evaluate is not None else 0,
        progress=False,
    )
    return train.train(
        model,
        lambda step: train_set.batch(step, scale.batch_size, seed=seed),
        config,
        evaluate=evaluate,
    )


def run(
    method: str,
    task: str,
    seed: int,
    scale: Scale,
    options: dict | None = None,
    lr: float = 3e-3,
    validation: bool = False,
    base: str = "tiny",
) -> dict[str, object]:
    """Fine-tune a fresh copy of the pretrained base once; return counts, sizes and accuracy.

    The seed sets the new parameters' initialisation and the batch order (a quantized base is
    the same for every seed: quantization is deterministic). Accuracy is measured on the test
    split, or with ``validation=True`` on ``N_VALIDATION`` further examples of the training
    stream that training never sees (for choosing ``lr``).

    Introduced in lesson 4, section "5. Adapters on a downstream task";
    used again in lessons 5 and 9.
    """
    if method not in train.METHODS:
        raise ValueError(f"method must be one of {sorted(train.METHODS)}, got {method!r}")
    options = options or {}
    torch.manual_seed(seed)
    model = gpt.load_pretrained(base)
    n_base, bytes_before = gpt.parameter_count(model.config), qlora.model_bytes(model)
    block = model.config.block_size
    stream = data.task_data(task, "train", scale.n_train + N_VALIDATION, block)
    train_set = data.TaskData(task, "train", stream.x[: scale.n_train], stream.y[: scale.n_train])
    if validation:
        test_set = data.TaskData(
            task, "validation", stream.x[scale.n_train :], stream.y[scale.n_train :]
        )
    else:
        test_set = data.task_data(task, "test", scale.n_test, block)
    model = train.METHODS[method](model, **options)
    trainable, total = lora.count_parameters(model)
    start = time.perf_counter()
    result = train_prepared(
        model, train_set, scale, lr, seed,
        evaluate=lambda m: {"accuracy": data.exact_match(m, test_set)},
    )
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "seed": seed,
        "lr": lr,
        "trainable": trainable,
        "total": total,
        "base_parameters": n_base,
        "model_bytes_before": bytes_before,
        "model_bytes_after": qlora.model_bytes(model),
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "accuracy": result.evals[-1]["accuracy"],
        "curve": [[e["step"], e["accuracy"]] for e in result.evals],
        "seconds": round(seconds, 2),
    }


def adapter_settings() -> list[tuple[str, dict]]:
    """Lesson 4's methods: full, top block, adapters of two sizes, LoRA on q and v."""
    return [
        ("full", {}),
        ("top", {"n_blocks": 1}),
        ("adapter", {"bottleneck": 4}),
        ("adapter", {"bottleneck": 16}),
        ("lora", {"r": 8, "alpha": LORA_ALPHA, "targets": ["q", "v"]}),
    ]


def lora_table_settings() -> list[tuple[str, dict]]:
    """Tables 5 and 6 as (table, options) pairs; a setting in both is run once."""
    settings: list[tuple[str, dict]] = []
    for targets in TABLE5:
        r = BUDGET_RANK // len(targets)
        settings.append(("table5", {"r": r, "alpha": LORA_ALPHA, "targets": list(targets)}))
    for targets in TABLE6:
        for r in RANKS:
            settings.append(("table6", {"r": r, "alpha": LORA_ALPHA, "targets": list(targets)}))
    for targets, r in TABLE6_EXTRA:
        settings.append(("table6", {"r": r, "alpha": LORA_ALPHA, "targets": list(targets)}))
    return settings


def choose_lr(
    method: str, options: dict, task: str, scale: Scale, log: Callable[[str], None] | None = None
) -> tuple[float, dict[str, float]]:
    """The learning rate of ``LR_GRID`` with the best validation accuracy (seed 0).

    Ties go to the smaller learning rate.  Returns ``(lr, {lr: validation accuracy})``.
    """
    scores = {}
    for lr in LR_GRID:
        scores[f"{lr:g}"] = run(method, task, 0, scale, options, lr=lr, validation=True)["accuracy"]
        if log is not None:
            log(f"  lr search {method} {options} lr {lr:g}: validation {scores[f'{lr:g}']:.3f}")
    best = max(LR_GRID, key=lambda lr: (scores[f"{lr:g}"], -lr))
    return best, scores


def run_many(
    settings: Iterable[dict],
    task: str,
    scale: Scale,
    lrs: dict[str, float],
    log: Callable[[str], None] | None = None,
) -> list[dict[str, object]]:
    """Every setting for every seed of ``scale``, at ``lrs[method]``; a run shared by two
    settings runs once.

    A setting is a dict with ``method`` and ``options``; its other entries (``group``,
    ``label``) are copied into each of its rows.
    """
    rows: list[dict[str, object]] = []
    done: dict[str, dict[str, object]] = {}
    for setting in settings:
        method, options = setting["method"], setting["options"]
        tags = {k: v for k, v in setting.items() if k not in ("method", "options")}
        for seed in scale.seeds:
            key = json.dumps([method, options, seed], sort_keys=True)
            if key not in done:
                done[key] = run(method, task, seed, scale, options, lr=lrs[method])
                if log is not None:
                    log(f"{' '.join(map(str, tags.values()))}: {method} {options} seed {seed}: "
                        f"accuracy {done[key]['accuracy']:.3f}")
            rows.append({**tags, **done[key]})
    return rows


EXPERIMENTS = ("adapters", "tables", "qlora_table3", "qlora_qv", "learns")


def experiment(name: str, scale_name: str = "small", task: str | None = None, log=None) -> dict:
    """Run experiment ``name`` (one of ``EXPERIMENTS``); returns a JSON-able dict.

    ``adapters`` and ``tables`` first choose one learning rate per method from ``LR_GRID`` on
    a validation split (``adapters``: for each method at its first setting; ``tables``: for
    LoRA on {W_q, W_v}, r = 4, used for every table entry; ``qlora_qv``: for each of its two
    rows); ``qlora_table3`` uses ``TABLE3_LR``. Then every setting runs with every seed and is
    scored on the test split. The task defaults to ``shift`` (``reverse`` for the QLoRA ones).
    ``learns`` is :func:`pedaPEFT.lora_learns.experiment` (lesson 5, section 9).
    """
    if name == "learns":
        from pedaPEFT import lora_learns
        return lora_learns.experiment(scale_name, task, log)
    if scale_name not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale_name!r}")
    scale = SCALES[scale_name]
    lrs: dict[str, float] = {}
    if name == "adapters":
        settings = [{"group": "methods", "method": method, "options": options}
                    for method, options in adapter_settings()]
        search = settings
    elif name == "tables":
        settings = [{"group": table, "method": "lora", "options": options}
                    for table, options in lora_table_settings()]
        qv = {"r": BUDGET_RANK // 2, "alpha": LORA_ALPHA, "targets": ["q", "v"]}
        search = [{"method": "lora", "options": qv}]
    elif name == "qlora_table3":
        settings = [{"label": label, "method": method, "options": options}
                    for label, method, options in TABLE3_SETTINGS]
        search, lrs = [], dict(TABLE3_LR)
    elif name == "qlora_qv":
        settings = [{"label": label, "method": method, "options": options}
                    for label, method, options in TABLE3_SETTINGS if label in TABLE3_QV_LABELS]
        search = settings
    else:
        raise ValueError(f"name must be one of {list(EXPERIMENTS)}, got {name!r}")
    task = task or ("reverse" if name.startswith("qlora") else "shift")
    start = time.perf_counter()
    searches: dict[str, dict[str, float]] = {}
    for setting in search:
        if setting["method"] not in lrs:
            lrs[setting["method"]], searches[setting["method"]] = choose_lr(
                setting["method"], setting["options"], task, scale, log)
    rows = run_many(settings, task, scale, lrs, log)
    alpha = {"lora_alpha": LORA_ALPHA} if name in ("adapters", "tables") else {}  # else per row
    return {
        **alpha,
        "experiment": name,
        "task": task,
        "scale": scale_name,
        "config": asdict(scale),
        "lr": lrs,
        "lr_search": searches,
        "base_sha256": base_sha256(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
        "distinct_runs": len(
            {json.dumps([r["method"], r["options"], r["seed"]], sort_keys=True) for r in rows}
        )
        + len(LR_GRID) * len(searches),
        "runs": rows,
    }


def base_sha256(base: str = "tiny") -> str:
    """SHA-256 of the shipped base's weights file, to tie result files to the base they used.

    Introduced in lesson 4, section "5. Adapters on a downstream task"; used again in lesson 5.
    """
    weights, _ = gpt.pretrained_paths(base)
    return hashlib.sha256(weights.read_bytes()).hexdigest()


SETTING_FIELDS = ("label", "method", "options", "trainable", "total", "base_parameters",
                  "model_bytes_after")
"""What a summary keeps of a setting's first row (the fields a row has that seeds share)."""


def summarize(rows: Iterable[dict], group: str | None = None) -> list[dict[str, object]]:
    """Mean and sample standard deviation of accuracy over seeds, per setting (label, method
    and options), optionally only the rows of ``group``.

    Returns one dict per setting, in first-seen order: the row's ``SETTING_FIELDS`` it has,
    ``mean``, ``std`` (0 for one seed) and ``n``.

    Introduced in lesson 4, section "5. Adapters on a downstream task";
    used again in lessons 5 and 9.
    """
    settings: dict[str, tuple[dict, list[float]]] = {}
    for row in rows:
        if group is not None and row.get("group") != group:
            continue
        key = json.dumps([row.get("label"), row["method"], row["options"]], sort_keys=True)
        fields = {k: row[k] for k in SETTING_FIELDS if k in row}
        settings.setdefault(key, (fields, []))[1].append(row["accuracy"])
    return [{**fields, **_mean_std(accuracies), "n": len(accuracies)}
            for fields, accuracies in settings.values()]


def _mean_std(accuracies: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}


def results_path(name: str) -> Path:
    """``results/<name>.json`` in the working directory: where the experiment commands write the
    full-scale results ``name`` (``lora_adapters``, ``lora_tables``, ``qlora_table3_reverse``,
    …; ``_<task>`` ends the name of a task other than the experiment's default). The committed
    copies that lessons read ship in the package (``pedaPEFT/results/``, :func:`load_results`)."""
    return course_files.RESULTS_OUT / f"{name}.json"


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write ``results`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True) + "\n")


def _command_that_writes(name: str) -> str:
    """The CLI command that writes results file ``name`` (see :func:`results_path`)."""
    for experiment_name, rows in (("qlora_table3", ""), ("qlora_qv", " --rows qv")):
        if name.startswith(experiment_name):
            task = name.removeprefix(experiment_name).lstrip("_") or "reverse"
            return f"python -m pedaPEFT qlora-experiment{rows} --scale full --task {task}"
    experiment_name, _, task = name.removeprefix("lora_").partition("_")
    command = f"python -m pedaPEFT lora-experiment {experiment_name} --scale full"
    return command + (f" --task {task}" if task else "")


def load_results(name: str) -> dict:
    """The committed full-scale results of experiment ``name`` (shipped with the package).

    Introduced in lesson 4, section "5. Adapters on a downstream task";
    used again in lessons 5 and 9.
    """
    return course_files.load_shipped_results(
        f"{name}.json",
        f"{_command_that_writes(name)} --out pedaPEFT/results/{name}.json (in a clone)",
    )


SCALING_RULES = ("alpha/r", "alpha/sqrt(r)", "none")
"""How ``BA`` is scaled: α/r with α = 8 (LoRA), α/√r with α = 8 (rsLoRA), 1 (i.e. α = r)."""


def _planted_lora_run(
    task: linalg.PlantedUpdateTask, r: int, rule: str, lr: float, steps: int
) -> tuple[float, float]:
    """Train LoRA (A, B only) on the planted task with Adam; return (MSE, ‖ΔW‖_F)."""
    X = torch.tensor(task.X, dtype=torch.float32)
    Y = torch.tensor(task.Y, dtype=torch.float32)
    torch.manual_seed(0)
    base = nn.Linear(X.shape[1], Y.shape[1], bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor(task.W_before, dtype=torch.float32))
    alpha = r if rule == "none" else LORA_ALPHA
    layer = lora.LoRALinear(base, r, alpha, rslora=rule == "alpha/sqrt(r)")
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    for _ in range(steps):
        loss = (layer(X) - Y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (layer(X) - Y).square().mean().item(), layer.delta_weight().norm().item()


def alpha_scaling(
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    sweep_ranks: tuple[int, ...] = (1, 4, 16, 64),
    lrs: tuple[float, ...] = tuple(float(v) for v in np.logspace(-4, -1, 7)),
    norm_lr: float = 1e-3,
    norm_steps: int = 10,
    sweep_steps: int = 20,
) -> dict[str, object]:
    """Why α/r: update size at a fixed learning rate, and loss against learning rate.

    The planted task is a 64×96 linear layer whose targets need a rank-4 change, 256 samples.
    ``norms[rule][i]``: ‖ΔW‖_F after ``norm_steps`` Adam steps at ``norm_lr`` with rank
    ``ranks[i]``.  ``losses[rule][r][j]``: MSE after ``sweep_steps`` steps at ``lrs[j]``
    (rules ``alpha/r`` and ``none``).  At r = α = 8 all rules coincide.

    Introduced in lesson 5, section "4. Why scale by $\\\\alpha/r$?".
    """
    task = linalg.planted_update_task(d_out=64, d_in=96, update_rank=4, n_samples=256, seed=0)
    norms = {
        rule: [_planted_lora_run(task, r, rule, norm_lr, norm_steps)[1] for r in ranks]
        for rule in SCALING_RULES
    }
    losses = {
        rule: {
            str(r): [_planted_lora_run(task, r, rule, lr, sweep_steps)[0] for lr in lrs]
            for r in sweep_ranks
        }
        for rule in ("alpha/r", "none")
    }
    return {
        "ranks": list(ranks),
        "sweep_ranks": list(sweep_ranks),
        "lrs": list(lrs),
        "norm_lr": norm_lr,
        "norm_steps": norm_steps,
        "sweep_steps": sweep_steps,
        "norms": norms,
        "losses": losses,
    }


# --------------------------------------------------------------------------- QLoRA, table 3

TABLE3_SETTINGS: tuple[tuple[str, str, dict], ...] = (
    ("full fine-tuning (fp32)", "full", {}),
    ("LoRA, fp32 base, all linear", "lora", {"r": 8, "alpha": 16, "targets": gpt.ALL_LINEAR}),
    ("QLoRA int8, all linear", "qlora", {"quant_type": "int8"}),
    ("QLoRA FP4, all linear", "qlora", {"quant_type": "fp4", "double_quant": False}),
    ("QLoRA NF4 + DQ, all linear", "qlora", {"quant_type": "nf4"}),
    ("LoRA, fp32 base, q and v", "lora", {"r": 8, "alpha": 16, "targets": ("q", "v")}),
    ("QLoRA NF4 + DQ, q and v", "qlora", {"targets": ("q", "v")}),
)
"""The QLoRA paper's table 3 in miniature: (label, method, options); r = 8, α = 16."""

TABLE3_LR = {"full": 1e-3, "lora": 4e-3, "qlora": 4e-3}
"""Peak learning rates per method, the same for LoRA and QLoRA."""

TABLE3_QV_LABELS = ("LoRA, fp32 base, q and v", "QLoRA NF4 + DQ, q and v")
"""Table 3's two W_q, W_v rows, which ``qlora_qv`` reruns with a learning-rate search."""
