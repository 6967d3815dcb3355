"""Benchmark: one expert projection's decode-step matmul on the CPU, moepic's int4 path against
torch's own fused int4 and int8 CPU kernels (the ones torchao's CPU layouts call): is a library
kernel worth its constraints on the format, against the hand-written decode?

A script, not a test. Shapes: the bundled model's gate/up block (640 × 128), and Mixtral's
(28672 × 4096) with --large. Rows: moepic's decode to float32 then a float32 matmul (what
`QuantizedExpert` does on the CPU); dense bf16 and fp32 matmuls; `_weight_int4pack_mm_for_cpu`
(groups along the input dimension, scales and zeros in bf16, its own packing); `_weight_int8pack_mm`
(one scale per row). Medians of --repeats timings of --calls calls each, alternating.

Run:  python experiments/bench_int4_kernels.py [--large]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moepic.quant.groups import dequantize, quantize, unpack_nibbles


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="Mixtral's gate/up (28672 × 4096) instead of the bundled model's")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=None)
    args = parser.parse_args()
    N, K, g = (28672, 4096, 64) if args.large else (640, 128, 64)
    calls = args.calls or (20 if args.large else 2000)
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    x = torch.randn(1, K).bfloat16()
    q = quantize(w, bits=4, group=g, symmetric=True, scale_dtype=torch.float16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(q.values).to(torch.int32), 1)
    scales = q.scales.float().t().contiguous()
    scales_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).bfloat16()  # symmetric: zero 0
    w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    s8 = (torch.rand(N) * 1e-3).bfloat16()
    wb, wf = w.bfloat16(), w
    rows = {
        "moepic int4: decode to fp32 + fp32 mm": lambda: x.float() @ dequantize(q, torch.float32).t(),
        "dense bf16 mm": lambda: x @ wb.t(),
        "dense fp32 mm": lambda: x.float() @ wf.t(),
        "torch int4pack (fused, bf16 scales)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, scales_zeros),
        "torch int8pack (fused, a scale per row)": lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8),
    }
    for fn in rows.values():  # warm-up
        timed(fn, max(1, calls // 10))
    runs = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            runs[name].append(timed(fn, calls))
    ref = (x.float() @ dequantize(q, torch.float32).t())
    fused = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, scales_zeros).float()
    print(f"[1, {K}] @ [{K}, {N}] on {torch.get_num_threads()} threads, torch {torch.__version__}; µs per call, medians of {args.repeats}")
    base = statistics.median(runs["dense bf16 mm"])
    for name, times in runs.items():
        print(f"{name:<42} {statistics.median(times):>10.1f} µs  {statistics.median(times) / base:>6.2f}× dense bf16")
    print(f"int4pack vs moepic's decode: max |Δ| {float((fused - ref).abs().max()):.3g} of max |y| {float(ref.abs().max()):.3g} "
          "(bf16 scales and output)")


if __name__ == "__main__":
    main()
