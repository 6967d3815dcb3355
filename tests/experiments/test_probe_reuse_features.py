"""The reuse-feature probe (experiments/probe_reuse_features.py) scores what it says: its planned
hit rate is the policy's own replay on the engine's steps, and its AUC counts ranked pairs."""

from __future__ import annotations

import importlib.util

import numpy as np
from experiments_support import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st
from tests_support import traces

from moepic.cache.layout import CacheLayout, slot_count_layout
from moepic.cache.replay import replay_trace
from moepic.cache.stats import total
from moepic.policies import POLICIES
from moepic.policies.base import priority_series
from moepic.sim.steps import trace_steps

spec = importlib.util.spec_from_file_location("probe_reuse_features", ROOT / "experiments" / "probe_reuse_features.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


@settings(max_examples=30, deadline=None)
@given(traces().filter(lambda t: t.num_tokens > 0), st.integers(1, 4), st.sampled_from(["lru", "lfu", "lcp"]))
def test_planned_hit_rate_replays_the_scores_as_the_policy_would_on_the_engines_steps(trace, slots, name):
    slots = min(slots, trace.num_experts)
    steps = trace_steps(trace)
    policy = POLICIES.build(POLICIES[name].config())
    priority_LSE = np.stack([priority_series(policy, layer, trace.num_experts, steps.counts_SE(trace, c), steps.tokens_S, steps.new_request_S)
                             for c, layer in enumerate(trace.moe_layers)])
    layout = CacheLayout(layers=tuple(slot_count_layout(l, trace.num_experts, slots) for l in trace.moe_layers),
                         staging_experts=trace.top_k, dtype_bytes=1)
    assert probe.planned_hit_rate(trace, priority_LSE, slots) == total(replay_trace(trace, layout, policy, steps)).hit_rate


def test_within_step_auc_counts_pairs_ranked_right_ties_half():
    labels_ME = np.array([[True, False, False], [False, True, True], [False, False, False]])
    score_ME = np.array([[3.0, 1.0, 3.0], [0.0, 1.0, 2.0], [5.0, 4.0, 3.0]])
    # step 0: 1 positive vs 2 negatives: above one, tied with one → 0.75; step 1: both above → 1; step 2: no positive, skipped
    assert probe.within_step_auc(score_ME, labels_ME) == (0.75 + 1.0) / 2


def test_the_grouped_bar_figure_is_a_whole_png_and_skips_missing_values(tmp_path):
    from moepic.experiments.plots import grouped_bars

    path = grouped_bars({"a": {"history": [0.1, None], "+router": [-0.2, 0.3]}, "b": {"history": [None, None]}},
                        ["12.5 %", "25 %"], tmp_path / "probe.png", title="t", ylabel="gap closed", percent=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and list(tmp_path.iterdir()) == [path]
