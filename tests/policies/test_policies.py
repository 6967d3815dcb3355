"""Each cache policy's priority on hand-made routing, and policy configs from YAML nodes (unit)."""

from __future__ import annotations

import numpy as np
import pytest

from moepic.cache.planner import initial_residency, residency_step
from moepic.errors import ConfigError
from moepic.policies import POLICIES, PolicyConfig, build_policy
from moepic.policies.base import LayerStep
from moepic.policies.belady import BeladyPolicy
from moepic.policies.lcp import LCPConfig, LCPPolicy
from moepic.policies.lfu import LFUPolicy
from moepic.policies.lru import LRUConfig
from moepic.policies.random import RandomConfig, RandomPolicy
from moepic.policies.static import StaticPolicy
from moepic.tracing import RoutingTrace
from policy_support import one_layer_trace, whole_expert_layout

INF = float("inf")


def step(clock: int, counts, *, tokens: int = 1, new_request: bool = False, layer: int = 0) -> LayerStep:
    return LayerStep(layer=layer, clock=clock, tokens=tokens, counts_E=np.array(counts, dtype=np.int64), new_request=new_request)


def run(policy, steps, *, layer: int = 0, num_experts: int = 4):
    state = policy.init(layer, num_experts)
    for s in steps:
        state = policy.update(state, s)
    return state


def lcp(mu: float, nu: float, rho: float, omega: float) -> float:
    """The paper's definition: P = μ·ρ^(ν/ω)."""
    return mu * rho ** (nu / omega)


# --- LCP ---------------------------------------------------------------------------------------


def test_lcp_priority_is_activations_times_rho_to_the_idle_tokens_over_the_window():
    policy = LCPPolicy(LCPConfig(rho=0.5, window=4.0))
    steps = [
        step(0, [2, 1, 0, 0], tokens=2, new_request=True),  # a 2-token prefill
        step(2, [0, 1, 1, 0]),
        step(3, [1, 0, 0, 0]),
        step(4, [0, 0, 0, 1]),
    ]
    # At clock 4: μ = 3, 2, 1, 1; last used at clocks 3, 2, 2, 4, so ν = 1, 2, 2, 0.
    expected = [lcp(3, 1, 0.5, 4), lcp(2, 2, 0.5, 4), lcp(1, 2, 0.5, 4), lcp(1, 0, 0.5, 4)]
    np.testing.assert_allclose(policy.priority(run(policy, steps)), expected, rtol=1e-12)


def test_lcp_counts_activations_within_one_request_only():
    policy = LCPPolicy(LCPConfig(rho=0.5, window=4.0))
    steps = [
        step(0, [2, 1, 0, 0], tokens=2, new_request=True),
        step(2, [0, 1, 1, 0]),
        step(3, [1, 0, 0, 1]),
        step(4, [0, 2, 0, 1], tokens=3, new_request=True),  # a new request's prefill: μ restarts
    ]
    # μ = 0, 2, 0, 1 (this request only); so the experts unused in it are worth nothing.
    np.testing.assert_allclose(policy.priority(run(policy, steps)), [0.0, 2.0, 0.0, 1.0])
    later = run(policy, [*steps, step(7, [1, 0, 0, 0])])
    # At clock 7: μ = 1, 2, 0, 1; ν = 0, 3, 5, 3.
    np.testing.assert_allclose(
        policy.priority(later), [lcp(1, 0, 0.5, 4), lcp(2, 3, 0.5, 4), 0.0, lcp(1, 3, 0.5, 4)], rtol=1e-12
    )


def test_lcp_default_keeps_a_quarter_of_an_experts_weight_after_128_idle_tokens():
    policy = LCPPolicy()
    state = run(policy, [step(0, [1, 0], new_request=True), step(128, [0, 1])], num_experts=2)
    np.testing.assert_allclose(policy.priority(state), [0.25, 1.0], rtol=1e-12)


def test_lcp_never_used_experts_are_worth_nothing():
    policy = LCPPolicy()
    assert list(policy.priority(policy.init(0, 3))) == [0.0, 0.0, 0.0]


# --- LFU, LRU ----------------------------------------------------------------------------------


def test_lfu_orders_equal_counts_by_recency():
    policy = LFUPolicy()
    priority = policy.priority(run(policy, [step(0, [1, 0, 0, 0]), step(1, [0, 1, 0, 0])]))
    assert priority[1] > priority[0] > priority[2] == priority[3]


def test_lfu_count_outweighs_recency():
    policy = LFUPolicy()
    priority = policy.priority(run(policy, [step(0, [3, 0, 0, 0], tokens=3), step(3, [0, 2, 0, 0], tokens=2), step(5, [0, 0, 1, 0])]))
    assert priority[0] > priority[1] > priority[2] > priority[3]


def test_lfu_evicts_the_less_recent_of_two_equally_used_experts_and_the_lower_id_of_a_full_tie():
    layout = whole_expert_layout(layer=0, num_experts=4, slots=2)
    for steps, survivor in [([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], 1), ([[1, 1, 0, 0], [0, 0, 1, 0]], 1), ([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], 0)]:
        policy = LFUPolicy()
        residency = initial_residency(policy, layout)
        for counts in steps:
            plan, residency = residency_step(policy, layout, residency, np.array(counts), tokens=1)
        assert set(residency.cache.slots_S) == {survivor, 2}, steps
        assert [(p.expert, p.admitted) for p in plan.experts] == [(2, True)]


def test_lru_priority_is_the_clock_of_the_latest_use():
    policy = build_policy(LRUConfig())
    state = run(policy, [step(0, [1, 1, 0, 0], tokens=4), step(4, [0, 1, 0, 0]), step(5, [0, 0, 0, 1])])
    assert list(policy.priority(state)) == [0, 4, -1, 5]


# --- random ------------------------------------------------------------------------------------


def random_priorities(seed: int, steps) -> list[np.ndarray]:
    policy = RandomPolicy(RandomConfig(seed=seed))
    state, out = policy.init(0, 6), []
    for s in steps:
        state = policy.update(state, s)
        out.append(policy.priority(state))
    return out


def test_random_priorities_repeat_for_the_same_seed_and_differ_for_another():
    steps = [step(0, [1, 0, 0, 0, 0, 0]), step(1, [0, 0, 1, 0, 0, 0])]
    first, again, other = random_priorities(0, steps), random_priorities(0, steps), random_priorities(1, steps)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first, other):
        assert not np.array_equal(a, b)
    unused = [1, 3, 4, 5]
    assert not np.array_equal(first[0][unused], first[1][unused])  # a fresh draw each step


def test_random_keeps_the_experts_in_use_above_every_other():
    policy = RandomPolicy(RandomConfig(seed=5))
    priority = policy.priority(run(policy, [step(0, [0, 2, 0, 1])]))
    assert priority[1] == priority[3] == INF
    assert np.all((0 <= priority[[0, 2]]) & (priority[[0, 2]] < 1))


def test_random_seeds_give_different_victims_over_a_run():
    rng = np.random.default_rng(0)
    counts_NE = np.zeros((200, 8), dtype=np.int64)
    for n in range(200):
        counts_NE[n, rng.choice(8, 2, replace=False)] = 1
    layout = whole_expert_layout(layer=0, num_experts=8, slots=4)
    evictions = {}
    for seed in (0, 1, 0):
        policy = RandomPolicy(RandomConfig(seed=seed))
        residency, evicted = initial_residency(policy, layout), []
        for counts_E in counts_NE:
            plan, residency = residency_step(policy, layout, residency, counts_E, tokens=1)
            evicted.append(plan.evicted)
        evictions.setdefault(seed, []).append(evicted)
    assert evictions[0][0] == evictions[0][1]
    assert evictions[0][0] != evictions[1][0]


# --- static --------------------------------------------------------------------------------------


def two_layer_profile() -> RoutingTrace:
    ids = np.array([[[0, 1], [3, 2]], [[0, 2], [3, 1]], [[0, 1], [3, 2]]])  # [N=3, L=2, K=2]
    return RoutingTrace(
        model="profile", moe_layers=(1, 3), num_experts=4, top_k=2, expert_ids_NLK=ids,
        weights_NLK=np.full((3, 2, 2), 0.5, np.float32), sequence_N=np.zeros(3, np.int32),
        position_N=np.arange(3, dtype=np.int32), prefill_N=np.zeros(3, bool),
    )


def test_static_priority_is_each_experts_share_of_its_layers_routing_in_the_profile():
    policy = StaticPolicy(profile=two_layer_profile())
    # Layer 1 routes 0 three times, 1 twice, 2 once, 3 never, out of 6; layer 3: 3 ×3, 2 ×2, 1 ×1.
    np.testing.assert_allclose(policy.priority(policy.init(1, 4)), [3 / 6, 2 / 6, 1 / 6, 0])
    state = policy.init(3, 4)
    np.testing.assert_allclose(policy.priority(state), [0, 1 / 6, 2 / 6, 3 / 6])
    after = policy.update(state, step(0, [5, 0, 0, 0], tokens=5, layer=3))
    np.testing.assert_allclose(policy.priority(after), [0, 1 / 6, 2 / 6, 3 / 6])  # routing does not move it


@pytest.mark.parametrize("policy_class,keyword", [(StaticPolicy, "profile"), (BeladyPolicy, "future")])
def test_a_trace_policy_refuses_a_layer_or_expert_count_its_trace_lacks(policy_class, keyword):
    policy = policy_class(**{keyword: two_layer_profile()})
    with pytest.raises(ConfigError, match=r"MoE layers \[1, 3\] with 4 experts; the model's layer 2 has 4"):
        policy.init(2, 4)
    with pytest.raises(ConfigError, match="the model's layer 1 has 8"):
        policy.init(1, 8)


# --- belady --------------------------------------------------------------------------------------


def test_belady_ranks_experts_by_their_next_use_and_never_used_ones_last():
    # Tokens route to {0,1}, {2,1}, {0,3}, {2,1}: clocks 0..3.
    policy = BeladyPolicy(future=one_layer_trace([[0, 1], [2, 1], [0, 3], [2, 1]], num_experts=5))
    state = policy.init(0, 5)
    state = policy.update(state, step(0, [1, 1, 0, 0, 0]))
    # Upcoming uses: 0 → (2), 1 → (1, 3), 2 → (1, 3), 3 → (2), 4 → none.
    assert list(policy.priority(state)) == [-2, -1, -1, -2, -3]
    state = policy.update(state, step(1, [1, 1, 1, 1, 0], tokens=2))  # clocks 1 and 2 in one step
    assert list(policy.priority(state)) == [-2, -1, -1, -2, -2]
    state = policy.update(state, step(3, [0, 1, 1, 0, 0]))
    assert len(set(policy.priority(state))) == 1  # no future: all alike


def test_belady_breaks_a_tie_on_the_next_use_by_the_use_after_it():
    # Experts 0 and 1 are both next used at clock 1; 0 again at clock 2, 1 only at clock 4.
    policy = BeladyPolicy(future=one_layer_trace([[2, 3], [0, 1], [0, 2], [2, 3], [1, 3]], num_experts=4))
    state = policy.update(policy.init(0, 4), step(0, [0, 0, 1, 1]))
    priority = policy.priority(state)
    assert priority[0] > priority[1]


# --- configs -------------------------------------------------------------------------------------


def test_a_policy_node_builds_that_policys_config():
    config = PolicyConfig.structure_node({"name": "lcp", "rho": 0.5}, "cache.policy")
    assert config == LCPConfig(rho=0.5) and config.window == 128.0
    assert build_policy(config).config.rho == 0.5
    assert PolicyConfig.structure_node("lru", "cache.policy") == LRUConfig()
    assert PolicyConfig.structure_node({"name": "random", "seed": 7}, "cache.policy") == RandomConfig(seed=7)


def test_a_policy_node_without_a_name_tunes_the_default_policy_lcp():
    assert PolicyConfig.structure_node({"rho": 0.5}, "cache.policy") == LCPConfig(rho=0.5)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_config_survives_a_round_trip_through_its_node(name):
    config = POLICIES[name].config()
    node = config.as_dict()
    assert node["name"] == name
    assert PolicyConfig.structure_node(node, "cache.policy") == config


def test_an_unknown_policy_name_is_an_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"config key cache\.policy\.name: unknown policy 'fifo'") as err:
        PolicyConfig.structure_node({"name": "fifo"}, "cache.policy")
    for name in POLICIES:
        assert name in str(err.value).split("known: ")[1]


def test_an_unknown_policy_key_is_an_error_naming_it_and_the_known_keys():
    with pytest.raises(ConfigError, match=r"unknown config key cache\.policy\.alpha; known keys here: rho, window"):
        PolicyConfig.structure_node({"name": "lcp", "alpha": 1.0}, "cache.policy")


@pytest.mark.parametrize("rho", [0, 0.0, -0.25, 1.5, float("nan")])
def test_lcp_rho_outside_zero_to_one_is_an_error(rho):
    with pytest.raises(ConfigError, match=r"config key cache\.policy\.rho: expected a number in \(0, 1\]"):
        PolicyConfig.structure_node({"name": "lcp", "rho": rho}, "cache.policy")


@pytest.mark.parametrize("window", [0, -1.0, float("nan"), float("inf")])
def test_lcp_rho_of_one_is_allowed_and_a_window_outside_its_range_is_not(window):
    assert PolicyConfig.structure_node({"name": "lcp", "rho": 1}, "cache.policy").rho == 1.0
    with pytest.raises(ConfigError, match=r"config key cache\.policy\.window: expected a number in \(0, 16777216\]"):
        PolicyConfig.structure_node({"name": "lcp", "window": window}, "cache.policy")


def test_a_policy_value_of_the_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"config key cache\.policy\.rho: expected"):
        PolicyConfig.structure_node({"name": "lcp", "rho": "high"}, "cache.policy")
    with pytest.raises(ConfigError, match=r"config key cache\.policy: expected a mapping"):
        PolicyConfig.structure_node(3, "cache.policy")


@pytest.mark.parametrize("name,key", [("static", "cache.policy.profile"), ("belady", "cache.policy.trace")])
def test_a_trace_policy_without_a_file_is_an_error_naming_the_key_to_set(name, key):
    config = PolicyConfig.structure_node({"name": name}, "cache.policy")
    with pytest.raises(ConfigError, match=rf"set {key}=FILE"):
        build_policy(config)


def test_a_trace_policy_reads_its_file(tmp_path):
    from moepic.tracing import save_trace

    save_trace(two_layer_profile(), tmp_path / "p.npz")
    static = build_policy(PolicyConfig.structure_node({"name": "static", "profile": str(tmp_path / "p.npz")}, "cache.policy"))
    np.testing.assert_allclose(static.priority(static.init(1, 4)), [3 / 6, 2 / 6, 1 / 6, 0])
    belady = build_policy(PolicyConfig.structure_node({"name": "belady", "trace": str(tmp_path / "p.npz")}, "cache.policy"))
    assert list(belady.priority(belady.update(belady.init(3, 4), step(0, [0, 0, 1, 1], layer=3)))) == [-4, -2, -3, -1]
