"""Misses served from a low-bit copy (`cache.miss_format`, HOBBIT-style; opt-in, changes numbers):
an expert loaded whole moves and computes its int4 copy, while the cache keeps the expert itself,
its top filled from the host. With nothing cached the run is exactly the int4 model's; with
everything cached, exactly the dense model's; the simulator counts what the engine counts."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.cache.layout import plan_layout
from moepic.checkpoint.load import load_model
from moepic.errors import ConfigError
from moepic.perfmodel.hardware import load_profile
from moepic.perfmodel.latency import model_times
from moepic.quant import build_format
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from moepic.sim.simulate import simulate
from moepic.tracing.recorder import RoutingRecorder
from tests_support import assert_slots_hold_the_host_bytes, cli_error, dense_run, load_split_friendly, policy_for

PROMPT = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]
INT4 = {"name": "int4", "group_size": 16}
LIVE_POLICIES = ("lru", "lfu", "lcp", "random")  # those that do not read the run's future


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    return load_split_friendly(checkpoint_dir, ("mixtral", "qwen2_moe"))


def minimum_budget(model) -> int:
    return plan_layout(model.spec, dtype_bytes=4, budget=1.0, theta=0.0, miss_format=build_format(INT4),
                       widest_neuron_block=4).staging_bytes


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_with_nothing_cached_every_expert_runs_as_its_low_bit_copy_exactly_as_the_int4_model(models, checkpoint_dir, name):
    model, fmt = models[name], build_format(INT4)
    int4 = load_model(checkpoint_dir(name), dtype=torch.float32, widest_neuron_block=4, expert_format=fmt)
    expected, trace = dense_run(int4, PROMPT, 5)
    engine = offloaded_experts(model, minimum_budget(model), 0.0, policy=policy_for("lru", trace), miss_format=fmt)
    run = generate(model, PROMPT, max_new_tokens=5, eos_ids=(), keep_logits=True, experts=engine)
    assert run.token_ids == expected.token_ids
    assert all(torch.equal(a, b) for a, b in zip(run.logits, expected.logits))
    report, layout = engine.report(), engine.layout.layers[0]
    assert report["misses"] > 0 and report["demand_bytes"] == report["misses"] * layout.whole_load_bytes
    assert layout.whole_load_bytes == layout.ffn_size * fmt.neuron_bytes(model.spec.hidden_size, False, 4) < layout.expert_bytes


def test_with_every_expert_cached_nothing_is_served_low_bit(models):
    model = models["mixtral"]
    expected, trace = dense_run(model, PROMPT, 4)
    engine = offloaded_experts(model, 1.0, 1.0, policy=policy_for("lru", trace), miss_format=build_format(INT4))
    run = generate(model, PROMPT, max_new_tokens=4, eos_ids=(), keep_logits=True, experts=engine)
    assert all(torch.equal(a, b) for a, b in zip(run.logits, expected.logits))


def test_an_admitted_miss_is_filled_in_full_precision_from_the_host(models):
    """Every admitted top moves twice: the low-bit copy the step computes, the expert's own top the
    cache keeps (background, counted apart); the slots then hold the expert itself."""
    model = models["mixtral"]
    _, trace = dense_run(model, PROMPT, 6)
    engine = offloaded_experts(model, 0.5, 1.0, policy=policy_for("lru", trace), miss_format=build_format(INT4))
    generate(model, PROMPT, max_new_tokens=6, eos_ids=(), experts=engine)
    engine.slots.settle()
    layout = engine.layout.layers[0]
    assert engine.counters.miss_fill_bytes > 0 and engine.counters.miss_fill_bytes % layout.top_bytes == 0
    assert engine.counters.device_copy_bytes == 0  # no top is copied from a staging buffer (it holds the low-bit copy)
    assert engine.host_to_device_bytes == engine.counters.demand_bytes + engine.counters.miss_fill_bytes
    assert_slots_hold_the_host_bytes(engine)


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["mixtral", "qwen2_moe"]),
    policy=st.sampled_from(LIVE_POLICIES),
    share=st.floats(0.0, 1.0),
    theta=st.sampled_from([0.25, 0.5, 1.0]),
    new_tokens=st.integers(1, 5),
)
def test_the_cache_keeps_full_precision_tops_and_the_simulator_counts_what_the_engine_counts(models, name, policy, share, theta, new_tokens):
    """The routing changes with the numbers, so the simulator replays the engine's own run (recorded
    as it ran); every counter agrees, the admitted tops filled from the host included, and every
    slot holds its expert's own top (not the low-bit copy it was computed from)."""
    model, fmt = models[name], build_format(INT4)
    minimum = minimum_budget(model)
    everything = plan_layout(model.spec, dtype_bytes=4, budget=1.0, theta=theta, widest_neuron_block=4).expert_bytes
    budget = minimum + int(share * max(0, everything - minimum))
    recorder = RoutingRecorder(model.spec, model_name="test")
    engine = offloaded_experts(model, budget, theta, policy=policy_for(policy, None), miss_format=fmt)
    generate(model, PROMPT, max_new_tokens=new_tokens, eos_ids=(), experts=engine, tap=recorder)
    engine.slots.settle()
    assert_slots_hold_the_host_bytes(engine)
    trace = recorder.trace()
    hw = load_profile("a6000")
    times = model_times(hw, model.spec, dtype_bytes=4, miss_format=fmt)
    assert times.miss_expert_s == model_times(hw, model.spec, dtype_bytes=4, expert_format=fmt).expert_s
    sim = simulate(trace, engine.layout, policy_for(policy, trace), times, hw)
    assert sim.decode == tuple(engine.decode_stats.values()) and sim.prefill == tuple(engine.prefill_stats.values())
    c = engine.counters
    assert (sim.demand_bytes, sim.miss_fill_bytes) == (c.demand_bytes, c.miss_fill_bytes)


def test_a_miss_format_that_cannot_serve_is_one_line(capsys, models, checkpoint_dir):
    model = models["mixtral"]
    with pytest.raises(ConfigError, match="hybrid 'host-only' computes them on the host instead"):
        offloaded_experts(model, 0.5, 0.5, policy=policy_for("lru", None), miss_format=build_format(INT4), hybrid="host-only")
    int4 = load_model(checkpoint_dir("mixtral"), dtype=torch.float32, expert_format=build_format(INT4))
    with pytest.raises(ConfigError, match="serves misses of dense experts from a low-bit copy; these experts are already int4"):
        offloaded_experts(int4, 0.5, 0.5, policy=policy_for("lru", None), miss_format=build_format(INT4))
    assert cli_error(capsys, ["generate", "--budget", "0.3", "--miss-format", "dense", "--prompt-ids", "1,2"]) == (
        "cache.miss_format: dense is the experts themselves; name a low-bit format (int4, int8, …)")
    assert cli_error(capsys, ["generate", "--budget", "0.3", "--miss-format", "int4", "cache.miss_format.group_size=48",
                              "--prompt-ids", "1,2"]) == (
        "cache.miss_format: int4 group size 48 does not divide the experts' hidden size 128")


def test_simulate_reads_a_miss_format_from_a_run_config_and_the_configurator_prices_it(capsys, models, checkpoint_dir, tmp_path):
    import json

    from moepic.cli import main
    from moepic.tracing.trace import save_trace

    _, trace = dense_run(models["mixtral"], PROMPT, 6)
    save_trace(trace, tmp_path / "run.npz")
    reports = {}
    for miss in ("", "  miss_format: {name: int4, group_size: 16}\n"):
        (tmp_path / "run.yaml").write_text("cache:\n  theta: 1.0\n  policy: {name: lru}\n" + miss, encoding="utf-8")
        argv = ["simulate", "--trace", str(tmp_path / "run.npz"), "--model", str(checkpoint_dir("mixtral")), "--hardware", "a6000",
                "--budget", "0.5", "--config", str(tmp_path / "run.yaml"), "--json"]
        assert main(argv) == 0
        reports[bool(miss)] = json.loads(capsys.readouterr().out)
    plain, low = reports[False], reports[True]
    assert plain["miss_fill_bytes"] == 0 < low["miss_fill_bytes"]
    assert low["misses"] == plain["misses"] and low["demand_bytes"] < plain["demand_bytes"]

    from moepic.perfmodel.hardware import load_profile
    from moepic.sim.baseline import load_baseline
    from moepic.sim.run import Testbed, run_setup
    from moepic.sim.shapes import model_shape

    testbed = Testbed(trace=trace, shape=model_shape(str(checkpoint_dir("mixtral"))), hw=load_profile("a6000"), budget=0.5,
                      recall=0.8)
    configured = run_setup(attrs.evolve(load_baseline("moepic"), miss_format=build_format(INT4).config), testbed).result
    assert all(l.low_bit_misses for l in configured.layout.layers)
    assert configured.demand_bytes < run_setup(load_baseline("moepic"), testbed).result.demand_bytes


def test_configure_prices_a_miss_format_and_writes_it(capsys, models, checkpoint_dir, tmp_path):
    import json

    import yaml

    from moepic.cli import main
    from moepic.tracing.trace import save_trace

    _, trace = dense_run(models["mixtral"], PROMPT, 6)
    save_trace(trace, tmp_path / "run.npz")
    predicted = {}
    assert cli_error(capsys, ["configure", "--model", str(checkpoint_dir("mixtral")), "--hardware", "a6000", "--budget", "0.3",
                              "--trace", str(tmp_path / "run.npz"), "--miss-format", "int8"]) == (
        "cache.miss_format: int8 group size 64 does not divide the experts' hidden size 32")  # its default knobs
    for miss in ([], ["--miss-format", "fp8"]):
        argv = ["configure", "--model", str(checkpoint_dir("mixtral")), "--hardware", "a6000", "--budget", "0.3",
                "--trace", str(tmp_path / "run.npz"), "--out", str(tmp_path / "c.yaml"), "--json", *miss]
        assert main(argv) == 0
        predicted[bool(miss)] = json.loads(capsys.readouterr().out)["predicted_ms_per_token"]
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["cache"]["miss_format"]["name"] == "fp8"
    assert predicted[True] < predicted[False]  # the same misses move fewer bytes
    assert cli_error(capsys, ["configure", "--model", str(checkpoint_dir("mixtral")), "--hardware", "a6000", "--budget", "0.3",
                              "--trace", str(tmp_path / "run.npz"), "--miss-format", "dense"]) == (
        "cache.miss_format: dense is the experts themselves; name a low-bit format (int4, int8, …)")


def test_compare_runs_every_baseline_with_the_miss_format(capsys, models, checkpoint_dir, tmp_path):
    import json

    from moepic.cli import main
    from moepic.tracing.trace import save_trace

    _, trace = dense_run(models["mixtral"], PROMPT, 6)
    save_trace(trace, tmp_path / "run.npz")
    argv = ["compare", "--trace", str(tmp_path / "run.npz"), "--model", str(checkpoint_dir("mixtral")), "--hardware", "a6000",
            "--budget", "0.5", "--recall", "0.8", "--baselines", "on-demand-lru,moepic", "--json"]
    rows = {}
    for miss in ([], ["--miss-format", "fp8"]):
        assert main(argv + miss) == 0
        rows[bool(miss)] = {r["name"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    for name in ("on-demand-lru", "moepic"):  # (a tiny model on an A6000 is launch-bound: the bytes tell)
        assert rows[True][name]["bytes_loaded_per_token"] < rows[False][name]["bytes_loaded_per_token"]
    assert rows[True]["on-demand-lru"]["miss_fill_bytes"] > 0 == rows[False]["on-demand-lru"]["miss_fill_bytes"]
    assert cli_error(capsys, argv + ["--miss-format", "int3"]) == (
        "--miss-format: unknown expert format 'int3'; known: dense, fp8, gguf, int4, int4-fused, int8, mxfp4")
