"""Quantized experts on a CUDA device: the compressed bytes in pinned host memory, device slots and
staging, decoded on the device; an offloaded run equals its all-resident GPU run bit for bit, and a
decode on the GPU equals the CPU's in float32."""

from __future__ import annotations

import pytest
import torch

from moepic.cache.layout import plan_layout
from moepic.checkpoint.load import load_model
from moepic.core.weights import MoEWeights
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.quant import QuantizedExpert, build_format
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPT = list(range(300, 340))
FORMATS = {"int4": {"name": "int4", "group_size": 64}, "int8": {"name": "int8", "group_size": 64},
           "int4_asym": {"name": "int4", "group_size": 32, "symmetric": False}, "mxfp4": {"name": "mxfp4"}, "fp8": {"name": "fp8"},
           "gguf_q8": {"name": "gguf", "gate_up": "Q8_0", "down": "Q8_0"}, "int4_fused": {"name": "int4-fused", "group_size": 64}}


def routed_experts(model):
    return [w for lw in model.weights.layers if isinstance(lw.ffn, MoEWeights) for w in lw.ffn.experts]


@pytest.fixture(scope="module", params=sorted(FORMATS))
def models(request):
    fmt = build_format(FORMATS[request.param])
    resident = load_model(default_model_dir(), device="cuda", expert_format=fmt)
    offload = load_model(default_model_dir(), device="cuda", expert_format=fmt, offload_experts=True)
    return fmt, resident, offload


def test_quantized_experts_load_compressed_pinned_on_the_host_and_on_the_gpu(models):
    _, resident, offload = models
    assert all(isinstance(w, QuantizedExpert) and w.parts[0].is_cuda for w in routed_experts(resident))
    assert all(p.device.type == "cpu" and p.is_pinned() for w in routed_experts(offload) for p in w.parts)


@pytest.mark.parametrize("policy", ["lru", "lcp"])
@pytest.mark.parametrize("budget,theta", [(0.2, 0.5), (0.5, 0.25), (1.0, 1.0)])
def test_offloaded_quantized_experts_on_cuda_equal_their_all_resident_gpu_run(models, policy, budget, theta):
    fmt, resident_model, model = models
    resident = generate(resident_model, PROMPT, max_new_tokens=24, eos_ids=(), keep_logits=True)
    engine = offloaded_experts(model, budget, theta, POLICIES[policy].config())
    assert all(p.flat_SX.is_cuda for p in engine.pools.values())
    offloaded = generate(model, PROMPT, max_new_tokens=24, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == resident.token_ids
    for a, b in zip(offloaded.logits, resident.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    layout = plan_layout(model.spec, dtype_bytes=2, budget=1.0, theta=1.0, expert_format=fmt)
    report = engine.report()
    if budget < 1.0:
        assert report["bytes_loaded"] > 0
        # every copy moved whole experts or segments of the format's bytes, never dense ones
        assert report["bytes_loaded"] % (layout.layers[0].expert_bytes // layout.layers[0].ffn_size) == 0


@pytest.mark.parametrize("name", ["int4_asym", "mxfp4", "fp8", "gguf_q8"])
def test_a_decode_on_the_gpu_equals_the_cpus_in_float32(name):
    fmt = build_format(FORMATS[name])
    model = load_model(default_model_dir(), dtype=torch.float32, expert_format=fmt)
    for w in routed_experts(model)[:8]:
        cpu, gpu = w.dense(), w.to("cuda").dense()
        assert gpu.gate_up_N2BD.dtype == torch.float32 == cpu.gate_up_N2BD.dtype
        assert torch.equal(gpu.gate_up_N2BD.cpu(), cpu.gate_up_N2BD) and torch.equal(gpu.down_FD.cpu(), cpu.down_FD)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q6_K"])
def test_gguf_blocks_dequantise_on_the_gpu_as_on_the_cpu(kind):
    import numpy as np
    from gguf_writing import random_blocks

    from moepic.quant.ggml import BLOCKS, dequantize_ggml

    blocks = torch.from_numpy(random_blocks(kind, 64, 512, np.random.default_rng(0))).reshape(-1, BLOCKS[kind][1])
    assert torch.equal(dequantize_ggml(blocks.cuda(), kind).cpu(), dequantize_ggml(blocks, kind))


def test_misses_served_low_bit_on_cuda_with_nothing_cached_equal_the_int4_models_gpu_run():
    fmt = build_format(FORMATS["int4"])
    dense = load_model(default_model_dir(), device="cuda", offload_experts=True)
    int4 = load_model(default_model_dir(), device="cuda", expert_format=fmt)
    expected = generate(int4, PROMPT, max_new_tokens=16, eos_ids=(), keep_logits=True)
    staging = plan_layout(dense.spec, dtype_bytes=2, budget=1.0, theta=0.0, miss_format=fmt).staging_bytes
    engine = offloaded_experts(dense, staging, 0.0, POLICIES["lru"].config(), miss_format=fmt)
    run = generate(dense, PROMPT, max_new_tokens=16, eos_ids=(), keep_logits=True, experts=engine)
    assert run.token_ids == expected.token_ids
    for a, b in zip(run.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_int4_fused_hybrid_on_cuda_computes_the_hosts_share_with_the_fused_kernel_and_keeps_the_tokens():
    """The device decodes int4-fused experts before its matmuls; the host computes its loads with
    torch's fused int4 kernel on the same bytes: the tokens of the all-resident GPU run."""
    from moepic.runtime.host_pricing import run_pricing

    fmt = build_format(FORMATS["int4_fused"])
    resident = load_model(default_model_dir(), device="cuda", expert_format=fmt)
    offload = load_model(default_model_dir(), device="cuda", expert_format=fmt, offload_experts=True)
    expected = generate(resident, PROMPT, max_new_tokens=12, eos_ids=())
    for mode in ("host-only", "auto"):
        pricing = run_pricing(offload.device, 2, host="desktop-ddr5", link=None, threads=None, expert_format=fmt) if mode == "auto" else None
        engine = offloaded_experts(offload, 0.3, 0.5, POLICIES["lru"].config(), hybrid=mode, pricing=pricing)
        try:
            got = generate(offload, PROMPT, max_new_tokens=12, eos_ids=(), experts=engine)
        finally:
            engine.close()
        assert got.token_ids == expected.token_ids
        assert mode == "auto" or engine.counters.host_bytes > 0
