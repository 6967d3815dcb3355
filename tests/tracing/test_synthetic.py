"""Synthetic routing traces: invariants, each law moving the statistic it controls, fitting, JSON, the
two commands, and the acceptance test: fitted to the shared Mixtral traces, synthetic traces give
the real per-layer LRU and LFU hit-rate curves (the project's own planner) within a few points."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.analysis.routing_stats import (
    consecutive_reuse, expert_shares, frequency_hit_curve, next_layer_predictability, recency_hit_curve,
)
from moepic.cache.layout import CacheLayout, LayerCacheLayout
from moepic.cache.replay import replay_trace
from moepic.commands import fit_trace, synth_trace
from moepic.commands import synthetic as commands
from moepic.commands.arguments import Parser
from moepic.errors import MoepicError
from moepic.policies import POLICIES
from moepic.policies.base import build_policy
from moepic.ranges import SEED
from moepic.tracing import TraceError, load_any_trace, load_trace, save_trace
from moepic.tracing.synthetic import (
    LAWS, SyntheticRouting, fit_synthetic, generate_trace, load_synthetic, save_synthetic, select_tokens,
)

SHARED = Path(__file__).resolve().parents[2] / "../shared/traces" / "mixtral-8x7b-instruct-fp8"
STATISTICAL = settings(max_examples=12)  # each example generates thousands of tokens


def routing(E=8, K=2, L=1, **laws) -> SyntheticRouting:
    """Laws given as one number (every layer) or one per layer; the rest 0."""
    values = {name: laws.get(name, 0.0) for name in LAWS}
    return SyntheticRouting(num_experts=E, top_k=K, **{n: np.broadcast_to(v, L) for n, v in values.items()},
                            **{k: v for k, v in laws.items() if k not in LAWS})


@st.composite
def routings(draw, min_layers=1, max_layers=4):
    E = draw(st.integers(2, 12))
    K, L = draw(st.integers(1, E)), draw(st.integers(min_layers, max_layers))
    laws = {name: draw(st.lists(st.floats(0, 0.95 if name == "decay" else 5), min_size=L, max_size=L)) for name in LAWS}
    return SyntheticRouting(num_experts=E, top_k=K, **laws, weight_alpha=draw(st.floats(0.05, 20)),
                            tokens_per_sequence=draw(st.integers(1, 50)))


@given(config=routings(), tokens=st.integers(0, 60), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_a_seed_gives_one_trace_and_another_seed_another(config, tokens, seed, data):
    sequences = data.draw(st.integers(1, max(tokens, 1)))
    a, b = generate_trace(config, tokens, seed, sequences), generate_trace(config, tokens, seed, sequences)
    for field in ("expert_ids_NLK", "weights_NLK", "sequence_N", "position_N", "prefill_N"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.source == b.source
    if tokens >= 10 and config.top_k > 1:  # continuous weights: another seed cannot repeat them
        assert not np.array_equal(a.weights_NLK, generate_trace(config, tokens, seed + 1, sequences).weights_NLK)


@given(config=routings(), tokens=st.integers(0, 60), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_every_token_has_k_distinct_experts_in_range_and_sorted_weights_summing_to_one(config, tokens, seed, data):
    sequences = data.draw(st.integers(1, max(tokens, 1)))
    trace = generate_trace(config, tokens, seed, sequences)
    E, K, L = config.num_experts, config.top_k, config.num_layers
    assert trace.expert_ids_NLK.shape == (tokens, L, K) and trace.moe_layers == tuple(range(L))
    assert trace.num_experts == E and trace.top_k == K and trace.model == "synthetic"
    ids = np.sort(trace.expert_ids_NLK, axis=-1)
    assert ((0 <= ids) & (ids < E)).all() and (np.diff(ids, axis=-1) > 0).all()
    assert (np.diff(trace.weights_NLK, axis=-1) <= 0).all()
    np.testing.assert_allclose(trace.weights_NLK.sum(-1), 1.0, atol=1e-5)
    assert not trace.prefill_N.any()
    lengths = np.bincount(trace.sequence_N, minlength=sequences) if tokens else np.zeros(1, int)
    assert (lengths.max() - lengths.min() <= 1) and (not tokens or len(lengths) == sequences)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    np.testing.assert_array_equal(trace.position_N, np.arange(tokens) - np.repeat(starts, lengths))
    described = json.loads(trace.source.split(": ", 1)[1])  # the source holds the parameters
    assert SyntheticRouting(**{k: v for k, v in described.items() if k not in ("format", "version")}) == config


def _pair(low_max: float):
    return st.tuples(st.floats(0, low_max), st.floats(1.5, 3.0)).map(lambda p: (p[0], p[0] + p[1]))


@STATISTICAL
@given(E=st.integers(4, 16), data=st.data(), skews=_pair(2.0), seed=st.integers(0, 2**16))
def test_more_skew_puts_more_load_on_the_busiest_expert(E, data, skews, seed):
    K = data.draw(st.integers(1, E // 2))
    busiest = [expert_shares(generate_trace(routing(E, K, skew=s), 2000, seed, 20)).max() for s in skews]
    assert busiest[1] > busiest[0]


@STATISTICAL
@given(E=st.integers(4, 16), data=st.data(), reuses=_pair(2.0), decay=st.floats(0, 0.9), skew=st.floats(0, 2),
       seed=st.integers(0, 2**16))
def test_more_reuse_means_consecutive_tokens_share_more_experts(E, data, reuses, decay, skew, seed):
    K = data.draw(st.integers(1, E // 2))
    overlap = [consecutive_reuse(generate_trace(routing(E, K, reuse=r, decay=decay, skew=skew), 2000, seed, 20))[0]
               for r in reuses]
    assert overlap[1] > overlap[0]


@STATISTICAL
@given(E=st.integers(4, 16), data=st.data(), correlations=_pair(2.0), skew=st.floats(0, 2), seed=st.integers(0, 2**16))
def test_more_correlation_makes_a_layer_more_predictable_from_the_one_before(E, data, correlations, skew, seed):
    K = data.draw(st.integers(1, E // 2))
    predictable = [next_layer_predictability(generate_trace(routing(E, K, L=2, correlation=c, skew=skew), 2000, seed, 20))[1]
                   for c in correlations]
    assert predictable[1] > predictable[0]


@given(name=st.sampled_from(LAWS), layer=st.integers(0, 2),
       bad=st.one_of(st.floats(max_value=-1e-6), st.just(math.nan), st.just(math.inf)))
def test_a_law_out_of_range_fails_naming_the_field_layer_and_range(name, layer, bad):
    values = [0.5, 0.5, 0.5]
    values[layer] = bad
    expected = "[0, 1)" if name == "decay" else "[0, inf)"
    with pytest.raises(ValueError, match=rf"^{name}\[{layer}\] must be in {re.escape(expected)}, got"):
        attrs.evolve(routing(L=3), **{name: values})


@pytest.mark.parametrize(
    "change,message",
    [
        ({"decay": [0.5, 1.0]}, r"decay\[1\] must be in \[0, 1\), got 1.0"),
        ({"skew": [1.0]}, "one value per MoE layer each, got lengths"),
        ({"top_k": 9}, r"top_k must be in \[1, num_experts=8\], got 9"),
        ({"top_k": 0}, "top_k must be in"),
        ({"weight_alpha": 0.0}, r"weight_alpha must be in \(0, inf\), got 0.0"),
        ({"tokens_per_sequence": 0}, "tokens_per_sequence must be at least 1, got 0"),
        ({"top_k": 2.0}, "top_k must be an integer, got 2.0"),
        ({"num_experts": True}, "num_experts must be an integer, got True"),
    ],
)
def test_invalid_parameters_fail_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        attrs.evolve(routing(L=2), **change)


@pytest.mark.parametrize("tokens,sequences", [(-1, 1), (5, 0), (5, 6)])
def test_generate_rejects_impossible_token_and_sequence_counts(tokens, sequences):
    with pytest.raises(ValueError, match="need tokens >= 0 and 1 <= sequences"):
        generate_trace(routing(), tokens, 0, sequences)


@given(config=routings(min_layers=2), E=st.integers(2, 64), data=st.data(), L=st.integers(2, 40))
def test_for_shape_interpolates_each_law_over_depth(config, E, data, L):
    K = data.draw(st.integers(1, E))
    carried = config.for_shape(E, K, L)
    assert (carried.num_experts, carried.top_k, carried.num_layers) == (E, K, L)
    for name in LAWS:
        old, new = np.array(getattr(config, name)), np.array(getattr(carried, name))
        first = 0.0 if name == "correlation" else old[0]
        np.testing.assert_allclose([new[0], new[-1]], [first, old[-1]], atol=1e-12)  # ends stay ends
        assert (new >= min(first, old.min()) - 1e-12).all() and (new <= old.max() + 1e-12).all()
    same = config.for_shape(config.num_experts, config.top_k, config.num_layers)
    assert same.skew == config.skew and same.correlation[1:] == config.correlation[1:]


def test_skew_keeps_the_top_quarters_share_of_load_across_expert_counts():
    shares = [np.sort(expert_shares(generate_trace(routing(E, 1, skew=2.0), 8000, 3, 40))[0])[::-1][: E // 4].sum()
              for E in (8, 64)]
    assert shares[0] == pytest.approx(shares[1], abs=0.03) and shares[0] > 0.25 + 0.1  # well above uniform


def test_mixtral_shaped_parameters_make_a_qwen_shaped_trace():
    mixtral = routing(8, 2, L=32, skew=np.linspace(0.2, 1.5, 32), reuse=1.0, decay=0.5, correlation=1.0)
    trace = generate_trace(mixtral.for_shape(60, 4, 24), 300, seed=0, sequences=2)
    assert trace.expert_ids_NLK.shape == (300, 24, 4) and trace.expert_ids_NLK.max() < 60


@given(config=routings())
def test_parameters_survive_a_json_round_trip(tmp_path_factory, config):
    path = tmp_path_factory.mktemp("params") / "p.json"
    save_synthetic(attrs.evolve(config, source="fitted to x"), path)
    assert load_synthetic(path) == attrs.evolve(config, source="fitted to x")


GOOD = routing(L=2, skew=0.5).as_dict()


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "keys 'format' and 'version' must be"),
        (json.dumps(GOOD | {"version": 2}), "keys 'format' and 'version' must be"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "skew"}), "missing key 'skew'"),
        (json.dumps(GOOD | {"top_k": "2"}), "key 'top_k' should be an integer, got '2'"),
        (json.dumps(GOOD | {"top_k": True}), "key 'top_k' should be an integer"),
        (json.dumps(GOOD | {"reuse": [0.1, "a"]}), "key 'reuse' should be a list of numbers"),
        (json.dumps(GOOD | {"reuse": 0.1}), "key 'reuse' should be a list of numbers"),
        (json.dumps(GOOD | {"skeww": [1, 1]}), "unknown key 'skeww'"),
        (json.dumps(GOOD | {"decay": [0.2, 1.5]}), r"decay\[1\] must be in \[0, 1\)"),
        (json.dumps(GOOD | {"skew": [0.2, math.nan]}), r"skew\[1\] must be in \[0, inf\), got nan"),
    ],
)
def test_a_bad_parameter_file_names_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(TraceError, match=message) as err:
        load_synthetic(path)
    assert str(err.value).startswith(f"{path}: ")
    with pytest.raises(TraceError, match="synthetic routing parameters not found"):
        load_synthetic(tmp_path / "absent.json")


def test_fitting_recovers_the_parameters_of_a_synthetic_trace():
    """Skew and correlation come back; of reuse and decay, which trade off against each other, the
    boost that one use by the previous token gives, reuse · (1 - decay), does."""
    true = SyntheticRouting(num_experts=8, top_k=2, skew=[0.5, 2.5, 1.0, 2.0], reuse=[0.5, 2.0, 1.5, 0.8],
                            decay=[0.2, 0.7, 0.4, 0.6], correlation=[0.0, 2.0, 0.5, 1.5], weight_alpha=0.7,
                            tokens_per_sequence=300)
    fitted = fit_synthetic(generate_trace(true, 3000, seed=11, sequences=10))
    np.testing.assert_allclose(fitted.skew, true.skew, atol=0.5)
    np.testing.assert_allclose(fitted.correlation, true.correlation, atol=0.3)
    boost = lambda c: np.array(c.reuse) * (1 - np.array(c.decay))  # noqa: E731
    np.testing.assert_allclose(boost(fitted), boost(true), atol=0.25)
    np.testing.assert_allclose(fitted.decay, true.decay, atol=0.35)
    assert fitted.weight_alpha == pytest.approx(0.7, rel=0.1) and fitted.tokens_per_sequence == 300


def test_fitting_ignores_prefill_steps():
    decode = generate_trace(routing(6, 2, L=2, skew=1.0, reuse=1.0, decay=0.5, correlation=1.0), 400, 5, 2)
    prefill = attrs.evolve(decode, prefill_N=np.ones(400, bool), expert_ids_NLK=np.tile([0, 1], (400, 2, 1)))
    both = concatenate(prefill, decode)
    assert fit_synthetic(both, tokens=800, iterations=3) == attrs.evolve(
        fit_synthetic(decode, tokens=800, iterations=3), source=f"fitted to {both.source} (400 decode steps)"
    )
    with pytest.raises(ValueError, match="at least 2 decode steps"):
        fit_synthetic(prefill)


def concatenate(a, b):
    """`a`'s tokens, then `b`'s (its sequences numbered after `a`'s: a trace's sequences never interleave)."""
    fields = ("expert_ids_NLK", "weights_NLK", "position_N", "prefill_N")
    return attrs.evolve(a, **{f: np.concatenate([getattr(a, f), getattr(b, f)]) for f in fields},
                        sequence_N=np.concatenate([a.sequence_N, b.sequence_N + a.sequence_N.max() + 1]))


# The commands, through a parser wired the way cli.py wires them.
def cli(*argv: str) -> tuple[dict, str]:
    parser = Parser(prog="moepic")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    command = {module.NAME: module for module in (fit_trace, synth_trace)}
    for module in command.values():
        module.add_parser(subparsers)
    args = parser.parse_args([str(a) for a in argv])
    report = command[args.command].run(args)
    json.dumps(report)  # what --json prints
    return report, command[args.command].text(report)


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "small.npz"
    save_trace(generate_trace(routing(6, 2, L=3, skew=1.5, reuse=1.0, decay=0.5, correlation=1.0), 300, 1, 3), path)
    return path


def test_fit_trace_writes_parameters_that_synth_trace_turns_into_a_trace(small_trace, tmp_path):
    report, text = cli("fit-trace", "--trace", small_trace, "--out", tmp_path / "p.json", "--tokens", 300, "--json")
    assert [l["layer"] for l in report["layers"]] == [0, 1, 2] and report["cache_sizes"] == [1, 3, 4]
    assert all(len(l["lru"]["real"]) == len(l["lfu"]["synthetic"]) == 3 for l in report["layers"])
    assert max(report["worst_layer_error"].values()) < 0.1
    assert "LRU C=3" in text and f"wrote {tmp_path / 'p.json'}" in text
    assert load_synthetic(tmp_path / "p.json") == SyntheticRouting(**{
        k: v for k, v in report["params"].items() if k not in ("format", "version")})
    report, text = cli("synth-trace", "--params", tmp_path / "p.json", "--tokens", 120, "--sequences", 3, "--seed", 4,
                       "--out", tmp_path / "s.npz")
    trace = load_trace(tmp_path / "s.npz")
    assert trace.expert_ids_NLK.shape == (120, 3, 2) and set(trace.sequence_N) == {0, 1, 2}
    assert text == f"wrote {tmp_path / 's.npz'}: 120 decode tokens in 3 sequences, 3 MoE layers x 6 experts, top-2 (seed 4)"


def test_synth_trace_like_a_trace_in_another_shape(small_trace, tmp_path):
    report, _ = cli("synth-trace", "--like", small_trace, "--experts", 12, "--top-k", 3, "--layers", 5, "--tokens", 90,
                    "--out", tmp_path / "s.npz")
    trace = load_trace(tmp_path / "s.npz")
    assert trace.expert_ids_NLK.shape == (90, 5, 3) and trace.num_experts == 12
    assert report["sequences"] == 1  # 90 tokens at the fitted 100 tokens per sequence


@pytest.mark.parametrize(
    "argv,message",
    [
        (["synth-trace", "--params", "{dir}/absent.json", "--tokens", "5", "--out", "{dir}/s.npz"],
         "absent.json: synthetic routing parameters not found"),
        (["synth-trace", "--params", "{dir}/bad.json", "--tokens", "5", "--out", "{dir}/s.npz"], "bad.json: missing key 'skew'"),
        (["synth-trace", "--like", "{trace}", "--tokens", "0", "--out", "{dir}/s.npz"],
         f"argument --tokens: expected {commands.TOKENS.describe()}, got '0'"),
        (["synth-trace", "--like", "{trace}", "--params", "x", "--tokens", "5", "--out", "s.npz"], "not allowed with argument"),
        (["synth-trace", "--params", "{dir}/good.json", "--top-k", "9", "--tokens", "5", "--out", "{dir}/s.npz"],
         "--top-k: expected at most the experts per layer (8), got 9"),
        (["synth-trace", "--params", "{dir}/good.json", "--tokens", "5", "--sequences", "6", "--out", "{dir}/s.npz"],
         "--sequences: expected 1 to --tokens (5), got 6"),
        (["synth-trace", "--params", "{dir}/good.json", "--tokens", "5", "--out", "{dir}/no/s.npz"],
         "no/s.npz: cannot write the trace (folder {dir}/no does not exist)"),
        # Zero or negative sizes were once replaced by the parameters' own (`args.x or default`).
        (["synth-trace", "--params", "{dir}/good.json", "--experts", "0", "--tokens", "5", "--out", "{dir}/s.npz"],
         f"argument --experts: expected {commands.EXPERTS.describe()}, got '0'"),
        (["synth-trace", "--params", "{dir}/good.json", "--layers", "0", "--tokens", "5", "--out", "{dir}/s.npz"],
         f"argument --layers: expected {commands.LAYERS.describe()}, got '0'"),
        (["synth-trace", "--params", "{dir}/good.json", "--sequences", "0", "--tokens", "5", "--out", "{dir}/s.npz"],
         f"argument --sequences: expected {commands.TOKENS.describe()}, got '0'"),
        (["synth-trace", "--params", "{dir}/good.json", "--top-k", "-2", "--tokens", "5", "--out", "{dir}/s.npz"],
         f"argument --top-k: expected {commands.EXPERTS.describe()}, got '-2'"),
        (["synth-trace", "--params", "{dir}/good.json", "--seed", "-1", "--tokens", "5", "--out", "{dir}/s.npz"],
         f"argument --seed: expected {SEED.describe()}, got '-1'"),
        (["synth-trace", "--params", "{dir}/good.json", "--tokens", "1000000000", "--out", "{dir}/s.npz"],
         "--tokens: 1000000000 tokens of 2 MoE layers x 8 experts, top-2 would need about 163.9 GiB to generate; "
         "the limit is 4 GiB (about 24403223 tokens at this shape)"),
        (["fit-trace", "--trace", "{dir}/absent.npz"], "absent.npz: trace file not found"),
        (["fit-trace", "--trace", "{trace}", "--cache-sizes", "2,7"], "--cache-sizes: at most 6"),
        (["fit-trace", "--trace", "{trace}", "--cache-sizes", "2,x"], "expected comma-separated cache sizes"),
        (["fit-trace", "--trace", "{trace}", "--tokens", "0"], f"argument --tokens: expected {commands.TOKENS.describe()}, got '0'"),
        (["fit-trace", "--trace", "{trace}", "--tokens", "100000000"],
         "--tokens: 100000000 tokens of 3 MoE layers x 6 experts, top-2 would need about 24.6 GiB to generate; "
         "the limit is 4 GiB (about 16268814 tokens at this shape)"),
        (["fit-trace", "--trace", "{trace}", "--out", "{dir}/no/p.json"],
         "no/p.json: cannot write the synthetic routing parameters (folder {dir}/no does not exist)"),
    ],
)
def test_command_mistakes_are_one_line_config_errors(small_trace, tmp_path, argv, message):
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in GOOD.items() if k != "skew"}))
    save_synthetic(routing(L=2), tmp_path / "good.json")
    with pytest.raises(MoepicError) as err:
        cli(*(a.format(dir=tmp_path, trace=small_trace) for a in argv))
    assert message.format(dir=tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_the_fitted_rank_curves_are_the_planners_lru_and_lfu_hit_rates(small_trace):
    """What the fit matches is what a cache sees. The recency curve counts experts of one step as
    tied, while below K slots LRU keeps the one already cached: close there, closer above."""
    trace = load_trace(small_trace)
    sizes = range(1, trace.num_experts)
    lru_LC = np.abs(recency_hit_curve(trace) - hit_curves(trace, "lru", sizes))
    assert lru_LC.max() < 0.03 and lru_LC[:, trace.top_k - 1:].max() < 0.01
    assert np.abs(frequency_hit_curve(trace) - hit_curves(trace, "lfu", sizes)).max() < 0.005


def test_a_layer_that_copies_the_one_before_through_a_map_is_fully_predictable():
    trace = generate_trace(routing(6, 2, L=2, skew=1.0), 200, 0, 2)
    ids = trace.expert_ids_NLK.copy()
    ids[:, 1] = np.array([3, 5, 0, 1, 4, 2])[ids[:, 0]]
    predictable = next_layer_predictability(attrs.evolve(trace, expert_ids_NLK=ids))
    assert np.isnan(predictable[0]) and predictable[1] == 1.0


# Acceptance: the shared Mixtral-8x7B traces (32 MoE layers, 8 experts, top-2, decode only).
TRACES = ["gsm8k_2_routing.jsonl", "humaneval_2_routing.jsonl"]
SLOTS = range(1, 8)
MAX_LAYER_ERROR = 0.045  # every layer's curve; measured worst: 4.2 points (gsm8k, LFU)
MAX_MEAN_ERROR = 0.02  # averaged over layers; measured: 1.4 to 1.6 points


def hit_curves(trace, policy: str, sizes=SLOTS) -> np.ndarray:
    """[L, C]: the planner's hit rate with whole-expert caches of C slots (one-neuron experts, θ = 1)."""
    out = np.zeros((len(trace.moe_layers), len(sizes)))
    for column, slots in enumerate(sizes):
        layout = CacheLayout(layers=tuple(
            LayerCacheLayout(layer=l, num_experts=trace.num_experts, ffn_size=1, block=1, top_neurons=1, slots=slots,
                             neuron_bytes=1) for l in trace.moe_layers), staging_experts=trace.top_k, dtype_bytes=1)
        policy_ = build_policy(POLICIES.structure_node({"name": policy}, "policy"))
        out[:, column] = [stats.hit_rate for stats in replay_trace(trace, layout, policy_)]
    return out


@pytest.mark.parametrize("name", TRACES)
def test_fitted_synthetic_traces_give_the_real_lru_and_lfu_curves(name):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"shared Mixtral routing trace not found: {path.resolve()}")
    real = load_any_trace(path)
    config = fit_synthetic(real)
    tokens = 2000
    synthetic = generate_trace(config, tokens, seed=1, sequences=round(tokens / config.tokens_per_sequence))
    real = select_tokens(real, ~real.prefill_N)
    for policy in ("lru", "lfu"):
        error_L = np.abs(hit_curves(real, policy) - hit_curves(synthetic, policy)).mean(1)
        assert error_L.max() <= MAX_LAYER_ERROR, (policy, error_L.argmax(), error_L.max())
        assert error_L.mean() <= MAX_MEAN_ERROR, (policy, error_L.mean())


def test_synth_trace_finds_an_unwritable_out_before_any_work(tmp_path, monkeypatch):
    save_synthetic(routing(L=2), tmp_path / "good.json")
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path / "ro":
            raise OSError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr("moepic.tracing.synthetic.generate_trace", lambda *a, **k: pytest.fail("generated before the check"))
    with pytest.raises(MoepicError, match=r"ro/s.npz: cannot write the trace \(Permission denied\)$"):
        cli("synth-trace", "--params", tmp_path / "good.json", "--tokens", 5, "--out", tmp_path / "ro" / "s.npz")


def test_synth_trace_on_a_full_disk_leaves_no_file_and_an_older_one_intact(tmp_path, monkeypatch):
    save_synthetic(routing(L=2), tmp_path / "good.json")
    out = tmp_path / "s.npz"
    argv = ("synth-trace", "--params", tmp_path / "good.json", "--out", out)

    def full(f, **arrays):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    cli(*argv, "--tokens", 7)
    before = out.read_bytes()
    monkeypatch.setattr(np, "savez_compressed", full)
    with pytest.raises(MoepicError, match=r"s.npz: cannot write the trace \(No space left on device\)$"):
        cli(*argv, "--tokens", 9)
    assert out.read_bytes() == before and load_trace(out).num_tokens == 7
    out.unlink()
    with pytest.raises(MoepicError):
        cli(*argv, "--tokens", 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.json"]  # no 0-byte or partial .npz


def test_fit_trace_out_on_a_full_disk_keeps_the_older_parameters(small_trace, tmp_path, monkeypatch):
    out = tmp_path / "p.json"
    out.write_text("older parameters")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(MoepicError, match=r"p.json: cannot write the synthetic routing parameters \(No space left on device\)$"):
        cli("fit-trace", "--trace", small_trace, "--out", out, "--tokens", 50)
    assert out.read_text() == "older parameters" and sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
