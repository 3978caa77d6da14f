"""GPU benchmark of the GPT workbench: throughput, MFU, DDP scaling, memory predicted vs measured.

    python benchmarks/gpt_gpu.py --out benchmarks/gpt_gpu.md          # CUDA machine, >= 2 GPUs
    python benchmarks/gpt_gpu.py --smoke --out /tmp/gpt_gpu_smoke.md  # CPU, tiny sizes

Three measurements, side by side in one invocation:

1. **Throughput and MFU** of full fine-tuning of the ``gpt2`` preset (124M) on one GPU: bf16
   autocast, ``torch.compile``, SDPA attention, fused AdamW. MFU = tokens/s x FLOPs per token
   / peak, with FLOPs per token = 6 N + 12 L T d (``gpt.flops_per_token``, nanoGPT's
   convention) and the peak the GPU's dense bf16 rate (``--peak-tflops``, 989 for an H100 or
   H200 SXM). The vocabulary is padded from 50,257 to 50,304 (a multiple of 64), as nanoGPT
   does for speed.
2. **DDP scaling** on ``--gpus`` GPUs of the host (torchrun, NCCL): the same per-GPU batch;
   efficiency = tokens/s on W GPUs / (W x tokens/s on one), both measured by this run.
3. **Memory** of one eager training step (no compile: compiled graphs choose what to save):
   ``memory.gpt_step_peak_bytes`` against ``torch.cuda.max_memory_allocated``, and the static
   part (weights + optimizer states) against ``torch.cuda.memory_allocated`` before the step.

Each throughput figure is the median step time over ``--steps`` timed steps after
``--warmup`` untimed ones (compilation happens in the warm-up). ``--smoke`` runs the whole
script on CPU with a tiny model (gloo instead of NCCL, no compile, saved-tensor bytes instead
of the CUDA allocator's peak), to check the script end to end without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pedaPEFT import gpt, memory, train

PADDED_VOCAB = 50_304


def model_config(smoke: bool) -> gpt.GPTConfig:
    if smoke:
        return gpt.GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64)
    return gpt.GPTConfig.preset("gpt2", vocab_size=PADDED_VOCAB)


def training_step(model, runner, optimizer, x, y, device) -> torch.Tensor:
    """One full fine-tuning step: forward (bf16 autocast on CUDA), loss, backward, AdamW."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = runner(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    del logits  # the 16-bit logits are not needed by backward: free them before it
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args: argparse.Namespace) -> None:
    """Measure tokens/s on this process's device; under torchrun, with DDP over all ranks."""
    rank, world, device = train.distributed_setup()
    torch.manual_seed(0)
    config = model_config(args.smoke)
    model = gpt.GPT(config).to(device)
    optimizer = train.make_optimizer(model, train.TrainConfig(lr=1e-4, progress=False))
    runner = model
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        runner = torch.compile(runner)
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    y = torch.randint(config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    for _ in range(args.warmup):
        training_step(model, runner, optimizer, x, y, device)
    synchronize(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = training_step(model, runner, optimizer, x, y, device)
        synchronize(device)  # a step ends when the GPU is done (the loss is then final)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = world * args.batch_size * args.seq_len / step_s
    if rank == 0:
        result = {"world": world, "step_s": step_s, "tokens_per_s": tokens_per_s,
                  "loss": float(loss), "device": device_name(device)}
        Path(args.json).write_text(json.dumps(result))
    if world > 1:
        torch.distributed.destroy_process_group()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def run_worker(args: argparse.Namespace, n_processes: int) -> dict:
    """Run ``worker`` in fresh processes (plain python for one, torchrun for several)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        forwarded = ["--worker", "--json", str(out), "--batch-size", str(args.batch_size),
                     "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                     "--warmup", str(args.warmup)]
        forwarded += ["--smoke"] if args.smoke else []
        forwarded += ["--compile"] if args.compile else []
        launcher = [sys.executable]
        if n_processes > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={n_processes}"]
        # NVLink multicast (NVLS) stays off: DDP's all-reduce does not need it.
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}
        if args.smoke:
            env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        subprocess.run([*launcher, str(Path(__file__).resolve()), *forwarded], check=True,
                       env=env)
        return json.loads(out.read_text())


def measure_memory(args: argparse.Namespace, device: torch.device) -> dict:
    """Predicted vs measured memory of one eager full fine-tuning step."""
    torch.manual_seed(0)
    config = model_config(args.smoke)
    batch, seq = args.memory_batch_size, args.seq_len
    precision = "amp" if device.type == "cuda" else "fp32"
    predicted = memory.gpt_step_peak_bytes(config, batch, seq, precision)
    model = gpt.GPT(config).to(device)
    optimizer = train.make_optimizer(model, train.TrainConfig(lr=1e-4, progress=False))
    x = torch.randint(config.vocab_size, (batch, seq), device=device)
    y = torch.randint(config.vocab_size, (batch, seq), device=device)
    training_step(model, model, optimizer, x, y, device)  # creates the optimizer states
    result = {"predicted": predicted}
    result["static_measured"] = memory.tensor_bytes(
        [*model.parameters(), *(v for s in optimizer.state.values() for v in s.values())]
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["allocated_before_step"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        training_step(model, model, optimizer, x, y, device)
        torch.cuda.synchronize(device)
        result["peak_measured"] = torch.cuda.max_memory_allocated(device)
    else:

        def forward_loss():
            logits = model(x)
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))

        result["activations_measured"] = memory.saved_tensor_bytes(forward_loss, model)
    return result


def write_report(args, single, multi, mem, config, path: Path) -> str:
    flops = gpt.flops_per_token(config, args.seq_len)
    mfu = single["tokens_per_s"] * flops / (args.peak_tflops * 1e12)
    efficiency = multi["tokens_per_s"] / (multi["world"] * single["tokens_per_s"])
    p = mem["predicted"]
    mib = 2**20
    lines = [
        "# GPT workbench on the GPU",
        "",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. "
        f"Device: {single['device']} (x{multi['world']} for DDP). torch {torch.__version__}."
        + (" **Smoke run on CPU: sizes are tiny, numbers mean nothing.**" if args.smoke else ""),
        "",
        f"Model: {gpt.parameter_count(config):,} parameters (d={config.n_embd}, "
        f"L={config.n_layer}, h={config.n_head}, V={config.vocab_size}), sequence "
        f"{args.seq_len}, batch {args.batch_size} per GPU, bf16 autocast, SDPA, fused AdamW, "
        f"torch.compile {'on' if args.compile else 'off'}. FLOPs per token "
        f"6N + 12LTd = {flops / 1e6:.0f} M. Command: `python benchmarks/gpt_gpu.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| step time, 1 GPU (median of {args.steps}) | {single['step_s'] * 1e3:.1f} ms |",
        f"| tokens/s, 1 GPU | {single['tokens_per_s']:,.0f} |",
        f"| MFU (peak {args.peak_tflops:g} TFLOP/s dense bf16) | {mfu:.1%} (goal >= 35%) |",
        f"| tokens/s, {multi['world']} GPUs DDP | {multi['tokens_per_s']:,.0f} |",
        f"| DDP scaling efficiency | {efficiency:.1%} (goal >= 90%) |",
        "",
        f"Memory of one eager step (batch {args.memory_batch_size} x {args.seq_len}), "
        "predicted by `memory.gpt_step_peak_bytes`:",
        "",
        "| component | predicted (MiB) | measured (MiB) |",
        "|---|---|---|",
        f"| weights + optimizer states | {(p['weights'] + p['optimizer']) / mib:,.1f} | "
        f"{mem['static_measured'] / mib:,.1f} (tensor bytes) |",
        f"| saved activations | {p['activations'] / mib:,.1f} | "
        + (f"{mem['activations_measured'] / mib:,.1f} (saved-tensor hooks) |"
           if "activations_measured" in mem else "- |"),
        f"| logits gradients (8 n V) | {p['logits_gradients'] / mib:,.1f} | - |",
    ]
    if "peak_measured" in mem:
        ratio = mem["peak_measured"] / p["total"]
        lines += [
            f"| peak of the step | {p['total'] / mib:,.1f} | {mem['peak_measured'] / mib:,.1f} "
            f"(`max_memory_allocated`; measured / predicted = {ratio:.3f}) |",
            f"| allocated before the step | | {mem['allocated_before_step'] / mib:,.1f} |",
        ]
    text = "\n".join(lines) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="markdown file to write (required unless --worker)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, end to end")
    parser.add_argument("--batch-size", type=int, default=None, help="per GPU (default 32)")
    parser.add_argument("--memory-batch-size", type=int, default=None, help="default 8")
    parser.add_argument("--seq-len", type=int, default=None, help="default 1024")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10)")
    parser.add_argument("--gpus", type=int, default=2, help="processes for the DDP run")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile", dest="compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of one GPU (H100/H200 SXM: 989)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.set_defaults(compile=None)
    args = parser.parse_args(argv)
    small = dict(batch_size=4, memory_batch_size=2, seq_len=64, steps=3, warmup=1)
    full = dict(batch_size=32, memory_batch_size=8, seq_len=1024, steps=50, warmup=10)
    for key, value in (small if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        worker(args)
        return 0
    if args.compile is None:
        args.compile = not args.smoke
    if not args.out:
        parser.error("--out is required")
    if not args.smoke:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on a CPU machine")
        if torch.cuda.device_count() < args.gpus:
            parser.error(f"--gpus {args.gpus} but only {torch.cuda.device_count()} GPU(s)")
    config = model_config(args.smoke)
    if args.seq_len > config.block_size:
        parser.error(f"--seq-len must be <= block_size={config.block_size}")
    single = run_worker(args, 1)
    multi = run_worker(args, args.gpus)
    device = torch.device("cpu" if args.smoke else "cuda")
    mem = measure_memory(args, device)
    print(write_report(args, single, multi, mem, config, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
