"""Measure a hardware profile on this machine. Side effects: allocations, copies, timing.

Each rate is timed on the code path the engine uses: host→device copies through the copy engine
(pinned on CUDA; on a CPU the "device" is host memory, or an emulated link), experts through the
core's `swiglu`. Launch overheads are fitted last: the expert overhead from a tiny expert, and the
per-layer overhead so that the latency model reproduces a measured dense decode of a real model
(the bundled one by default), which anchors the profile to end-to-end time. The host side (the CPU
as a place to run experts: moepic/runtime/host_measure.py) is measured on the host's threads.
"""

from __future__ import annotations

import socket
import statistics
from collections.abc import Callable
from datetime import date

import attrs
import torch

from moepic.core.ffn import swiglu
from moepic.core.weights import SwiGLUWeights
from moepic.perfmodel.hardware import HardwareProfile
from moepic.runtime.copy_engine import Link, copy_engine_for
from moepic.runtime.host_measure import measure_host
from moepic.runtime.timing import median_s

MiB = 2**20


def _host(nbytes: int, device: torch.device, pinned: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")


def copy_rates(device: torch.device, nbytes: int, repeats: int, link: Link | None) -> dict[str, float]:
    """link_gbps and link_latency_us through the copy engine; device_copy_gbps; pageable_link_gbps on CUDA."""
    engine = copy_engine_for(device, link)
    try:
        src, dst = _host(nbytes, device, True), torch.empty(nbytes, dtype=torch.uint8, device=device)
        big = median_s(lambda: engine.wait(engine.submit([(dst, src)], urgent=True)), device, repeats)
        small_src, small_dst = src[:4096], dst[:4096]
        small = median_s(lambda: engine.wait(engine.submit([(small_dst, small_src)], urgent=True)), device, repeats * 8)
    finally:
        engine.close()
    link_gbps = nbytes / big / 1e9
    out = {"link_gbps": link_gbps, "link_latency_us": max(0.0, small - 4096 / (link_gbps * 1e9)) * 1e6}
    other = torch.empty_like(dst)
    out["device_copy_gbps"] = nbytes / median_s(lambda: other.copy_(dst), device, repeats) / 1e9
    if device.type == "cuda":
        pageable = _host(nbytes, device, False)
        out["pageable_link_gbps"] = nbytes / median_s(lambda: dst.copy_(pageable), device, repeats) / 1e9
    return out


def _expert(D: int, F: int, dtype: torch.dtype, device: torch.device) -> SwiGLUWeights:
    w = SwiGLUWeights.from_projections(
        torch.randn(F, D, dtype=dtype), torch.randn(F, D, dtype=dtype), torch.randn(D, F, dtype=dtype) / F**0.5
    )
    return w.to(device)


def expert_time_s(D: int, F: int, tokens: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    w, x_TD = _expert(D, F, dtype, device), torch.randn(tokens, D, dtype=dtype, device=device)
    return median_s(lambda: swiglu(x_TD, w), device, repeats)


def compute_rates(device: torch.device, dtype: torch.dtype, repeats: int, quick: bool) -> dict[str, float]:
    """expert_overhead_us (a tiny expert), memory_gbps (a large one, one token), matmul_tflops (many tokens)."""
    size = dtype.itemsize
    overhead = expert_time_s(64, 64, 1, dtype, device, repeats * 4)
    D, F = (1024, 2816) if quick else (2048, 5632)
    one_token = expert_time_s(D, F, 1, dtype, device, repeats)
    memory_gbps = 3 * D * F * size / max(one_token - overhead, 1e-9) / 1e9
    Dm, Fm, T = (512, 1024, 256) if quick else (1024, 2816, 512)
    many = expert_time_s(Dm, Fm, T, dtype, device, repeats)
    tflops = 6 * Dm * Fm * T / max(many - overhead, 1e-9) / 1e12
    return {"expert_overhead_us": overhead * 1e6, "memory_gbps": memory_gbps, "matmul_tflops": tflops}


def dense_decode_s(model_folder: str, dtype: torch.dtype, device: torch.device, tokens: int) -> tuple[object, float]:
    """(the model's spec, its all-resident decode time per token), greedy from a fixed prompt."""
    from moepic.checkpoint.load import load_model
    from moepic.runtime.generation import generate

    model = load_model(model_folder, dtype=dtype, device=str(device))
    generate(model, [1, 2, 3, 4], max_new_tokens=4)  # warm-up
    runs = [generate(model, list(range(1, 33)), max_new_tokens=tokens).stats.decode_s_per_token for _ in range(3)]
    return model.spec, statistics.median(runs)


def measure_profile(
    *, device: str, model_folder: str, dtype: torch.dtype, quick: bool = False, link: Link | None = None,
    name: str | None = None, progress: Callable[[str], None] = lambda step: None, engine: bool = True,
    host_threads: int | None = None,
) -> HardwareProfile:
    """Every rate of a profile, its host section measured on `host_threads` threads (default: the
    physical cores less one); with `engine`, also the offloading engine's host work (engine runs
    of the calibration model, ~30 s)."""
    from moepic.perfmodel.latency import model_times

    dev = torch.device(device)
    repeats = 5 if quick else 15
    progress("host→device and device copies")
    copies = copy_rates(dev, (16 if quick else 128) * MiB, repeats, link)
    progress("expert compute")
    compute = compute_rates(dev, dtype, repeats, quick)
    progress("dense decode of the calibration model")
    spec, decode_s = dense_decode_s(model_folder, dtype, dev, 16 if quick else 48)
    progress("host CPU: expert GEMVs, hand-off, memory")
    name = name or f"measured-{dev.type}"
    host = measure_host(dev, quick=quick, threads=host_threads, name=f"{name}-host")
    where = f"{socket.gethostname()} ({dev.type}{', emulated link' if link else ''}), {date.today().isoformat()}"
    profile = HardwareProfile(
        name=name, source=f"measured by moepic profile on {where}", device=dev.type,
        layer_overhead_us=0.0, host=host, **copies, **compute,
    )
    # The per-layer overhead that makes the model's all-resident decode time come out as measured.
    times = model_times(profile, spec, dtype_bytes=dtype.itemsize, context_tokens=48)
    k, moe_layers = spec.moe.top_k, len(spec.moe_layers)
    unexplained = decode_s - times.rest_s - moe_layers * (times.layer_s + k * times.expert_s)
    profile = attrs.evolve(profile, layer_overhead_us=max(0.0, unexplained / max(1, spec.num_layers)) * 1e6)
    if not engine:
        return profile
    progress("offloading engine's host work")
    return engine_overheads(profile, model_folder, dtype, dev, link, tokens=16 if quick else 48, repeats=1 if quick else 5)


# Engine runs to fit the engine's host work on: (budget, θ), LRU, no prediction. Whole and split
# experts, more and fewer loads, so that per-step and per-load costs can be told apart.
CALIBRATION_RUNS = ((0.5, 1.0), (0.25, 1.0), (0.25, 0.5), (0.5, 0.5))


def engine_overheads(
    profile: HardwareProfile, model_folder: str, dtype: torch.dtype, device: torch.device, link: Link | None, *,
    tokens: int, repeats: int,
) -> HardwareProfile:
    """`profile` with `offload_step_us` and `load_us` fitted (least squares, ≥ 0) so that the
    simulator reproduces the offloading engine's measured decode time on the calibration model."""
    from moepic.checkpoint.load import load_model
    from moepic.policies.lru import LRUConfig, LRUPolicy
    from moepic.perfmodel.latency import model_times
    from moepic.runtime.generation import generate
    from moepic.runtime.offload import offloaded_experts
    from moepic.sim.calibrate import MeasuredRun, fit_engine_overheads
    from moepic.tracing.recorder import RoutingRecorder

    model = load_model(model_folder, dtype=dtype, device=str(device), offload_experts=True)
    prompt = list(range(1, 33))
    recorder = RoutingRecorder(model.spec)
    generate(model, prompt, max_new_tokens=tokens, eos_ids=(), tap=recorder)
    trace = recorder.trace()
    times = model_times(profile, model.spec, dtype_bytes=dtype.itemsize, context_tokens=len(prompt) + tokens // 2)
    # Rounds over all runs, alternating their order, so that drift lands on every run alike.
    measured = {run: [] for run in CALIBRATION_RUNS}
    layouts = {}
    for round_ in range(repeats + 1):  # the first round warms up
        for budget, theta in CALIBRATION_RUNS if round_ % 2 == 0 else CALIBRATION_RUNS[::-1]:
            engine = offloaded_experts(model, budget, theta, LRUConfig(), link=link)
            try:
                seconds = generate(model, prompt, max_new_tokens=tokens, eos_ids=(), experts=engine).stats.decode_s_per_token
            finally:
                engine.close()
            layouts[budget, theta] = engine.layout
            if round_ or not repeats:
                measured[budget, theta].append(seconds)
    runs = [MeasuredRun(layouts[run], LRUPolicy(), None, statistics.median(measured[run])) for run in CALIBRATION_RUNS]
    return fit_engine_overheads(profile, times, trace, runs)
