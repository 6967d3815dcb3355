"""`moepic generate` with a cache budget: same tokens as the dense run, cache stats in the report,
and every offloading mistake as one line."""

from __future__ import annotations

import json

import pytest

from moepic.cli import main
from moepic.policies import known_policies
from tests_support import cli_error

GREEDY = ["generate", "--json", "--greedy", "--prompt-ids", "1,2,3,4,5,6", "--max-new-tokens", "10"]
CACHE_KEYS = ("expert_hit_rate", "bytes_loaded", "bytes_loaded_per_token", "cache_bytes", "staging_bytes", "layer_hit_rates")


@pytest.fixture
def mixtral(checkpoint_dir):
    return str(checkpoint_dir("mixtral"))


def _run(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("policy", ["lru", "lfu", "lcp", "random"])
def test_offloaded_run_generates_the_dense_tokens_and_reports_cache_stats(capsys, mixtral, policy):
    dense = _run(capsys, [*GREEDY, "--model", mixtral])
    offloaded = _run(capsys, [*GREEDY, "--model", mixtral, "--budget", "0.6", "--theta", "0.5", "--policy", policy])
    assert offloaded["token_ids"] == dense["token_ids"]
    stats = offloaded["stats"]
    assert all(key in stats for key in CACHE_KEYS) and not any(key in dense["stats"] for key in CACHE_KEYS)
    assert 0 <= stats["expert_hit_rate"] <= 1 and stats["bytes_loaded"] > 0
    assert offloaded["cache"]["policy"]["name"] == policy


def test_static_and_belady_read_the_trace_of_a_dense_run(capsys, mixtral, tmp_path):
    trace = tmp_path / "run.npz"
    dense = _run(capsys, [*GREEDY, "--model", mixtral, "--record-trace", str(trace)])
    rates = {}
    for policy in ("lru", "static", "belady"):
        key = {"static": "profile", "belady": "trace"}.get(policy)
        extra = [f"cache.policy.{key}={trace}"] if key else []
        report = _run(capsys, [*GREEDY, "--model", mixtral, "--budget", "0.5", "--theta", "1", "--policy", policy, *extra])
        assert report["token_ids"] == dense["token_ids"]
        rates[policy] = report["stats"]["expert_hit_rate"]
    assert rates["belady"] >= max(rates["lru"], rates["static"])


def test_yaml_cache_section_drives_the_run(capsys, mixtral, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("cache:\n  budget: 0.5\n  theta: [0.0, 0.5, 1.0]\n  policy: {name: lcp, rho: 0.5, window: 16}\n")
    report = _run(capsys, [*GREEDY, "--model", mixtral, "--config", str(path)])
    assert report["cache"]["policy"] == {"name": "lcp", "rho": 0.5, "window": 16.0}
    assert report["stats"]["theta"] == [0.0, 0.3333333333333333, 1.0]  # F = 48 in blocks of 16


def test_plain_output_shows_the_hit_rate_and_bytes_per_token(capsys, mixtral):
    capsys.readouterr()
    assert main(["generate", "--model", mixtral, "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--budget", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "lcp hit rate" in err and "MiB/token loaded" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--budget", "1KB"], "cache.budget '1KB' is 0.00 MiB (1000 bytes), below the minimum working set of"),
        (["--budget", "lots"], "cache.budget: expected bytes (512MiB, 2GB) or a fraction (0.25, 25%), got 'lots'"),
        (["--budget", "2PB"], "cache.budget: unknown unit 'pb'"),
        (["--budget", "150%"], "cache.budget: a percentage must be at most 100%"),
        (["--budget", "0.5,0.5"], "cache.budget: expected one value per MoE layer (3), got 2"),
        (["--budget", "0.5", "--theta", "0.5,0.5"], "cache.theta: expected one value per MoE layer (3), got 2"),
        (["--budget", "0.5", "--theta", "1.5"], "config key cache.theta: expected a number in [0, 1], got 1.5"),
        (["--budget", "0.5", "--theta", "0.2"], "cache.theta 0.2 rounds down to 0 (whole 16-neuron blocks of 48 neurons: 0, 0.333, 0.667, 1), which caches nothing: give 0 for no cache or at least 0.333"),
        (["--budget", "1e400"], "cache.budget: expected a size of at most 1 PiB (1125899906842624 bytes), got '1e400'"),
        (["--budget", "-0.5"], "cache.budget: expected bytes (512MiB, 2GB) or a fraction (0.25, 25%), got '-0.5'"),
        (["--budget", "0.5", "--theta", "half"], "argument --theta: expected a number or comma-separated numbers"),
        (["--budget", "0.5", "--policy", "fifo"], f"config key cache.policy.name: unknown policy 'fifo'; known: {known_policies()}"),
        (["--budget", "0.5", "--policy", "lru", "cache.policy.rho=0.5"], "unknown config key cache.policy.rho; this node takes no other keys"),
        (["--budget", "0.5", "cache.policy.rho=2"], "config key cache.policy.rho: expected a number in (0, 1], got 2.0"),
        (["--budget", "0.5", "cache.policy.window=.nan"], "config key cache.policy.window: expected a number in (0, 16777216], got nan"),
        (["--budget", "0.5", "--policy", "static"], "the static policy needs a routing profile: set cache.policy.profile=FILE"),
        (["--budget", "0.5", "--policy", "belady"], "the belady policy needs the future: set cache.policy.trace=FILE"),
        (["--budget", "0.5", "--policy", "belady", "cache.policy.trace=/nowhere.npz"], "/nowhere.npz: trace file not found"),
    ],
)
def test_offloading_mistakes_are_one_line(capsys, mixtral, argv, message):
    assert message in cli_error(capsys, [*GREEDY, "--model", mixtral, *argv])


def test_belady_with_a_trace_of_another_model_is_named(capsys, mixtral, checkpoint_dir, tmp_path):
    trace = tmp_path / "qwen.npz"
    _run(capsys, [*GREEDY, "--model", str(checkpoint_dir("qwen2_moe")), "--record-trace", str(trace)])
    message = cli_error(capsys, [*GREEDY, "--model", mixtral, "--budget", "0.5", "--policy", "belady", f"cache.policy.trace={trace}"])
    assert message.startswith(f"{trace}: trace has MoE layers [0, 2] with 6 experts; the model's layer 0 has 4")


def test_token_log_has_one_line_per_token_with_its_copies(capsys, mixtral, tmp_path):
    log = tmp_path / "tokens.jsonl"
    report = _run(capsys, [*GREEDY, "--model", mixtral, "--budget", "0.5", "--predictor", "gate_lookahead", "--token-log", str(log)])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["id"] for line in lines] == report["token_ids"]
    assert [line["token"] for line in lines] == list(range(len(report["token_ids"])))
    stats = report["stats"]
    for key in ("demand_bytes", "prefetch_bytes", "wasted_prefetch_bytes"):
        assert sum(line[key] for line in lines) == stats[key]
    assert all(line["latency_s"] > 0 and line["exposed_copy_s"] >= 0 for line in lines)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--token-log", "t.jsonl"], "generate.token_log (--token-log) has no effect without cache.budget (--budget)"),
        (["--budget", "0.5", "--token-log", "/nowhere/t.jsonl"], "/nowhere/t.jsonl: cannot write the token log"),
        (["--budget", "0.5", "--link-gbps", "0"], "argument --link-gbps: expected a number in (0, 10000], got '0'"),
        (["--budget", "0.5", "--link-gbps", "nan"], "argument --link-gbps: expected a number in (0, 10000], got 'nan'"),
        (["--budget", "0.5", "--predictor", "crystal"], "unknown predictor 'crystal'; known: gate_lookahead, mlp, noisy_oracle, none, oracle"),
        (["--budget", "0.5", "--predictor", "oracle"], "the oracle predictor needs the future: set predictor.trace=FILE"),
        (["--budget", "0.5", "--predictor", "gate_lookahead", "--horizon", "0"], "predictor.horizon must be an integer from 1 to 3 (MoE layers ahead), got 0"),
        (["--budget", "0.5", "--predictor", "gate_lookahead", "--horizon", "9"], "predictor.horizon must be an integer from 1 to 3 (MoE layers ahead), got 9"),
    ],
)
def test_prefetch_mistakes_are_one_line(capsys, mixtral, argv, message):
    assert message in cli_error(capsys, [*GREEDY, "--model", mixtral, *argv])


def test_prefetching_run_reports_recall_and_exposed_copy_time(capsys, mixtral):
    dense = _run(capsys, [*GREEDY, "--model", mixtral])
    report = _run(capsys, [*GREEDY, "--model", mixtral, "--budget", "0.9", "--predictor", "gate_lookahead", "--horizon", "2", "--link-gbps", "5"])
    assert report["token_ids"] == dense["token_ids"]
    stats = report["stats"]
    assert 0 <= stats["prediction_recall"] <= 1 and stats["exposed_copy_s"] >= 0 and stats["decode_s_per_token"] > 0
    assert report["cache"]["predictor"] == {"name": "gate_lookahead", "candidates": None, "horizon": 2, "reads": "router_input"}


# --- keys that the chosen mode ignores, the budget that holds everything, θ rounding, --allow-env ------


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--theta", "0.5"], "cache.theta (--theta)"),
        (["--policy", "lru"], "cache.policy (--policy)"),
        (["--predictor", "gate_lookahead"], "cache.predictor (--predictor)"),
        (["--predictor", "gate_lookahead", "--horizon", "2"], "cache.predictor (--predictor)"),
        (["--link-gbps", "5"], "cache.link_gbps (--link-gbps)"),
        (["cache.overlap_top=true"], "cache.overlap_top"),
        (["--token-log", "t.jsonl"], "generate.token_log (--token-log)"),
    ],
)
def test_a_cache_key_without_a_budget_is_an_error_not_silently_ignored(capsys, mixtral, argv, named):
    message = cli_error(capsys, [*GREEDY, "--model", mixtral, *argv])
    assert message == (
        f"{named} has no effect without cache.budget (--budget): the dense run keeps every expert on the device; "
        "give a budget to offload, or leave it out"
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--budget", "0.5", "--link-latency-us", "5"], "cache.link_latency_us (--link-latency-us) has no effect without cache.link_gbps (--link-gbps): no link is emulated"),
        (["--trace-hidden"], "generate.trace_hidden (--trace-hidden) has no effect without generate.record_trace (--record-trace FILE.npz)"),
    ],
)
def test_a_key_that_needs_another_is_an_error_without_it(capsys, mixtral, argv, message):
    assert cli_error(capsys, [*GREEDY, "--model", mixtral, *argv]) == message


def test_a_budget_that_holds_every_expert_without_theta_is_the_dense_layout(capsys, mixtral):
    dense = _run(capsys, [*GREEDY, "--model", mixtral])
    whole = _run(capsys, [*GREEDY, "--model", mixtral, "--budget", "1"])
    assert whole["token_ids"] == dense["token_ids"]
    assert whole["stats"]["theta"] == [1.0, 1.0, 1.0] and whole["stats"]["staging_bytes"] == 0
    assert whole["stats"]["bytes_loaded"] == 0
    split = _run(capsys, [*GREEDY, "--model", mixtral, "--budget", "1", "--theta", "0.5"])  # given: kept
    assert split["stats"]["staging_bytes"] > 0 and split["stats"]["theta"] != [1.0, 1.0, 1.0]


def test_a_theta_that_rounds_to_another_block_is_noted_once_on_stderr(capsys, mixtral):
    capsys.readouterr()
    assert main([*GREEDY, "--model", mixtral, "--budget", "0.5", "--theta", "0.5"]) == 0
    err = capsys.readouterr().err
    note = "moepic: note: cache.theta 0.5 rounds down to 0.333 (whole 16-neuron blocks of 48 neurons: 0, 0.333, 0.667, 1)\n"
    assert err.count(note) == 1
    assert main([*GREEDY, "--model", mixtral, "--budget", "0.5", "--theta", "1"]) == 0
    assert "moepic: note:" not in capsys.readouterr().err


def test_oc_env_in_generate_needs_allow_env(capsys, mixtral, monkeypatch):
    monkeypatch.setenv("MOEPIC_TEST_DEVICE", "cpu")
    message = cli_error(capsys, [*GREEDY, "--model", mixtral, "model.device=${oc.env:MOEPIC_TEST_DEVICE}"])
    assert "config key model.device" in message and "calls the resolver oc.env" in message and "--allow-env" in message
    assert _run(capsys, [*GREEDY, "--model", mixtral, "--allow-env", "model.device=${oc.env:MOEPIC_TEST_DEVICE}"])["token_ids"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--temperature", "nan"], "argument --temperature: expected a number in (0, 100], got 'nan'"),
        (["--top-p", "inf"], "argument --top-p: expected a number in (0, 1], got 'inf'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer in [1, 1048576], got '0'"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 18446744073709551615], got '-1'"),
        (["--link-latency-us", "-1"], "argument --link-latency-us: expected a number in [0, 1000000], got '-1'"),
    ],
)
def test_a_generate_flag_outside_its_keys_range_names_the_flag(capsys, argv, message):
    assert message in cli_error(capsys, ["generate", *argv])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["configure", "--budget", "0.3", "--hardware", "a6000", "--trace", "t.npz", "--context", "-1"],
         "configure: argument --context: expected an integer in [0, 16777216], got '-1'"),
        (["configure", "--budget", "-0.3", "--hardware", "a6000", "--trace", "missing.npz"],
         "--budget: expected bytes (512MiB, 2GB) or a fraction (0.25, 25%), got '-0.3'"),  # before the trace is read
        (["simulate", "--trace", "missing.npz", "--model", "mixtral-8x7b", "--hardware", "a6000", "--baseline", "moepic",
          "--budget", "1e400"], "--budget: expected a size of at most 1 PiB (1125899906842624 bytes), got '1e400'"),
        (["compare", "--trace", "t.npz", "--model", "mixtral-8x7b", "--hardware", "a6000", "--budget", "0.3",
          "--context", "1e9"], "compare: argument --context: expected an integer in [0, 16777216], got '1e9'"),
        (["profile", "--link-gbps", "inf"], "profile: argument --link-gbps: expected a number in (0, 10000], got 'inf'"),
    ],
)
def test_numeric_flags_of_the_other_commands_are_checked_before_any_file_is_read(capsys, argv, message):
    assert cli_error(capsys, argv) == message
