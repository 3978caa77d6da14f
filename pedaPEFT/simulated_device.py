"""Lesson 10's simulated device: what paging the optimizer states buys when a batch spikes.

A training step needs, alive at once, the weights, their gradients, the activations the
forward pass saved for backward, and the optimizer states kept on the device. On a device of
fixed capacity a larger batch (longer sequences, a bigger micro-batch) needs more activation
memory; torch's AdamW, whose states never leave, then runs out of memory, while a
``paged.PagedAdamW`` whose budget is lowered for that step moves states to the host and
carries on. :func:`train_on_simulated_device` checks each step's footprint against a capacity,
and :func:`spike_demo` is the lesson's experiment.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pedaPEFT import data, gpt, memory
from pedaPEFT.paged import PagedAdamW, PagingStats, state_bytes


class DeviceOutOfMemoryError(RuntimeError):
    """A training step needs more memory than the simulated device has.

    ``records`` holds the footprints of the steps that ran, then the one that did not fit.
    """

    def __init__(self, message: str, records: list[StepFootprint]) -> None:
        super().__init__(message)
        self.records = records


def activation_bytes(model: torch.nn.Module, *inputs: Tensor) -> int:
    """Bytes of the tensors one forward pass saves for backward (activations), parameters
    excluded: ``memory.saved_tensor_bytes`` of ``model(*inputs)`` with gradients on.

    Introduced in lesson 10, section "4. A memory spike, simulated".
    """
    with torch.enable_grad():
        return memory.saved_tensor_bytes(lambda: model(*inputs), model)


@dataclass(frozen=True)
class StepFootprint:
    """Device memory one training step needs (bytes): what is alive at once during the step."""

    step: int
    batch_size: int
    weights: int
    grads: int
    activations: int
    optimizer: int  # optimizer states (and page buffers) on the device

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.activations + self.optimizer


def train_on_simulated_device(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn,  # noqa: ANN001 (a callable (model, x, y) -> scalar loss)
    capacity_bytes: int,
) -> list[StepFootprint]:
    """Train on ``batches`` as if the device held only ``capacity_bytes``; one record per step.

    A step needs weights + gradients + the batch's activations + the optimizer's device states.
    With :class:`PagedAdamW` the optimizer's budget is set, before each step, to what the step
    leaves free (so states are evicted for a large batch and come back after it); any other
    optimizer keeps all its states on the device. A step that does not fit raises
    :class:`DeviceOutOfMemoryError`, as a real device would fail its allocation.
    """
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) \
            or capacity_bytes < 1:
        raise ValueError(f"capacity_bytes must be a positive integer, got {capacity_bytes!r}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in params)
    activations_by_shape: dict[tuple, int] = {}
    records = []
    for step, (x, y) in enumerate(batches):
        shape = tuple(x.shape)
        if shape not in activations_by_shape:
            activations_by_shape[shape] = activation_bytes(model, x)
        activations = activations_by_shape[shape]
        free = capacity_bytes - weights - grads - activations
        if isinstance(optimizer, PagedAdamW):
            try:
                optimizer.set_budget(max(free, 1))
            except ValueError as error:
                raise DeviceOutOfMemoryError(
                    f"step {step}: only {free} bytes left for the optimizer, too few to page",
                    records,
                ) from error
            on_device = optimizer.stats.device_bytes
        else:
            on_device = sum(state_bytes(p) for p in params)
        record = StepFootprint(step, shape[0], weights, grads, activations, on_device)
        if record.total > capacity_bytes:
            raise DeviceOutOfMemoryError(
                f"step {step} (batch {shape[0]}) needs {record.total:,} bytes, "
                f"the device holds {capacity_bytes:,}",
                [*records, record],
            )
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        optimizer.step()
        records.append(record)
    return records


@dataclass
class SpikeDemo:
    """Full fine-tuning of a small GPT on a device that a larger batch overfills.

    ``plain`` holds torch AdamW's footprints up to the step that did not fit; ``paged`` the
    PagedAdamW run through every step; ``max_abs_difference`` compares the paged run's weights
    with the same training on an unlimited device.
    """

    capacity_bytes: int
    batch_sizes: list[int]
    plain: list[StepFootprint]
    plain_error: str
    paged: list[StepFootprint]
    stats: PagingStats
    losses: list[float]
    max_abs_difference: float


def spike_demo(preset: str = "tiny", normal_batch: int = 8, spike_batch: int = 12,
               seed: int = 0) -> SpikeDemo:
    """Run the lesson's experiment: 14 steps, steps 6 and 7 use ``spike_batch`` sequences.

    The device holds weights, gradients, every AdamW state and the activations of a normal
    batch plus a quarter: ``capacity = 2·W + S + 1.25·A(normal)``, W the weight bytes, S the
    state bytes (2·W for fp32). A spike batch needs more than that unless states leave.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread, rather than waiting on busy cores
    try:
        return _spike_demo(preset, normal_batch, spike_batch, seed)
    finally:
        torch.set_num_threads(threads)


def _spike_demo(preset: str, normal_batch: int, spike_batch: int, seed: int) -> SpikeDemo:
    config = gpt.GPTConfig.preset(preset)
    torch.manual_seed(seed)
    base = gpt.GPT(config)
    sizes = [normal_batch] * 6 + [spike_batch] * 2 + [normal_batch] * 6
    batches = [data.pretrain_batch(step, size, block_size=config.block_size, seed=seed)
               for step, size in enumerate(sizes)]
    losses: list[float] = []

    def loss_fn(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(),
                               ignore_index=data.IGNORE_INDEX)
        losses.append(loss.item())
        return loss

    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    states = sum(state_bytes(p) for p in base.parameters())
    capacity = 2 * weights + states + activation_bytes(base, batches[0][0]) * 5 // 4

    plain_model = copy.deepcopy(base)
    try:
        train_on_simulated_device(plain_model, torch.optim.AdamW(plain_model.parameters()),
                                  batches, loss_fn, capacity)
        raise AssertionError("the spike was meant not to fit without paging")
    except DeviceOutOfMemoryError as error:
        plain, plain_error = error.records, str(error)

    losses.clear()
    paged_model = copy.deepcopy(base)
    optimizer = PagedAdamW(paged_model.parameters(), budget_bytes=capacity)
    paged = train_on_simulated_device(paged_model, optimizer, batches, loss_fn, capacity)
    paged_losses = list(losses)

    free_model = copy.deepcopy(base)
    free = torch.optim.AdamW(free_model.parameters())
    for x, y in batches:
        free.zero_grad(set_to_none=True)
        loss_fn(free_model, x, y).backward()
        free.step()
    difference = max((p - q).abs().max().item()
                     for p, q in zip(paged_model.parameters(), free_model.parameters(),
                                     strict=True))
    return SpikeDemo(capacity, sizes, plain, plain_error, paged, optimizer.stats, paged_losses,
                     difference)
