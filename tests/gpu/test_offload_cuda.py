"""Offloading on a CUDA device: pinned host experts, device pools, exact results, and device memory
that stays within the budget."""

from __future__ import annotations

import pytest
import torch

from moepic.checkpoint.load import load_model
from moepic.core.weights import MoEWeights
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from moepic.runtime.random_model import MixtralShape, random_models

from gpu_support import peak_above_resident, syncs_during

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPT = list(range(300, 340))


def routed_experts(model):
    return [w for lw in model.weights.layers if isinstance(lw.ffn, MoEWeights) for w in lw.ffn.experts]


@pytest.fixture(scope="module")
def models():
    dense = load_model(default_model_dir(), device="cuda")
    offload = load_model(default_model_dir(), device="cuda", offload_experts=True)
    return dense, offload


def test_offloaded_load_keeps_experts_in_pinned_host_memory_and_the_rest_on_the_gpu(models):
    _, model = models
    assert model.weights.layers[0].attention.q_QD.is_cuda and model.weights.embed_VD.is_cuda
    for w in routed_experts(model):
        assert w.gate_up_N2BD.device.type == "cpu" and w.gate_up_N2BD.is_pinned() and w.down_FD.is_pinned()


@pytest.mark.parametrize("policy", ["lru", "lfu", "lcp", "random"])
@pytest.mark.parametrize("budget,theta", [(0.2, 0.5), (0.5, 0.25), (1.0, 1.0)])
def test_offloaded_generation_on_cuda_equals_the_dense_gpu_model(models, policy, budget, theta):
    dense_model, model = models
    dense = generate(dense_model, PROMPT, max_new_tokens=24, eos_ids=(), keep_logits=True)
    engine = offloaded_experts(model, budget, theta, POLICIES[policy].config())
    assert engine.store.pinned and all(p.flat_SX.is_cuda for p in engine.pools.values())
    offloaded = generate(model, PROMPT, max_new_tokens=24, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == dense.token_ids
    for a, b in zip(offloaded.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("budget,theta", [(0.15, 0.5), (0.3, 1.0), (0.6, 0.25)])
def test_peak_device_memory_stays_within_budget_plus_the_run_itself(models, budget, theta):
    """Peak above the resident weights ≤ cache + staging + what a cacheless run needs besides its
    staging (KV cache, activations): the engine allocates nothing else on the device."""
    _, model = models
    floor_peak, floor_layout, _ = peak_above_resident(model, lambda: offloaded_experts(model, 1.0, 0.0, POLICIES["lcp"].config()), PROMPT)
    run_itself = floor_peak - floor_layout.staging_bytes
    peak, layout, live = peak_above_resident(model, lambda: offloaded_experts(model, budget, theta, POLICIES["lcp"].config()), PROMPT)
    assert layout.cache_bytes + layout.staging_bytes <= budget * layout.expert_bytes
    assert peak <= layout.cache_bytes + layout.staging_bytes + run_itself + 64 * 1024, live


def test_prefetch_copies_overlap_compute_on_the_device():
    """The profiler's device timeline shows host→device copies running while kernels run. On
    experts of 25 MB (a copy takes about half a millisecond): the bundled model's take
    microseconds, shorter than the gaps between a decode step's kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    from moepic.predictors.gate_lookahead import GateLookaheadConfig

    _, model = random_models(MixtralShape(layers=4, hidden=1024, ffn=4096, heads=8, kv_heads=2, vocab=1024),
                             torch.device("cuda"), dense=False)
    # 0.6: the minimum working set here is 10 of the 32 experts (staging for 4 candidates and a demand reserve)
    engine = offloaded_experts(model, 0.6, 0.4, POLICIES["lcp"].config(), GateLookaheadConfig(candidates=4))
    generate(model, PROMPT, max_new_tokens=4, eos_ids=(), experts=engine)  # warm-up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(model, PROMPT, max_new_tokens=16, eos_ids=(), experts=engine)
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    copies = [e.time_range for e in device_events if "HtoD" in e.name]
    kernels = [e.time_range for e in device_events if "Memcpy" not in e.name and "Memset" not in e.name]
    assert copies and kernels
    overlapping = sum(any(c.start < k.end and k.start < c.end for k in kernels) for c in copies)
    assert overlapping > 0, "no host→device copy ran concurrently with a kernel"
    assert engine.report()["prefetch_bytes"] > 0


@pytest.mark.parametrize("predictor", ["none", "gate_lookahead"])
def test_a_decode_step_syncs_with_the_host_only_to_read_each_layers_routing(models, predictor):
    """One sync per MoE layer, to read its routing; a router-input predictor's candidates travel in
    the same transfer. Copies and waits never sync."""
    from moepic.core.model import KVCache, forward
    from moepic.predictors.gate_lookahead import GateLookaheadConfig

    _, model = models
    config = GateLookaheadConfig() if predictor == "gate_lookahead" else None
    engine = offloaded_experts(model, 0.2, 0.4, POLICIES["lcp"].config(), config)
    cache = KVCache.allocate(model, 64)
    with torch.inference_mode():
        _, cache = forward(model, torch.tensor(PROMPT[:8], device="cuda"), cache, engine)
        token = torch.tensor([5], device="cuda")
        syncs = syncs_during(lambda: forward(model, token, cache, engine, logits_for="last"))
    assert len(syncs) == len(model.spec.moe_layers), "\n".join(syncs)


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss_mxfp4", "phimoe", "llama4_text", "hunyuan_v1_moe", "flex_olmo"])
def test_every_family_offloaded_on_cuda_equals_its_dense_gpu_run(checkpoint_dir, name):
    """Latent attention, biased experts dequantised from MXFP4 (their biases pinned with them),
    sinks and window rings, LayerNorm and LongRoPE, input-weighted routing, post-norm: the engine
    at a small budget with split tops changes no bit on the device either."""
    folder = checkpoint_dir(name)
    dense_model = load_model(folder, dtype=torch.float32, device="cuda", widest_neuron_block=4)
    model = load_model(folder, dtype=torch.float32, device="cuda", widest_neuron_block=4, offload_experts=True)
    for w in routed_experts(model):
        assert all(t.device.type == "cpu" and t.is_pinned() for t in w.tensors)
    prompt = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]
    dense = generate(dense_model, prompt, max_new_tokens=8, eos_ids=(), keep_logits=True)
    engine = offloaded_experts(model, 0.3, 0.5, POLICIES["lcp"].config())
    offloaded = generate(model, prompt, max_new_tokens=8, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == dense.token_ids
    for a, b in zip(offloaded.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
