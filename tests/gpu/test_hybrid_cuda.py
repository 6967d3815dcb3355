"""Hybrid execution on a CUDA device: host-computed experts keep the dense GPU model's tokens, their
results reach the device without a host sync of their own, the host pool owns torch's threads only
while it is open, and device memory stays within the budget plus staging."""

from __future__ import annotations

import pytest
import torch

from moepic.checkpoint.load import load_model
from moepic.core.model import KVCache, forward
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.runtime.generation import generate
from moepic.runtime.host_compute import HOST_JOB_LABEL
from moepic.runtime.host_pricing import run_pricing
from moepic.runtime.offload import offloaded_experts

from gpu_support import peak_above_resident, syncs_during

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def models():
    """fp32, so that the host's and the device's kernels differ only in rounding."""
    dense = load_model(default_model_dir(), device="cuda", dtype=torch.float32)
    offload = load_model(default_model_dir(), device="cuda", dtype=torch.float32, offload_experts=True)
    return dense, offload


def hybrid_engine(model, budget, theta, mode, **kwargs):
    pricing = run_pricing(model.device, 4, host="desktop-ddr5", link=None, threads=None) if mode == "auto" else None
    return offloaded_experts(model, budget, theta, POLICIES["lcp"].config(), hybrid=mode, pricing=pricing, **kwargs)


@pytest.mark.parametrize("mode", ["host-only", "auto"])
@pytest.mark.parametrize("budget,theta", [(0.2, 0.5), (0.5, 0.25), (0.3, 1.0)])
def test_hybrid_generation_on_cuda_keeps_the_dense_gpu_tokens(models, mode, budget, theta):
    dense_model, model = models
    dense = generate(dense_model, PROMPT, max_new_tokens=24, eos_ids=(), keep_logits=True)
    engine = hybrid_engine(model, budget, theta, mode)
    try:
        result = generate(model, PROMPT, max_new_tokens=24, eos_ids=(), keep_logits=True, experts=engine)
        report = engine.report()
    finally:
        engine.close()
    assert result.token_ids == dense.token_ids
    for a, b in zip(result.logits, dense.logits):  # CPU and GPU fp32 kernels round differently
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if mode == "host-only":
        assert report["host_experts"] + report["host_bottoms"] > 0 and report["demand_bytes"] == 0


def test_a_hybrid_decode_step_syncs_only_to_read_each_layers_routing(models):
    """Host results go to the device from pinned memory, non_blocking, and the input reaches the
    host the same way (the worker waits for it): one sync per MoE layer, the routing's, as without
    hybrid."""
    _, model = models
    engine = hybrid_engine(model, 0.2, 0.4, "host-only")
    cache = KVCache.allocate(model, 64)
    try:
        with torch.inference_mode():
            _, cache = forward(model, torch.tensor(PROMPT[:8], device="cuda"), cache, engine)
            torch.cuda.synchronize()
            before = engine.report()["host_experts"] + engine.report()["host_bottoms"]
            token = torch.tensor([5], device="cuda")
            syncs = syncs_during(lambda: forward(model, token, cache, engine, logits_for="last"))
        hosted = engine.report()["host_experts"] + engine.report()["host_bottoms"] - before
    finally:
        engine.close()
    assert hosted > 0
    assert len(syncs) == len(model.spec.moe_layers), "\n".join(syncs)


def merged(intervals):
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def overlap_us(a, b):
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in merged(a) for s2, e2 in merged(b))


def test_host_jobs_and_device_kernels_overlap_on_the_profiler_timeline(models):
    """Cached tops run on the device while the host computes the bottoms of the same step (and the
    next layer's attention need not wait for a host job it does not use): the worker's jobs and the
    device's kernels share time on one profiler timeline."""
    _, model = models
    engine = hybrid_engine(model, 0.6, 0.5, "host-only")
    cache = KVCache.allocate(model, 64)
    try:
        with torch.inference_mode():
            _, cache = forward(model, torch.tensor(PROMPT[:8], device="cuda"), cache, engine)
            torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            # By default the profiler records the thread that started it; the jobs run on the worker.
            all_threads = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
            with torch.profiler.profile(activities=activities, experimental_config=all_threads) as prof:
                for token in PROMPT[8:16]:
                    _, cache = forward(model, torch.tensor([token], device="cuda"), cache, engine, logits_for="last")
                torch.cuda.synchronize()
    finally:
        engine.close()
    events = prof.events()
    host = [(e.time_range.start, e.time_range.end) for e in events if e.name == HOST_JOB_LABEL]
    kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    assert host and kernels, f"{len(host)} host jobs and {len(kernels)} kernels on the timeline"
    shared = overlap_us(host, kernels)
    assert shared > 0.0, f"host jobs ({len(host)}) and device kernels ({len(kernels)}) never ran at the same time"
    print(f"host jobs {len(host)}, kernels {len(kernels)}, overlap {shared:.0f} µs of "
          f"{sum(e - s for s, e in merged(host)):.0f} µs of host work")


def test_the_host_pool_sets_torch_threads_while_open_and_restores_them(models):
    _, model = models
    before = torch.get_num_threads()
    engine = hybrid_engine(model, 0.3, 0.5, "host-only", host_threads=1)
    assert torch.get_num_threads() == 1
    engine.close()
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("budget,theta", [(0.15, 0.5), (0.3, 1.0), (0.6, 0.25)])
def test_peak_device_memory_stays_within_budget_plus_the_run_itself(models, budget, theta):
    """As for copy-only runs (test_offload_cuda.py), with the run itself measured with nothing
    cached twice: every expert copied and computed on the device (its activations), and every
    expert computed on the host (the results handed to the device); a hybrid run does both."""
    _, model = models
    run_itself = 0
    for mode in ("off", "host-only"):  # a hybrid run holds both at once: device activations and host results
        floor_peak, floor_layout, _ = peak_above_resident(model, lambda: hybrid_engine(model, 1.0, 0.0, mode), PROMPT)
        run_itself += floor_peak - floor_layout.staging_bytes
    peak, layout, live = peak_above_resident(model, lambda: hybrid_engine(model, budget, theta, "host-only"), PROMPT)
    assert layout.cache_bytes + layout.staging_bytes <= budget * layout.expert_bytes
    assert peak <= layout.cache_bytes + layout.staging_bytes + run_itself + 64 * 1024, live
