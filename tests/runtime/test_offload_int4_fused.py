"""int4-fused experts (moepic/quant/int4_fused.py) through the offloading engine: copy-only runs
equal the all-resident run bit for bit (every expert computed by the same fused kernel on this
CPU); hybrid runs compute loads on the host from the stored bytes and keep the tokens, logits to
bfloat16 rounding; `auto` prices them at the host profile's int4 rate, and a profile without one
is refused by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.cache.layout import plan_layout
from moepic.checkpoint.load import load_model
from moepic.errors import ConfigError
from moepic.perfmodel.hardware import HostProfile
from moepic.perfmodel.host_costs import HostPricing
from moepic.policies import POLICIES
from moepic.quant import build_format
from moepic.quant.int4_tiles import kernel_layout
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from tests_support import assert_slots_hold_the_host_bytes, dense_run, policy_for

pytestmark = pytest.mark.skipif(kernel_layout() is None, reason="this torch has no fused CPU int4 kernel in a known layout")
PROMPT = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]
FORMAT = {"name": "int4-fused", "group_size": 64}


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    """Qwen3-MoE 256 wide (int4-fused cuts at 64 neurons), fp32, experts encoded as they load."""
    return load_model(checkpoint_dir("qwen3_moe_256"), dtype=torch.float32, expert_format=build_format(FORMAT))


def budget(model, share: float) -> int:
    layout = plan_layout(model.spec, dtype_bytes=4, budget=1.0, theta=0.5, expert_format=build_format(FORMAT),
                         widest_neuron_block=64)
    return layout.staging_bytes + int(share * max(0, layout.expert_bytes - layout.staging_bytes))


def host(int4_gbps: float | None) -> HostProfile:
    return HostProfile(name="test", source="test", bf16_expert_gbps=10.0, fp32_expert_gbps=10.0, call_overhead_us=0.0,
                       memory_gbps=40.0, physical_cores=2, matmul_gflops=1e4, int4_expert_gbps=int4_gbps)


def test_experts_stay_int4_fused_and_run_the_fused_kernel(model):
    expert = next(lw.ffn.experts[0] for lw in model.weights.layers if hasattr(lw.ffn, "experts"))
    assert expert.format.name == "int4-fused" and expert.block == 64
    x = torch.randn(2, model.spec.hidden_size)
    assert expert.fused_swiglu(x) is not None  # computed from the stored bytes, not decoded


@settings(max_examples=15, deadline=None)
@given(policy=st.sampled_from(sorted(POLICIES)), share=st.floats(0.0, 1.0), theta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       new_tokens=st.integers(1, 5))
def test_offloaded_int4_fused_experts_equal_their_all_resident_run_bit_for_bit(model, policy, share, theta, new_tokens):
    resident, trace = dense_run(model, PROMPT, new_tokens)
    engine = offloaded_experts(model, budget(model, share), theta, policy=policy_for(policy, trace))
    offloaded = generate(model, PROMPT, max_new_tokens=new_tokens, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == resident.token_ids
    assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, resident.logits))
    assert_slots_hold_the_host_bytes(engine)


@pytest.mark.parametrize("mode,int4_gbps", [("host-only", None), ("auto", 1e3), ("auto", 1e-3)])
def test_hybrid_runs_compute_int4_fused_loads_on_the_host(model, mode, int4_gbps):
    resident, trace = dense_run(model, PROMPT, 5)
    pricing = None if mode == "host-only" else HostPricing(host=host(int4_gbps), link_gbps=1.0, link_latency_us=0.0,
                                                           dtype_bytes=4, kernel="int4", weight_bytes=0.5625)
    engine = offloaded_experts(model, budget(model, 0.3), 0.5, policy=policy_for("lru", trace), hybrid=mode, pricing=pricing)
    try:
        offloaded = generate(model, PROMPT, max_new_tokens=5, eos_ids=(), keep_logits=True, experts=engine)
    finally:
        engine.close()
    assert offloaded.token_ids == resident.token_ids
    for a, b in zip(offloaded.logits, resident.logits):
        # A split expert's top and bottom each come out of the kernel in bfloat16 (2⁻⁸ relative), then
        # add: the logits agree to about that share of their scale, not bit for bit.
        assert float((a - b).abs().max()) <= 1e-2 * float(b.abs().max())
    neuron_bytes = engine.layout.layers[0].neuron_bytes
    assert neuron_bytes == build_format(FORMAT).neuron_bytes(model.spec.hidden_size, False, 4)
    hosted = engine.counters.host_bytes
    if int4_gbps == 1e-3:  # a host this slow computes nothing: every load is copied
        assert hosted == 0
    else:  # host-only computes every load there, a fast host most of them: int4-fused bytes, not dense ones
        assert hosted > 0 and hosted % (64 * neuron_bytes) == 0  # whole 64-neuron blocks


def test_a_host_profile_without_an_int4_rate_is_refused_by_name():
    with pytest.raises(ConfigError, match="host profile 'test' has no int4_expert_gbps"):
        HostPricing(host=host(None), link_gbps=1.0, link_latency_us=0.0, dtype_bytes=2, kernel="int4")


def test_generate_runs_hybrid_auto_with_int4_fused_experts_priced_at_the_measured_int4_rate(capsys):
    """The bundled model with int4-fused experts and a slow emulated link: `auto` measures the host's
    int4 rate at start-up, computes loads there, and keeps the all-resident run's tokens."""
    import json

    from moepic.cli import main

    greedy = ["generate", "--greedy", "--expert-format", "int4-fused", "--prompt-ids", "1,17,5,42", "--max-new-tokens", "6", "--json"]
    capsys.readouterr()
    assert main(greedy) == 0
    resident = json.loads(capsys.readouterr().out)
    assert main([*greedy, "--budget", "0.3", "--hybrid", "auto", "--link-gbps", "0.05"]) == 0
    out, err = capsys.readouterr()
    hybrid = json.loads(out)
    assert hybrid["token_ids"] == resident["token_ids"]
    assert "GB/s of int4-fused experts" in err
    assert hybrid["stats"]["host_experts"] + hybrid["stats"]["host_bottoms"] > 0
