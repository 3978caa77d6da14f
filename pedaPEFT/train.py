"""Training loop: AdamW, warm-up + cosine schedule, clipping, checkpoints, resume, DDP.

One loop serves pretraining and every fine-tuning method. Data comes from a function
``get_batch(step) -> (x, y)`` that returns the *global* batch of a step as a pure function
of the step number; this one design choice gives

* bit-identical resume: a resumed run sees exactly the batches the uninterrupted run saw;
* data parallelism without a sampler: process r of W takes rows r B/W ... (r + 1) B/W - 1.

Loss. With targets y (``IGNORE_INDEX`` where unscored) the loss of a step is the mean
cross-entropy over the scored targets of the global batch, L = (1/n) sum_t CE_t. Each of W
processes computes W / n * (sum of its own CE_t); DDP averages gradients over processes,
which gives back exactly dL/dtheta, whatever the share of scored targets each process got.

Schedule. lr(s) = lr (s + 1) / w for s < w (linear warm-up), then cosine decay from lr to
lr_min = min_lr_ratio lr over the remaining steps.

Fine-tuning methods. A method is a function ``prepare(model, **options) -> model`` that
freezes, unfreezes or wraps modules in place; ``finetune`` prepares, trains whatever is left
trainable and scores exact-match accuracy. ``METHODS`` lists every method of the course
(full, top, feature, adapter, lora, qlora, bitfit, prefix), complete on import;
``register_method`` adds one of your own.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.std import tqdm  # text bars: tqdm.auto warns on stderr in a kernel without ipywidgets

from pedaPEFT import adapters, bitfit, data, lora, prefix, qlora
from pedaPEFT.checkpoints import (  # noqa: F401 (train.CHECKPOINT_FORMAT stays a public name)
    CHECKPOINT_FORMAT,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from pedaPEFT.files import check_output_file
from pedaPEFT.gpt import GPT, GPTConfig, untie_head

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainConfig:
    """Optimisation settings. ``batch_size`` is the global batch, split over processes.

    Introduced in lesson 3, section "3. Fine-tuning: what each method can learn".
    """

    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 0  # 0: evaluate only at the end
    checkpoint_interval: int = 0  # 0: write a checkpoint only at the end (if a path is given)
    progress: bool = True
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0),
                          ("eval_interval", 0), ("checkpoint_interval", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, low, high, allowed in (
            ("lr", 0.0, math.inf, "a finite number > 0"),
            ("min_lr_ratio", 0.0, 1.0, "a number in [0, 1]"),
            ("weight_decay", 0.0, math.inf, "a finite number >= 0"),
            ("beta1", 0.0, 1.0, "a number in [0, 1)"),
            ("beta2", 0.0, 1.0, "a number in [0, 1)"),
            ("grad_clip", 0.0, math.inf, "a finite number >= 0 (0 switches clipping off)"),
        ):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and low <= value <= high
            if name == "lr":
                ok = ok and value > 0
            if name.startswith("beta"):
                ok = ok and value < 1
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


class TrainingDiverged(ValueError):
    """The loss (or a weight) became NaN or inf: training stopped, no checkpoint was written."""


@dataclass
class TrainResult:
    """What a run produced: per-step losses and learning rates, evaluations, wall time."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to the floor."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in two groups.

    Matrices (embeddings and Linear weights, ``dim >= 2``) get weight decay; biases and
    LayerNorm gains do not, since shrinking them towards zero has no regularising meaning.

    Introduced in lesson 3, section "Checking the accounting against real tensors".
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (every requires_grad is False)")
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = trainable[0].device.type == "cuda"
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        fused=fused or None,
    )


def distributed_setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes, or run alone.

    Returns (rank, world_size, device): NCCL with one GPU per process when CUDA is used
    (``device`` "cuda", or "auto" with CUDA present), gloo on CPU otherwise.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), device


def _check_finite_weights(trainable: list[torch.Tensor], step: int, lr: float) -> None:
    """Raise ``TrainingDiverged`` if an update left a trainable weight NaN or inf."""
    if not all(bool(torch.isfinite(p).all()) for p in trainable):
        raise TrainingDiverged(
            f"training diverged: a weight is NaN or inf after step {step} (lr={lr:.3g}); "
            "no checkpoint was written; lower lr or use grad_clip"
        )


def _scored_loss(logits: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    ce = F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), y.view(-1),
        ignore_index=data.IGNORE_INDEX, reduction="sum",
    )
    return ce * scale


def train(
    model: nn.Module,
    get_batch: Callable[[int], Batch],
    config: TrainConfig,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``model``'s trainable parameters for ``config.steps`` steps; see the module doc.

    ``evaluate(model)`` is called every ``eval_interval`` steps and after the last one.
    With ``resume=True`` the state in ``checkpoint`` (if the file exists) is loaded first and
    training continues from its step; the outcome equals the uninterrupted run's bit for bit
    on CPU. Under ``torchrun`` the model is wrapped in DistributedDataParallel and only
    rank 0 writes checkpoints.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint (the file to continue from)")
    if checkpoint is not None:
        check_output_file(checkpoint, "checkpoint")
    rank, world_size, device = distributed_setup(config.device)
    if config.batch_size % world_size:
        raise ValueError(
            f"batch_size must be divisible by the number of processes ({world_size}), "
            f"got {config.batch_size}"
        )
    merged = [name for name, module in model.named_modules() if getattr(module, "merged", False)]
    if merged:
        raise ValueError(
            f"model: layers {merged[:4]} are merged (their adapter is folded into the weight "
            "and gets no gradient); unmerge them before training"
        )
    model.to(device)
    optimizer = make_optimizer(model, config)
    result, start = TrainResult(), 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        check_resumable(state, model, config.steps, checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        result = TrainResult(**state["result"])
        start = state["step"]
    runner: nn.Module = model
    if world_size > 1:
        runner = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    local = config.batch_size // world_size
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(start, config.steps), disable=not config.progress or rank != 0,
               initial=start, total=config.steps)
    for step in bar:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(step)
        if x.shape[0] != config.batch_size:
            raise ValueError(
                f"get_batch returned {x.shape[0]} rows; config.batch_size is {config.batch_size}"
            )
        n_scored = int((y != data.IGNORE_INDEX).sum())
        x = x[rank * local : (rank + 1) * local].to(device, non_blocking=True)
        y = y[rank * local : (rank + 1) * local].to(device, non_blocking=True)
        with autocast:
            logits = runner(x)
        loss = _scored_loss(logits, y, world_size / max(1, n_scored))
        step_loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(step_loss)
            step_loss /= world_size
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):  # stop before the update spoils the weights
            raise TrainingDiverged(
                f"training diverged: the loss of step {step + 1} is {loss_value} (lr={lr:.3g}); "
                f"the model keeps the weights of step {step} and no checkpoint was written "
                "since; lower lr or use grad_clip"
            )
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss_value)
        result.lrs.append(lr)
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}", refresh=False)
        done = step + 1
        is_last = done == config.steps
        if evaluate is not None and (
            is_last or (config.eval_interval and done % config.eval_interval == 0)
        ):
            result.evals.append({"step": done, **evaluate(model)})
            model.train()
        if checkpoint is not None and rank == 0 and (
            is_last or (config.checkpoint_interval and done % config.checkpoint_interval == 0)
        ):
            _check_finite_weights(trainable, done, lr)
            save_checkpoint(checkpoint, model, optimizer, done, result, config)
    bar.close()
    _check_finite_weights(trainable, config.steps, lr_at(config.steps - 1, config))
    result.seconds += time.perf_counter() - t0
    model.eval()
    return result


# --------------------------------------------------------------------------- fine-tuning


def prepare_full(model: GPT) -> GPT:
    """Full fine-tuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def prepare_top(model: GPT, n_blocks: int = 1) -> GPT:
    """Top-layer fine-tuning: the last ``n_blocks`` blocks, the final LayerNorm and the head.

    The head gets its own copy of the embedding first, so the frozen bottom of the network
    (which reads the embedding) is not changed through the tie.

    Introduced in lesson 3, section "2. Three methods, three sets of trainable parameters".
    """
    if not 1 <= n_blocks <= len(model.blocks):
        raise ValueError(f"n_blocks must be in [1, {len(model.blocks)}], got {n_blocks}")
    untie_head(model)
    model.requires_grad_(False)
    for module in [*model.blocks[-n_blocks:], model.ln_f, model.lm_head]:
        module.requires_grad_(True)
    return model


def prepare_feature(model: GPT) -> GPT:
    """Feature-based: the pretrained network is a frozen feature extractor; only the head trains."""
    untie_head(model)
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    return model


METHODS: dict[str, Callable[..., nn.Module]] = {
    "full": prepare_full,
    "top": prepare_top,
    "feature": prepare_feature,
    "adapter": adapters.prepare_adapters,
    "lora": lora.prepare_lora,
    "qlora": qlora.prepare_qlora,
    "bitfit": bitfit.prepare_bitfit,
    "prefix": prefix.prepare_prefix,
}
"""Every fine-tuning method ``finetune`` knows (lessons 3, 4, 5, 9): name -> ``prepare(model,
**options)``, which freezes what the method keeps fixed, adds its new layers and returns the
model."""


def register_method(name: str, prepare: Callable[..., nn.Module]) -> None:
    """Make ``finetune(..., method=name)`` call ``prepare(model, **method_options)``."""
    if not callable(prepare):
        raise TypeError(f"prepare must be callable, got {type(prepare).__name__}")
    METHODS[name] = prepare


FINETUNE_CONFIG = TrainConfig(steps=300, batch_size=64, lr=3e-3, warmup_steps=20,
                              weight_decay=0.0, progress=False)


@dataclass
class FinetuneResult:
    """Outcome of ``finetune``: counts, exact-match accuracy before and after, the run.

    ``total`` is the base model's parameter count (quantized weights included) plus the
    parameters the method added; ``trainable`` is what the optimizer updates.
    """

    task: str
    method: str
    trainable: int
    total: int
    accuracy_before: float
    accuracy: float
    run: TrainResult

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total


def prepare(model: GPT, method: str, options: dict | None = None) -> tuple[GPT, int, int]:
    """Apply ``METHODS[method](model, **options)``; returns (model, trainable, total), where
    ``total`` is the base's parameter count (quantized weights included) plus what the method
    added."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    base_ids = {id(p) for p in model.parameters()}
    base_total = sum(p.numel() for p in model.parameters())
    model = METHODS[method](model, **(options or {}))
    trainable, _ = lora.count_parameters(model)
    # The base's parameters count even when a method stores them as quantized buffers.
    total = base_total + sum(p.numel() for p in model.parameters() if id(p) not in base_ids)
    return model, trainable, total


def finetune(
    model: GPT,
    task: str,
    method: str = "full",
    config: TrainConfig | None = None,
    n_train: int = 2048,
    method_options: dict | None = None,
    checkpoint: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on downstream ``task`` with ``method`` and score it on the test split.

    The model is prepared in place (``METHODS[method](model, **method_options)``), trained on
    ``n_train`` examples, and scored by exact match on ``data.TEST_SIZE`` unseen examples.

    Introduced in lesson 3, section "3. Fine-tuning: what each method can learn".
    """
    config = FINETUNE_CONFIG if config is None else config
    block = model.config.block_size
    train_set = data.task_data(task, "train", n_train, block)
    test_set = data.task_data(task, "test", data.TEST_SIZE, block)
    accuracy_before = data.exact_match(model, test_set)
    model, trainable, total = prepare(model, method, method_options)
    run = train(
        model,
        lambda step: train_set.batch(step, config.batch_size),
        config,
        evaluate=lambda m: {"accuracy": data.exact_match(m, test_set)},
        checkpoint=checkpoint,
    )
    return FinetuneResult(task, method, trainable, total, accuracy_before,
                          run.evals[-1]["accuracy"], run)


# --------------------------------------------------------------------------- pretraining

PRETRAIN_CONFIG = TrainConfig(steps=400, batch_size=64, lr=3e-3, warmup_steps=30,
                              weight_decay=0.1, eval_interval=100, progress=False)


def pretrain_metrics(model: GPT) -> dict[str, float]:
    """Exact match on each pretraining task and each downstream task (the base's scores)."""
    block = model.config.block_size
    return {
        f"{kind}/{name}": data.exact_match(model, data.task_data(name, "test", 256, block))
        for kind, names in (("pretrain", data.PRETRAIN_TASKS), ("downstream", data.TASKS))
        for name in names
    }


def pretrain(model: GPT, config: TrainConfig = PRETRAIN_CONFIG, seed: int = 0,
             checkpoint: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Language-model pretraining on the synthetic mixture (``data.pretrain_batch``)."""
    block = model.config.block_size
    return train(
        model,
        lambda step: data.pretrain_batch(step, config.batch_size, block, seed),
        config,
        evaluate=pretrain_metrics,
        checkpoint=checkpoint,
        resume=resume,
    )


def pretrain_base(preset: str = "tiny", config: TrainConfig = PRETRAIN_CONFIG, seed: int = 0,
                  checkpoint: str | Path | None = None, resume: bool = False
                  ) -> tuple[GPT, dict]:
    """The recipe of a shipped base: seed, build ``preset``, pretrain; returns (model, info).

    ``info`` holds the recipe and what it measured (mean loss of the last 20 steps, exact
    match on every task), the record written next to the weights.
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset(preset))
    result = pretrain(model, config, seed, checkpoint=checkpoint, resume=resume)
    recipe = {k: v for k, v in asdict(config).items() if k not in ("progress", "device")}
    info = {
        "preset": preset,
        "seed": seed,
        "train_config": recipe,
        "final_loss": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 4),
        "metrics": {k: v for k, v in result.evals[-1].items() if k != "step"},
        "made_by": f"python -m pedaPEFT pretrain --preset {preset}",
        "torch_version": torch.__version__,
    }
    return model, info
