"""QLoRA on a whole model slice, side by side with bf16 LoRA and bitsandbytes + PEFT, one run.

    python benchmarks/qlora_model_gpu.py --out benchmarks/qlora_model_gpu.md
    python benchmarks/qlora_model_gpu.py --smoke          # CPU, tiny sizes: checks the script

The model is pedaPEFT's GPT cut to 4 layers at LLaMA-8B width (d = 4096, 32 heads, MLP
16,384, vocabulary 32,000, B = 1), LoRA r = 16, α = 16 on q, k, v, o, fc and proj, bf16
everywhere. Four methods live in this one process and are timed one after another at each size:

    PEFT LoRA bf16 | pedaPEFT LoRA bf16 | bitsandbytes + PEFT QLoRA | pedaPEFT QLoRA

(plus "pedaPEFT QLoRA, unfused": the same model with ``fused_gemm.ENABLED = False``, the layer
as it was before the fused GEMM, for the memory comparison). A training step is forward,
cross-entropy on float32 logits, backward and fused AdamW; the decode-like forward is a
no-grad forward of T tokens. Eager timings are ``triton.testing.do_bench`` medians, which zero a
256 MB buffer (flushing the L2 cache) before every repetition, one method after another; with
``--interleave ROUNDS`` the methods of the layer and model sections, and a compiled step and
its eager step, take turns instead (``bench_interleaved``), so that a slow moment of the host
does not fall on one of them only (the shipped run uses it). Compiled timings use
``torch.compile`` (default mode, no CUDA graphs, static shapes, one compilation per T).
Memory: "static" = what the method's model and optimizer state hold between steps; "peak
above static" = the highest allocation during a step minus everything allocated before it.
"GPU busy" = the sum of the kernel times of one profiled step (torch.profiler): the step's GPU
work, which the host's speed does not change.

The crossover section times, per weight shape and row count M, the fused dequant-GEMM kernel
and dequantize + cuBLAS (forward ``x·Wᵀ`` and input gradient ``g·W``, LoRA term included), next
to a plain bf16 GEMM; the device's copy bandwidth and bf16 GEMM rate measured first are the
ceilings its achieved bandwidth and TFLOP/s are compared with.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pedaPEFT import fused_gemm, gpt, lora, qlora  # noqa: E402

TARGETS = ["q", "k", "v", "o", "fc", "proj"]
METHODS = ["peft_lora", "ours_lora", "bnb_qlora", "ours_qlora"]
LABELS = {"peft_lora": "PEFT LoRA bf16", "ours_lora": "pedaPEFT LoRA bf16",
          "bnb_qlora": "bitsandbytes + PEFT QLoRA", "ours_qlora": "pedaPEFT QLoRA",
          "ours_qlora_unfused": "pedaPEFT QLoRA, unfused (before)"}
ROWS: list[dict] = []
NOTES: list[str] = []
RESULTS: dict = {}
DEADLINE = [float("inf")]  # perf_counter time after which optional sections are skipped
INTERLEAVE = [0]  # interleaved rounds: layers, models, compiled vs eager (0: one at a time)


def row(section, metric, value, goal="", ok=None, unit=""):
    text = value if isinstance(value, str) else f"{value:.4g}{unit}"
    verdict = "" if ok is None else ("met" if ok else "MISSED")
    ROWS.append(dict(section=section, metric=metric, value=text, goal=goal, verdict=verdict))
    print(f"[{section}] {metric}: {text}  {goal} {verdict}", flush=True)


def bench(fn, rep_ms=300):
    """Median seconds per call; on CUDA with the L2 flushed before every repetition."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def bench_interleaved(fns, rounds):
    """Median seconds per call of each of ``fns`` (name -> function), the functions taking
    turns: round i calls every one once, in an order rotated by i, each after flushing the L2
    cache and timed alone with CUDA events. A slow moment of the host (another process, a
    clock change) then falls on every method alike instead of on whichever was being timed."""
    names = list(fns)
    for fn in fns.values():  # warm-up: kernels compiled and tuned, caches filled
        fn()
        fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if torch.cuda.is_available() \
        else None
    times = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            if flush is None:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
                continue
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1e-3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def time_each(fns, rep_ms=300):
    """Median seconds per call of each of ``fns`` (name -> function): in turns with
    ``--interleave`` (:func:`bench_interleaved`), otherwise one after another (:func:`bench`)."""
    if INTERLEAVE[0]:
        return bench_interleaved(fns, INTERLEAVE[0])
    return {name: bench(fn, rep_ms) for name, fn in fns.items()}


# --------------------------------------------------------------------------- ceilings


def ceilings(device, smoke):
    n = (1 << 20) if smoke else (512 << 20)
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 2 / bench(lambda src=src, dst=dst: dst.copy_(src))
    size = 256 if smoke else 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    gemm = 2 * size**3 / bench(lambda a=a, b=b: a @ b)
    row("ceilings", "device-to-device copy, bytes read + written (1 GiB bf16)", copy_bw / 1e12,
        unit=" TB/s")
    row("ceilings", f"bf16 GEMM {size}^3, random data", gemm / 1e12, unit=" TFLOP/s")
    del src, dst, a, b
    RESULTS["ceilings"] = {"copy_bytes_per_s": copy_bw, "gemm_flop_per_s": gemm}
    return copy_bw, gemm


# --------------------------------------------------------------------------- crossover


def crossover(device, copy_bw, gemm, smoke):
    shapes = [(256, 128)] if smoke else [(4096, 4096), (16384, 4096), (4096, 16384)]
    rows_list = [1, 4, 16, 64, 128] if smoke else [1, 4, 16, 64, 128, 256, 512, 2048]
    r, s = 16, 1.0
    table = []
    for N, K in shapes:
        torch.manual_seed(0)
        weight = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
        base = qlora.QuantLinear.from_weight(weight, compute_dtype=torch.bfloat16)
        stored = base.stored_tensors()
        dense = base.dequantize(torch.bfloat16)
        bias = torch.randn(N, device=device, dtype=torch.bfloat16)
        quant_bytes = base.weight_bytes()
        for M in rows_list:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            g = torch.randn(M, N, device=device, dtype=torch.bfloat16)
            xa = torch.randn(M, r, device=device, dtype=torch.bfloat16)
            lora_b = torch.randn(N, r, device=device, dtype=torch.bfloat16)
            lora_a = torch.randn(r, K, device=device, dtype=torch.bfloat16)
            args_f = (stored, N, K, 64, 256, False, bias, xa, lora_b, s)
            args_b = (stored, N, K, 64, 256, True, None, xa, lora_a, s)
            entry = {"N": N, "K": K, "M": M}
            for direction, a, args, dense_fn in (
                ("forward", x, args_f, lambda x=x, w=dense, b=bias: F.linear(x, w, b)),
                ("input_grad", g, args_b, lambda g=g, w=dense: g @ w),
            ):
                can_fuse = fused_gemm.fused_supported(a, N, K, 64)
                t_fused = (bench(lambda a=a, args=args: fused_gemm._launch(a, *args), 100)
                           if can_fuse else float("nan"))
                t_deq = bench(lambda a=a, args=args: fused_gemm._dequantize_then_matmul(a, *args),
                              100)
                t_bf16 = bench(dense_fn, 100)
                flops = 2 * M * N * K
                moved = quant_bytes + 2 * a.numel() + 2 * M * (K if direction == "input_grad"
                                                               else N)
                entry[direction] = {"fused_s": t_fused, "dequant_cublas_s": t_deq,
                                    "bf16_gemm_s": t_bf16,
                                    "fused_bytes_per_s": moved / t_fused,
                                    "fused_flop_per_s": flops / t_fused,
                                    "bf16_flop_per_s": flops / t_bf16}
                print(f"  {direction} N={N} K={K} M={M}: fused {t_fused * 1e6:.1f} us "
                      f"({moved / t_fused / 1e12:.2f} TB/s, {flops / t_fused / 1e12:.0f} "
                      f"TFLOP/s), dequant+cuBLAS {t_deq * 1e6:.1f} us, bf16 GEMM "
                      f"{t_bf16 * 1e6:.1f} us", flush=True)
            table.append(entry)
        del weight, base, dense
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    RESULTS["crossover"] = table
    for direction in ("forward", "input_grad"):
        wins = [M for M in rows_list
                if all(e[direction]["fused_s"] <= e[direction]["dequant_cublas_s"]
                       for e in table if e["M"] == M)]
        limit = 0
        for M in rows_list:  # the largest M up to which the fused kernel wins on every shape
            if M not in wins:
                break
            limit = M
        fused_gemm.FUSED_MAX_ROWS[direction] = limit
        row("crossover", f"{direction}: fused kernel used up to M = (set for the model section "
            "below)", str(limit))
    RESULTS["fused_max_rows"] = dict(fused_gemm.FUSED_MAX_ROWS)
    for direction in ("forward", "input_grad"):
        for N, K in shapes:
            entries = [e for e in table if (e["N"], e["K"]) == (N, K)]
            slower = [e["M"] for e in entries
                      if not e[direction]["fused_s"] <= e[direction]["dequant_cublas_s"]]
            first = min(slower) if slower else None
            row("crossover", f"{direction} W {N}x{K}: smallest M where dequantize + cuBLAS "
                "beats the fused kernel",
                f"none up to {max(rows_list)}" if first is None else str(first))
            small = [e for e in entries if e["M"] <= 64]
            for e in small:
                d = e[direction]
                row("kernel", f"{direction} W {N}x{K}, M={e['M']}: fused {d['fused_s'] * 1e6:.1f}"
                    f" us vs bf16 GEMM {d['bf16_gemm_s'] * 1e6:.1f} us; achieved / copy "
                    "bandwidth", d["fused_bytes_per_s"] / copy_bw)
            big = max(entries, key=lambda e: e["M"])[direction]
            row("kernel", f"{direction} W {N}x{K}, M={max(e['M'] for e in entries)}: fused / bf16"
                " GEMM TFLOP/s over the GEMM ceiling", f"{big['fused_flop_per_s'] / gemm:.3f} / "
                f"{big['bf16_flop_per_s'] / gemm:.3f}")


# --------------------------------------------------------------------------- layers


def bnb_linear4bit(bnb, linear, device):
    """bitsandbytes' ``Linear4bit`` (NF4, double quantization, blocksize 64, bf16 compute)
    holding ``linear``'s weight and bias, on ``device``."""
    l4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                           compute_dtype=torch.bfloat16, compress_statistics=True,
                           quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False,
                                  compress_statistics=True, quant_type="nf4", blocksize=64)
    l4.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return l4.to(device)


class _One(nn.Module):
    """A model holding one linear layer named ``q``, for PEFT to wrap."""

    def __init__(self, layer):
        super().__init__()
        self.q = layer

    def forward(self, x):
        return self.q(x)


def layers(device, bnb, peft, rows_list, smoke):
    """No-grad forward of one layer at small T: PEFT LoRA bf16, pedaPEFT LoRA bf16,
    bitsandbytes + PEFT QLoRA and pedaPEFT QLoRA, eager (L2 flushed), then graph replay."""
    shapes = [(256, 128)] if smoke else [(4096, 4096), (16384, 4096), (4096, 16384)]
    r = 16
    found = {}
    for N, K in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(K, N, device=device, dtype=torch.bfloat16)
        made = {}
        made["peft_lora"] = peft.get_peft_model(
            _One(nn.Linear(K, N, device=device, dtype=torch.bfloat16)),
            peft.LoraConfig(r=r, lora_alpha=r, target_modules=["q"]),
            autocast_adapter_dtype=False).base_model.model.q
        made["ours_lora"] = lora.LoRALinear(nn.Linear(K, N, device=device, dtype=torch.bfloat16),
                                            r=r, alpha=r)
        if bnb is not None:
            made["bnb_qlora"] = peft.get_peft_model(
                _One(bnb_linear4bit(bnb, dense, device)),
                peft.LoraConfig(r=r, lora_alpha=r, target_modules=["q"]),
                autocast_adapter_dtype=False).base_model.model.q
        made["ours_qlora"] = qlora.QLoRALinear(
            qlora.QuantLinear.from_linear(dense, compute_dtype=torch.bfloat16), r=r, alpha=r)
        for layer in made.values():
            layer.to(device)
            for p in layer.parameters():
                if p.dtype.is_floating_point and p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        for T in rows_list:
            x = torch.randn(1, T, K, device=device, dtype=torch.bfloat16)

            def forward(layer=None, x=x):
                with torch.no_grad():
                    return layer(x)

            times = time_each({m: lambda layer=layer: forward(layer)
                               for m, layer in made.items()})
            found[(N, K, T)] = times
            ref = times["peft_lora"]
            row(f"layer {N}x{K} T={T}", "no-grad forward, eager: " + " / ".join(
                f"{LABELS[m]} {t * 1e6:.1f} us" for m, t in times.items()), "")
            ratio = times["ours_qlora"] / ref
            row(f"layer {N}x{K} T={T}", "pedaPEFT QLoRA / PEFT LoRA bf16 layer forward, eager",
                ratio, "<= 0.6", ratio <= 0.6)
            if torch.cuda.is_available():
                import triton.testing

                replay = {}
                for m in ("peft_lora", "ours_qlora"):
                    try:
                        replay[m] = triton.testing.do_bench_cudagraph(
                            lambda layer=made[m]: forward(layer), rep=50,
                            return_mode="median") * 1e-3
                    except Exception:
                        NOTES.append(f"graph capture of the {LABELS[m]} layer failed: "
                                     + traceback.format_exc().splitlines()[-1])
                if len(replay) == 2:
                    row(f"layer {N}x{K} T={T}, graph replay (GPU time, L2 not flushed)",
                        "pedaPEFT QLoRA / PEFT LoRA bf16 layer forward "
                        f"({replay['ours_qlora'] * 1e6:.1f} / {replay['peft_lora'] * 1e6:.1f} us)",
                        replay["ours_qlora"] / replay["peft_lora"])
        del made, dense
        empty_cache()
    RESULTS["layers"] = {f"{N}x{K} T={T}": v for (N, K, T), v in found.items()}


# --------------------------------------------------------------------------- models


def model_config(smoke, n_layer):
    if smoke:
        return gpt.GPTConfig(vocab_size=320, block_size=128, n_layer=2, n_head=4, n_embd=128)
    return gpt.GPTConfig(vocab_size=32000, block_size=8192, n_layer=n_layer, n_head=32,
                         n_embd=4096)


class _Tokens(nn.Module):
    """PEFT's wrapper forwards keyword arguments; this keeps a positional call for every model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)


def build(method, config, device, bnb, peft):
    torch.manual_seed(0)
    model = gpt.GPT(config).to(device=device, dtype=torch.bfloat16)
    cfg = lora.LoRAConfig(r=16, alpha=16, target_modules=tuple(TARGETS))
    if method == "ours_lora":
        lora.apply_lora(model, cfg)
    elif method.startswith("ours_qlora"):
        qlora.quantize_model(model, cfg, compute_dtype=torch.bfloat16)
    elif method == "bnb_qlora":
        for name, module in list(model.named_modules()):
            if name.split(".")[-1] in TARGETS and isinstance(module, nn.Linear):
                model.set_submodule(name, bnb_linear4bit(bnb, module, device))
                del module
    if method in ("peft_lora", "bnb_qlora"):
        model = peft.get_peft_model(
            _Tokens(model), peft.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS),
            autocast_adapter_dtype=False)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.bfloat16:
            raise RuntimeError(f"{method}: trainable parameter of dtype {p.dtype}")
    return model


class Run:
    """One method's model, optimizer and step; ``unfused`` flips the QLoRA dispatch for it."""

    def __init__(self, method, config, device, bnb, peft):
        gc.collect()
        empty_cache()
        before = allocated()
        self.method = method
        self.model = build(method, config, device, bnb, peft)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5,
                                           fused=torch.cuda.is_available())
        self.vocab = config.vocab_size
        self.model_bytes = allocated() - before
        self.compiled = None
        idx = torch.randint(0, self.vocab, (1, 16), device=device)
        self.step(idx)  # optimizer state allocated: static memory is now complete
        self.optimizer.zero_grad(set_to_none=True)
        self.static_bytes = allocated() - before

    def step(self, idx, model=None):
        fused_gemm.ENABLED = self.method != "ours_qlora_unfused"
        try:
            logits = (self.model if model is None else model)(idx)
            loss = F.cross_entropy(logits.float().view(-1, self.vocab), idx.view(-1))
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            fused_gemm.ENABLED = True

    @torch.no_grad()
    def forward(self, idx, model=None):
        fused_gemm.ENABLED = self.method != "ours_qlora_unfused"
        try:
            return (self.model if model is None else model)(idx)
        finally:
            fused_gemm.ENABLED = True


def allocated():
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_above(fn):
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def gpu_busy(fn):
    """Seconds the GPU spends in kernels during one call of ``fn`` (profiler, after warm-up):
    the eager step time minus this is time the GPU waited for the host."""
    if not torch.cuda.is_available():
        return 0.0
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) * 1e-6


def models(device, config, bnb, peft, train_T, decode_T, compile_T, methods):
    gib = 2**30
    if bnb is None and "bnb_qlora" in methods:
        methods = [m for m in methods if m != "bnb_qlora"]
        NOTES.append("bitsandbytes is not installed: its column is missing")
    runs = {m: Run(m, config, device, bnb, peft) for m in methods}
    for m, run in runs.items():
        row("memory", f"{LABELS[m]}: model / model + AdamW state (static)",
            f"{run.model_bytes / gib:.3f} / {run.static_bytes / gib:.3f} GiB")
    largest = 2 * max(m.in_features * m.out_features for run in runs.values()
                      for m in run.model.modules() if isinstance(m, qlora.QuantLinear))
    RESULTS["largest_dense_layer_bytes"] = largest
    measured = {}
    for T in train_T:
        idx = torch.randint(0, config.vocab_size, (1, T), device=device)
        peaks, busy = {}, {}
        for m, run in runs.items():
            if m == "ours_qlora_unfused" and T not in (train_T[0], 2048):
                continue
            try:
                peaks[m] = peak_above(lambda run=run, idx=idx: run.step(idx))
                busy[m] = gpu_busy(lambda run=run, idx=idx: run.step(idx))
            except torch.OutOfMemoryError:
                NOTES.append(f"T={T}: {LABELS[m]} ran out of memory")
                empty_cache()
        times = time_each({m: lambda run=runs[m], idx=idx: run.step(idx) for m in peaks},
                          rep_ms=1500)
        measured[T] = {"step_s": times, "peak_above_static": peaks, "gpu_busy_s": busy}
        ref = times.get("peft_lora")
        for m, t in times.items():
            row(f"train T={T}", f"{LABELS[m]}: step time, tokens/s, peak above static",
                f"{t * 1e3:.2f} ms ({t / ref:.3f}), {T / t:,.0f} tok/s, "
                f"{peaks[m] / gib:.3f} GiB")
        for m, t in busy.items():
            row(f"train T={T}", f"{LABELS[m]}: GPU busy per step (sum of kernel times, one "
                "profiled step) / eager step time", f"{t * 1e3:.2f} ms / {times[m] * 1e3:.2f} ms "
                f"({t / times[m]:.2f})")
        if "ours_qlora" in times:
            q = times["ours_qlora"]
            for base in ("peft_lora", "ours_lora"):
                goal = {512: 1.10, 2048: 1.05}.get(T)
                ratio = q / times[base]
                row(f"train T={T}", f"pedaPEFT QLoRA / {LABELS[base]}, eager", ratio,
                    f"<= {goal}" if goal else "", ratio <= goal if goal else None)
            if "bnb_qlora" in times:
                speed = times["bnb_qlora"] / q
                row(f"train T={T}", "tokens/s, pedaPEFT QLoRA / bitsandbytes + PEFT QLoRA",
                    speed, ">= 1.25 (25 % faster)" if T <= 2048 else "",
                    speed >= 1.25 if T <= 2048 else None)
            if "ours_qlora_unfused" in peaks:
                shrink = peaks["ours_qlora_unfused"] - peaks["ours_qlora"]
                row(f"train T={T}", "peak above static: unfused (before) minus fused (now)",
                    f"{shrink / 2**20:.1f} MiB", f">= {largest / 2**20:.0f} MiB (largest dense "
                    "layer, bf16)", shrink >= largest)
                row(f"train T={T}", "step time, fused / unfused QLoRA",
                    q / times["ours_qlora_unfused"])
        del idx
    RESULTS["train"] = measured
    decode = {}
    for T in decode_T:
        idx = torch.randint(0, config.vocab_size, (1, T), device=device)
        times = time_each({m: lambda run=run, idx=idx: run.forward(idx)
                           for m, run in runs.items()})
        decode[T] = times
        ref = times["peft_lora"]
        for m, t in times.items():
            row(f"decode T={T}", f"{LABELS[m]}: forward", f"{t * 1e3:.3f} ms ({t / ref:.3f})")
        for base in ("peft_lora", "ours_lora"):
            ratio = times["ours_qlora"] / times[base]
            row(f"decode T={T}", f"forward, pedaPEFT QLoRA / {LABELS[base]}", ratio, "<= 0.6",
                ratio <= 0.6)
    RESULTS["decode"] = decode
    if torch.cuda.is_available():
        import triton.testing

        replay = {}
        for T in decode_T:
            idx = torch.randint(0, config.vocab_size, (1, T), device=device)
            for m in ("peft_lora", "ours_lora", "ours_qlora"):
                try:
                    replay[(m, T)] = triton.testing.do_bench_cudagraph(
                        lambda run=runs[m], idx=idx: run.forward(idx), rep=100,
                        return_mode="median") * 1e-3
                except Exception:
                    NOTES.append(f"graph capture of the {LABELS[m]} forward failed: "
                                 + traceback.format_exc().splitlines()[-1])
            if ("ours_qlora", T) in replay and ("peft_lora", T) in replay:
                q = replay[("ours_qlora", T)]
                row(f"decode T={T}, graph replay (GPU time, L2 not flushed)",
                    "forward: PEFT LoRA bf16 / pedaPEFT LoRA bf16 / pedaPEFT QLoRA",
                    f"{replay[('peft_lora', T)] * 1e3:.3f} / "
                    f"{replay.get(('ours_lora', T), float('nan')) * 1e3:.3f} / {q * 1e3:.3f} ms")
                row(f"decode T={T}, graph replay (GPU time, L2 not flushed)",
                    "pedaPEFT QLoRA / PEFT LoRA bf16", q / replay[("peft_lora", T)])
        RESULTS["decode_graph_replay"] = {f"{m} T={T}": v for (m, T), v in replay.items()}
    compiled = {}
    for T in compile_T:
        idx = torch.randint(0, config.vocab_size, (1, T), device=device)
        for m in [m for m in ("ours_qlora", "ours_lora") if m in runs]:
            # one static-shape compilation per sequence length, as a training run at a fixed
            # length uses (a second length would otherwise recompile with dynamic shapes)
            torch._dynamo.reset()
            runs[m].compiled = torch.compile(runs[m].model, dynamic=False)
            if time.perf_counter() > DEADLINE[0]:
                NOTES.append(f"compile of {LABELS[m]} at T={T} skipped: the run's time budget "
                             "was spent")
                continue
            run = runs[m]
            start = time.perf_counter()
            try:
                run.step(idx, run.compiled)
            except Exception:
                NOTES.append(f"compile of {LABELS[m]} at T={T} failed: "
                             + traceback.format_exc().splitlines()[-1])
                continue
            took = time.perf_counter() - start
            timed = time_each({"compiled": lambda run=run, idx=idx: run.step(idx, run.compiled),
                               "eager": lambda run=run, idx=idx: run.step(idx)}, rep_ms=1500)
            t_c, t_e = timed["compiled"], timed["eager"]
            compiled[(m, T)] = (t_c, t_e)
            goal = "<= 0.85" if m == "ours_qlora" else ""
            row(f"compile T={T}", f"{LABELS[m]}: compiled / eager step ({t_c * 1e3:.2f} / "
                f"{t_e * 1e3:.2f} ms; first compiled step {took:.0f} s)", t_c / t_e, goal,
                t_c / t_e <= 0.85 if goal else None)
    RESULTS["compile"] = {f"{m} T={T}": v for (m, T), v in compiled.items()}


# --------------------------------------------------------------------------- output


def write_markdown(path, header):
    lines = [header, "", "| section | metric | measured | goal | verdict |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['section']} | {r['metric']} | {r['value']} | {r['goal']} | {r['verdict']} |"
              for r in ROWS]
    if NOTES:
        lines += ["", "Notes from the run:", ""] + [f"- {n}" for n in NOTES]
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/qlora_model_gpu.md")
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default="crossover,layers,models")
    parser.add_argument("--train-T", default="512,2048,8192")
    parser.add_argument("--decode-T", default="1,16,64")
    parser.add_argument("--compile-T", default="512,2048")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS + ["ours_qlora_unfused"]))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no compilation after this many seconds")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="time the layer and model sections' methods, and compiled "
                             "against eager, in turns, ROUNDS calls each (0: each alone, with "
                             "do_bench)")
    args = parser.parse_args(argv)
    DEADLINE[0] = time.perf_counter() + args.budget_s
    INTERLEAVE[0] = args.interleave
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    import peft

    ints = lambda text: [int(t) for t in text.split(",") if t]  # noqa: E731
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)"
    header = (
        f"# QLoRA on a 4-layer LLaMA-8B-width slice, GPU benchmark\n\nRun "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} on {name}; torch "
        f"{torch.__version__}, bitsandbytes {getattr(bnb, '__version__', 'absent')}, peft "
        f"{peft.__version__}. Command: `python benchmarks/qlora_model_gpu.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`."
    )
    copy_bw, gemm = ceilings(device, smoke)
    sections = {
        "crossover": lambda: crossover(device, copy_bw, gemm, smoke),
        "layers": lambda: layers(device, bnb, peft, ints(args.decode_T), smoke),
        "models": lambda: models(device, model_config(smoke, args.layers), bnb, peft,
                                 [t for t in ints(args.train_T) if t <= 64] or [32] if smoke
                                 else ints(args.train_T), ints(args.decode_T), ints(args.compile_T)
                                 if not smoke else [], args.methods.split(",")),
    }
    for key in args.only.split(","):
        try:
            sections[key]()
        except Exception:
            NOTES.append(f"section {key} failed: " + traceback.format_exc().splitlines()[-1])
            traceback.print_exc()
        write_markdown(args.out, header)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(rows=ROWS, notes=NOTES,
                                                       results=RESULTS), indent=1, default=str))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
