"""Replaying the shared Mixtral-8x7B routing traces through every policy: sane, ordered hit rates (real routing, CPU only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moepic.cache.layout import plan_layout
from moepic.cache.replay import replay_trace
from moepic.cache.stats import total
from moepic.core.spec import ModelSpec, MoESpec, RopeSpec
from moepic.policies import POLICIES
from moepic.tracing.jsonl import load_jsonl_trace
from tests_support import policy_for

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"
TRACES = sorted(p.name for p in SHARED.glob("*.jsonl")) if SHARED.is_dir() else []

pytestmark = pytest.mark.skipif(not TRACES, reason=f"shared Mixtral routing traces (*.jsonl) not found in {SHARED}")

MIXTRAL = ModelSpec(
    model_type="mixtral",
    vocab_size=32000,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    norm_eps=1e-5,
    rope=RopeSpec(theta=1e6),
    layer_kinds=("moe",) * 32,
    moe=MoESpec(num_experts=8, top_k=2, expert_ffn=14336),
)
# A whole-expert cache of 2 and of 4 of the 8 experts in every layer.
BUDGETS = {2: ["25%"] * 32, 4: ["50%"] * 32}


@pytest.fixture(scope="module", params=TRACES or ["none"])
def hit_rates(request):
    """{slots: {policy: all-layer stats}} for one shared trace."""
    trace = load_jsonl_trace(SHARED / request.param, model="Mixtral-8x7B-Instruct")
    assert trace.moe_layers == MIXTRAL.moe_layers and trace.num_experts == 8 and trace.top_k == 2
    out = {}
    for slots, budget in BUDGETS.items():
        layout = plan_layout(MIXTRAL, dtype_bytes=1, budget=budget, theta=1.0)
        assert all(l.slots == slots and l.top_neurons == l.ffn_size for l in layout.layers)
        out[slots] = {name: total(replay_trace(trace, layout, policy_for(name, trace))) for name in POLICIES}
    return out


def test_every_policy_counts_every_activation_and_has_a_hit_rate_in_zero_to_one(hit_rates):
    for slots, by_policy in hit_rates.items():
        for name, stats in by_policy.items():
            assert stats.activations > 0 and stats.partial_hits == 0  # θ = 1: hits are whole
            assert 0.0 <= stats.hit_rate <= 1.0, (slots, name)
            assert stats.hits + stats.misses == stats.activations


def test_belady_beats_lru_and_lfu_and_no_policy_beats_belady(hit_rates):
    for slots, by_policy in hit_rates.items():
        belady = by_policy["belady"].hit_rate
        assert belady > by_policy["lru"].hit_rate, slots
        assert belady > by_policy["lfu"].hit_rate, slots
        assert all(belady >= stats.hit_rate for stats in by_policy.values()), slots


def test_every_policys_hit_rate_rises_from_two_to_four_slots(hit_rates):
    for name in POLICIES:
        assert hit_rates[4][name].hit_rate > hit_rates[2][name].hit_rate, name
