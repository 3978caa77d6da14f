"""Paged AdamW on one GPU, side by side with torch's AdamW and bitsandbytes' PagedAdamW.

    python benchmarks/paged_gpu.py --out benchmarks/paged_gpu.md
    python benchmarks/paged_gpu.py --smoke --out /tmp/paged_smoke.md     # CPU, tiny, seconds

Each arm trains its own copy of the same GPT (full fine-tuning, so the optimizer states are
8 bytes per parameter) on the same random batches. The arms take turns, one training step
each, so drift in clocks or load hits all of them alike; every step is timed with CUDA events
(forward + backward + optimizer step, and the optimizer step alone), and the table reports
medians and their ratios to torch's AdamW measured in the same rounds. Peak memory is then
measured for each arm alone (``torch.cuda.max_memory_allocated`` over a few steps with only
that arm alive). bitsandbytes' managed allocations are not seen by PyTorch's allocator, so its
peak is reported as not comparable.

Arms: torch AdamW (default multi-tensor implementation); PagedAdamW with a budget that holds
every state (nothing evicted: goal <= 1.05 step-time ratio); PagedAdamW with half the budget
(about half the states live in pinned host memory and cross PCIe twice per step);
bitsandbytes ``PagedAdamW`` (32-bit states) if it can be imported, else "not measured".
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pedaPEFT import gpt  # noqa: E402
from pedaPEFT.paged import PagedAdamW, state_bytes  # noqa: E402

STEP_GOAL = 1.05  # paged / unpaged step time when nothing is evicted


@dataclass
class Arm:
    name: str
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    step_times: list[float] = field(default_factory=list)
    optimizer_times: list[float] = field(default_factory=list)


class Clock:
    """Wall-clock marks: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, stop) -> float:
        if self.cuda:
            return start.elapsed_time(stop) * 1e-3
        return stop - start


def batches(config: gpt.GPTConfig, batch: int, count: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        tokens = torch.randint(config.vocab_size, (batch, config.block_size + 1),
                               generator=generator)
        yield tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def train_step(arm: Arm, x: torch.Tensor, y: torch.Tensor, clock: Clock | None = None):
    """forward + backward + optimizer step; returns (step seconds, optimizer seconds) if timed."""
    device_type = x.device.type
    start = clock.mark() if clock else None
    arm.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        logits = arm.model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    before_step = clock.mark() if clock else None
    arm.optimizer.step()
    if clock is None:
        return None
    stop = clock.mark()
    if clock.cuda:
        torch.cuda.synchronize()
    return clock.seconds(start, stop), clock.seconds(before_step, stop)


def bitsandbytes_paged(device: torch.device):
    """bitsandbytes' PagedAdamW factory, or the reason it cannot be measured."""
    if device.type != "cuda":
        return None, "not measured (needs CUDA)"
    try:
        import bitsandbytes as bnb
    except Exception as error:  # noqa: BLE001 (any import failure means: not measured)
        return None, f"not measured (bitsandbytes cannot be imported: {type(error).__name__})"

    def make(params):
        return bnb.optim.PagedAdamW(params, lr=1e-4, weight_decay=0.01, optim_bits=32)

    return make, f"bitsandbytes {bnb.__version__}"


def build_arms(total_state: int, device: torch.device, bnb_factory) -> list[Arm]:
    arms = [
        Arm("torch AdamW", lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01)),
        Arm("PagedAdamW, nothing evicted",
            lambda p: PagedAdamW(p, lr=1e-4, weight_decay=0.01, budget_bytes=total_state)),
        Arm("PagedAdamW, half evicted",
            lambda p: PagedAdamW(p, lr=1e-4, weight_decay=0.01, budget_bytes=total_state // 2)),
    ]
    if bnb_factory is not None:
        arms.append(Arm("bitsandbytes PagedAdamW (32-bit)", bnb_factory))
    return arms


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure_peak(arm: Arm, base: torch.nn.Module, config, batch: int, device) -> int:
    """Peak bytes allocated over a few steps with only this arm's model and optimizer alive."""
    model = copy.deepcopy(base)
    alone = Arm(arm.name, arm.make_optimizer, model, arm.make_optimizer(list(model.parameters())))
    data = list(batches(config, batch, 4, device))
    train_step(alone, *data[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for x, y in data[1:]:
        train_step(alone, x, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del alone, model, data
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def step_peak(model, optimizer, x, y) -> int:
    """Peak bytes allocated during one training step."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(Arm("", None, model, optimizer), x, y)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def spike_under_a_cap(base, config, batch: int, device, total_state: int) -> list[tuple]:
    """A larger batch under a memory cap: torch AdamW runs out of memory, PagedAdamW finishes.

    Without a cap, measure one step's peak at ``batch`` and the extra memory e of one more
    sequence. The spike adds k sequences with k·e about half the optimizer states; the cap
    (``torch.cuda.set_per_process_memory_fraction``) is the normal peak plus half the spike's
    extra, so the spike cannot run with every state on the GPU. PagedAdamW lowers its budget
    by 1.5 times the spike's extra before the spike (the half for the allocator's slack) and
    restores it after.
    """
    data = {size: next(batches(config, size, 1, device)) for size in (batch, batch + 1)}
    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters())
    step_peak(model, optimizer, *data[batch])
    normal = step_peak(model, optimizer, *data[batch])
    per_sequence = step_peak(model, optimizer, *data[batch + 1]) - normal
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    extra_sequences = int(0.5 * total_state // max(per_sequence, 1))
    if extra_sequences < 1:
        return [("spike under a memory cap", "not measured (one sequence needs more memory "
                 "than half the optimizer states)", "", "")]
    spike = batch + extra_sequences
    data[spike] = next(batches(config, spike, 1, device))
    extra = extra_sequences * per_sequence
    cap = normal + extra // 2
    outcomes = {}
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device)
                                               .total_memory, device)
    try:
        for name in ("PagedAdamW", "torch AdamW"):
            model = copy.deepcopy(base)
            paged = name == "PagedAdamW"
            optimizer = (PagedAdamW(model.parameters(), budget_bytes=total_state) if paged
                         else torch.optim.AdamW(model.parameters()))
            arm = Arm(name, None, model, optimizer)
            stage = "a normal step before the spike"
            try:
                train_step(arm, *data[batch])
                stage = "the spike"
                if paged:  # evict the spike's extra and a half more, for the allocator's slack
                    optimizer.set_budget(max(total_state - 3 * extra // 2, total_state // 8))
                train_step(arm, *data[spike])
                stage = "a normal step after the spike"
                if paged:
                    optimizer.set_budget(total_state)
                train_step(arm, *data[batch])
                torch.cuda.synchronize()
                outcomes[name] = "completed"
            except torch.cuda.OutOfMemoryError:
                outcomes[name] = f"out of memory at {stage}"
            del arm, model, optimizer
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return [
        (f"cap {cap / 2**30:.3f} GiB (normal peak + half the spike's extra); spike: batch "
         f"{spike} instead of {batch} (+{extra / 2**30:.3f} GiB)", "", "", ""),
        ("spike under the cap, torch AdamW", outcomes["torch AdamW"],
         "out of memory at the spike",
         "met" if outcomes["torch AdamW"] == "out of memory at the spike" else "MISSED"),
        ("spike under the cap, PagedAdamW (budget lowered for the spike)",
         outcomes["PagedAdamW"], "completed",
         "met" if outcomes["PagedAdamW"] == "completed" else "MISSED"),
    ]


def pinned_copy_bandwidth(device: torch.device, n_bytes: int = 256 * 1024 * 1024) -> float:
    """Host (pinned) -> device copy bandwidth in bytes/s, the ceiling for paging in."""
    host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    for _ in range(3):
        target.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(host, non_blocking=True)
    stop.record()
    torch.cuda.synchronize()
    return 10 * n_bytes / (start.elapsed_time(stop) * 1e-3)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".md", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file to write the table to")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny GPT, a few steps: checks the script end to end")
    parser.add_argument("--preset", default=None, help="GPT preset (default: gpt2; smoke: tiny)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    args = parser.parse_args(argv)

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on a CPU")
    device = torch.device("cpu" if smoke else "cuda")
    preset = args.preset or ("tiny" if smoke else "gpt2")
    batch = args.batch or (4 if smoke else 8)
    steps = args.steps or (3 if smoke else 30)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    config = gpt.GPTConfig.preset(preset)
    torch.manual_seed(0)
    base = gpt.GPT(config).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    total_state = sum(state_bytes(p) for p in base.parameters())
    bnb_factory, bnb_note = bitsandbytes_paged(device)

    arms = build_arms(total_state, device, bnb_factory)
    for arm in arms:
        arm.model = copy.deepcopy(base)
        arm.optimizer = arm.make_optimizer(list(arm.model.parameters()))
    clock = Clock(device)
    for round_index, (x, y) in enumerate(batches(config, batch, warmup + steps, device)):
        for arm in arms:
            timed = train_step(arm, x, y, clock)
            if round_index >= warmup:
                arm.step_times.append(timed[0])
                arm.optimizer_times.append(timed[1])
        print(f"round {round_index + 1}/{warmup + steps}", flush=True)

    reference = arms[0]
    rows: list[tuple[str, str, str, str]] = []

    def ratio_row(metric: str, arm: Arm, attribute: str, goal: float | None) -> None:
        value = median(getattr(arm, attribute)) / median(getattr(reference, attribute))
        verdict = "" if goal is None else ("met" if value <= goal else "MISSED")
        rows.append((metric, f"{value:.3f}", "" if goal is None else f"<= {goal}", verdict))

    for arm in arms[1:]:
        ratio_row(f"training step time, {arm.name} / torch AdamW", arm, "step_times",
                  STEP_GOAL if arm.name.endswith("nothing evicted") else None)
        ratio_row(f"optimizer step time, {arm.name} / torch AdamW", arm, "optimizer_times",
                  STEP_GOAL if arm.name.endswith("nothing evicted") else None)
    if bnb_factory is None:
        rows.append(("bitsandbytes PagedAdamW step time / torch AdamW", bnb_note, "", ""))
    for arm in arms:
        rows.append((f"median training step, {arm.name}", f"{median(arm.step_times) * 1e3:.2f} ms",
                     "", ""))
        rows.append((f"median optimizer step, {arm.name}",
                     f"{median(arm.optimizer_times) * 1e3:.2f} ms", "", ""))

    for arm in arms[1:]:
        difference = max((p - q).abs().max().item() for p, q in
                         zip(arm.model.parameters(), reference.model.parameters(), strict=True))
        rows.append((f"max abs(theta - theta_torch) after {warmup + steps} steps, {arm.name}",
                     f"{difference:.2e}", "0 up to float rounding", ""))

    half = arms[2].optimizer
    evicted_fraction = half.stats.host_bytes / total_state
    rows.append(("states evicted in the half-budget arm", f"{evicted_fraction:.3f}", "", ""))
    per_step = half.stats.bytes_in / (warmup + steps)
    rows.append(("bytes paged in per step (half budget)", f"{per_step / 1e6:.1f} MB", "", ""))
    rows.append(("effective paging bandwidth (paged in / optimizer step time)",
                 f"{per_step / median(arms[2].optimizer_times) / 1e9:.2f} GB/s", "", ""))

    if device.type == "cuda":
        rows.append(("pinned host -> device copy bandwidth",
                     f"{pinned_copy_bandwidth(device) / 1e9:.2f} GB/s", "", ""))
        del half  # nothing of the timing rounds may stay alive while peaks are measured
        for arm in arms:
            arm.model = arm.optimizer = None
        gc.collect()
        torch.cuda.empty_cache()
        peaks = {arm.name: measure_peak(arm, base, config, batch, device) for arm in arms[:3]}
        for name, peak in peaks.items():
            rows.append((f"peak GPU memory, {name}", f"{peak / 2**30:.3f} GiB", "", ""))
        saved = peaks["torch AdamW"] - peaks["PagedAdamW, half evicted"]
        rows.append(("peak GPU memory saved, half evicted vs torch AdamW",
                     f"{saved / 2**30:.3f} GiB ({saved / peaks['torch AdamW']:.1%})",
                     f"~ {total_state / 2 / 2**30:.3f} GiB (half the states)", ""))
        if bnb_factory is not None:
            rows.append(("peak GPU memory, bitsandbytes PagedAdamW",
                         "not comparable (managed memory is outside PyTorch's allocator)", "", ""))
        try:
            rows.extend(spike_under_a_cap(base, config, batch, device, total_state))
        except Exception as error:  # noqa: BLE001 (report, keep the table)
            rows.append(("spike under a memory cap", f"failed: {type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120]}", "", ""))
        device_name = torch.cuda.get_device_name(device)
    else:
        rows.append(("peak GPU memory saved", "not measured (no GPU in --smoke)", "", ""))
        device_name = "CPU (--smoke: simulated device, timings meaningless)"

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Paged AdamW on one GPU",
        "",
        f"- date: {date}",
        f"- device: {device_name}",
        f"- torch {torch.__version__}; {bnb_note}",
        f"- model: GPT preset `{preset}` ({n_params:,} parameters, full fine-tuning), "
        f"batch {batch} x {config.block_size} tokens, bf16 autocast on CUDA",
        f"- optimizer states: {total_state / 2**30:.3f} GiB; {steps} timed rounds after "
        f"{warmup} warm-up rounds, arms interleaved; medians of per-step timings "
        f"({'CUDA events' if device.type == 'cuda' else 'perf_counter'})",
        f"- command: `python benchmarks/paged_gpu.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "| metric | measured | goal | verdict |",
        "|---|---|---|---|",
        *[f"| {metric} | {value} | {goal} | {verdict} |" for metric, value, goal, verdict in rows],
        "",
    ]
    text = "\n".join(lines)
    write_atomically(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
