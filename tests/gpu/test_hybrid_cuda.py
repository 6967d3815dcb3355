"""Hybrid execution on a CUDA device: host-computed experts keep the dense GPU model's tokens, their
results reach the device without a host sync of their own, the host pool owns torch's threads only
while it is open, and device memory stays within the budget plus staging."""

from __future__ import annotations

import warnings

import pytest
import torch

from moepic.checkpoint.load import load_model
from moepic.core.model import KVCache, forward
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.runtime.generation import generate
from moepic.runtime.host_pricing import run_pricing
from moepic.runtime.offload import offloaded_experts

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
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    forward(model, torch.tensor([5], device="cuda"), cache, engine, logits_for="last")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        hosted = engine.report()["host_experts"] + engine.report()["host_bottoms"] - before
    finally:
        engine.close()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert hosted > 0
    assert len(syncs) == len(model.spec.moe_layers)


def test_the_host_pool_sets_torch_threads_while_open_and_restores_them(models):
    _, model = models
    before = torch.get_num_threads()
    engine = hybrid_engine(model, 0.3, 0.5, "host-only", host_threads=1)
    assert torch.get_num_threads() == 1
    engine.close()
    assert torch.get_num_threads() == before


def peak_above_resident(model, budget, theta):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine = hybrid_engine(model, budget, theta, "host-only")
    try:
        generate(model, PROMPT, max_new_tokens=16, eos_ids=(), experts=engine)
        torch.cuda.synchronize()
    finally:
        engine.close()
    return torch.cuda.max_memory_allocated() - before, engine.layout


@pytest.mark.parametrize("budget,theta", [(0.15, 0.5), (0.3, 1.0), (0.6, 0.25)])
def test_peak_device_memory_stays_within_budget_plus_the_run_itself(models, budget, theta):
    """As for copy-only runs (test_offload_cuda.py), the run itself measured with nothing cached
    and everything computed on the host (so it includes the host results handed to the device)."""
    _, model = models
    floor_peak, floor_layout = peak_above_resident(model, 1.0, 0.0)
    run_itself = floor_peak - floor_layout.staging_bytes
    peak, layout = peak_above_resident(model, budget, theta)
    assert layout.cache_bytes + layout.staging_bytes <= budget * layout.expert_bytes
    assert peak <= layout.cache_bytes + layout.staging_bytes + run_itself + 64 * 1024
