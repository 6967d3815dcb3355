"""Measure the host side of a hardware profile: the CPU as a place to run experts. Side effects:
allocations, thread settings (restored), timing.

Decode on the host is a GEMV per projection that streams every weight once, so the expert rate is
measured on experts that together are larger than any CPU cache, cycled so no call finds its
weights cached, and reported as weight bytes per second: dense bf16 and fp32 experts, and
int4-fused ones through torch's fused int4 kernel (their stored bytes) where this torch has it. The hand-off cost per call is the time of
a tiny expert; the DRAM bandwidth a large copy (read + write traffic, as the DRAM sees it). The
result latency (a D-vector handed to the device) needs a device and is measured only on CUDA.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date
from itertools import cycle
from pathlib import Path

import torch

from moepic.core.ffn import swiglu
from moepic.core.packing import packed_bytes
from moepic.core.spec import SILU
from moepic.core.weights import SwiGLUWeights
from moepic.perfmodel.hardware import HostProfile
from moepic.quant import QuantizedExpert, build_format
from moepic.quant.int4_tiles import kernel_layout
from moepic.runtime.timing import median_s

CPU = torch.device("cpu")

MiB = 2**20


def physical_cores() -> int:
    """The machine's physical cores (hyperthread siblings counted once); the logical CPU count
    where /proc/cpuinfo does not tell."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    cores, socket_id = set(), None
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "physical id":
            socket_id = value
        elif key == "core id":
            cores.add((socket_id, value))
    return len(cores) or os.cpu_count() or 1


def default_host_threads() -> int:
    """The physical cores left after the main thread (which drives the device)."""
    return max(1, physical_cores() - 1)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _experts(D: int, F: int, dtype: torch.dtype, count: int) -> list[SwiGLUWeights]:
    # Values in a normal range: denormals or NaNs from uninitialised memory would slow some CPUs.
    return [SwiGLUWeights.from_projections(*(torch.empty(n, m, dtype=dtype).normal_(0, 0.02) for n, m in ((F, D), (F, D), (D, F))))
            for _ in range(count)]


def _int4_fused_experts(D: int, F: int, count: int) -> list[QuantizedExpert]:
    """int4-fused experts of random codes and small scales (encoding real weights would take
    seconds and times the same kernel)."""
    fmt, block = build_format("int4-fused"), 64

    def part(p) -> torch.Tensor:
        shape = (F // block, *p.per_block)
        if p.dtype == torch.uint8:
            return torch.randint(0, 256, shape, dtype=torch.uint8)
        return torch.empty(shape, dtype=p.dtype).uniform_(1e-3, 2e-3)

    return [QuantizedExpert(fmt, tuple(part(p) for p in fmt.parts(D, block, torch.bfloat16, False)), block, D,
                            torch.bfloat16, SILU) for _ in range(count)]


def expert_gbps(dtype: torch.dtype, *, working_set: int, repeats: int, overhead_s: float, int4_fused: bool = False) -> float:
    """Expert bytes per second through `swiglu` at one token, cycling over experts that together
    fill `working_set` bytes (so each call streams its weights from DRAM): dense weights of
    `dtype`, or (`int4_fused`) int4-fused experts' stored bytes through the fused kernel."""
    D, F = 1024, 2816
    expert_bytes = 3 * D * F * dtype.itemsize if not int4_fused else packed_bytes(_int4_fused_experts(D, 64, 1)[0], F)
    count = max(2, -(-working_set // expert_bytes))
    experts = _int4_fused_experts(D, F, count) if int4_fused else _experts(D, F, dtype, count)
    x_1D, order = torch.randn(1, D, dtype=dtype), cycle(experts)
    seconds = median_s(lambda: [swiglu(x_1D, next(order)) for _ in experts], CPU, repeats)
    return len(experts) * expert_bytes / max(seconds - len(experts) * overhead_s, 1e-9) / 1e9


def matmul_gflops(dtype: torch.dtype, *, tokens: int, repeats: int) -> float:
    """Flops per second through `swiglu` for a prompt of `tokens` tokens (a GEMM, compute-bound)."""
    D, F = 1024, 2816
    expert = _experts(D, F, dtype, 1)[0]
    x_TD = torch.randn(tokens, D, dtype=dtype)
    return 2 * 3 * D * F * tokens / median_s(lambda: swiglu(x_TD, expert), CPU, repeats) / 1e9


def call_overhead_s(repeats: int) -> float:
    """A tiny expert handed to a worker thread and its result taken back, as the engine's host pool
    (runtime/host_compute.py: one FIFO worker) hands each job over: what one call costs beyond its
    bytes (the hand-off, waking the threads, joining)."""
    w = _experts(64, 64, torch.float32, 1)[0]
    x_1D = torch.randn(1, 64)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepic-measure") as worker:
        return median_s(lambda: worker.submit(swiglu, x_1D, w).result(), CPU, repeats)


def memory_gbps(nbytes: int, repeats: int) -> float:
    """One large copy: read + write traffic per second."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    return 2 * nbytes / median_s(lambda: dst.copy_(src), CPU, repeats) / 1e9


def result_latency_us(device: torch.device, hidden: int, repeats: int) -> float:
    """A D-vector (bf16) from pinned host memory to `device`, waited for: the latency of handing a
    host-computed result back."""
    src = torch.zeros(hidden, dtype=torch.bfloat16, pin_memory=True)
    dst = torch.empty(hidden, dtype=torch.bfloat16, device=device)

    return median_s(lambda: dst.copy_(src, non_blocking=True), device, repeats) * 1e6  # median_s waits for the device


def measure_host(
    device: torch.device, *, quick: bool, threads: int | None, name: str, working_set: int | None = None,
    int4: bool = True,
) -> HostProfile:
    """The host profile of this machine, its expert rates on `threads` threads (default: the
    physical cores less one); the memory bandwidth with every physical core. `working_set`: the
    bytes of experts cycled through and of the memory copy (default 96 MiB quick, 512 MiB
    otherwise); a smaller one measures sooner (a run pricing its own placement at start-up) but
    lets more of the weights come from the CPU's caches. `int4`: measure int4-fused experts' rate
    too (`moepic profile` does; a run's start-up only where its experts are int4-fused)."""
    cores = physical_cores()
    threads = threads or default_host_threads()
    repeats = 5 if quick else 15
    working_set = working_set or (96 if quick else 512) * MiB
    with torch_threads(threads):
        overhead = call_overhead_s(repeats * 8)
        fp32 = expert_gbps(torch.float32, working_set=working_set, repeats=repeats, overhead_s=overhead)
        bf16 = expert_gbps(torch.bfloat16, working_set=working_set, repeats=repeats, overhead_s=overhead)
        # int4-fused experts' rate where this torch has the fused kernel (None: they are not priced),
        # unless the caller prices another format (a run's start-up measures only what it uses).
        int4_gbps = (expert_gbps(torch.bfloat16, working_set=working_set, repeats=repeats, overhead_s=overhead, int4_fused=True)
                     if int4 and kernel_layout() is not None else None)
        gflops = matmul_gflops(torch.float32, tokens=256, repeats=repeats)
    with torch_threads(cores):
        dram = memory_gbps(min(working_set, (64 if quick else 256) * MiB), repeats)
    latency = result_latency_us(device, 4096, repeats * 8) if device.type == "cuda" else None
    note = "" if latency is not None else "; result latency not measured (no CUDA device here)"
    where = f"{socket.gethostname()}, {threads} of {cores} physical cores, {date.today().isoformat()}"
    return HostProfile(
        name=name, source=f"measured by moepic profile on {where}{note}", bf16_expert_gbps=bf16, fp32_expert_gbps=fp32,
        call_overhead_us=overhead * 1e6, memory_gbps=dram, physical_cores=cores, result_latency_us=latency,
        matmul_gflops=gflops, int4_expert_gbps=int4_gbps,
    )
