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
    path.write_text("cache:\n  budget: 0.5\n  theta: [0.25, 0.5, 1.0]\n  policy: {name: lcp, rho: 0.5, window: 16}\n")
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
        (["--budget", "0.5", "--theta", "1.5"], "cache.theta: each value must be in [0, 1], got 1.5"),
        (["--budget", "0.5", "--theta", "half"], "argument --theta: expected a number or comma-separated numbers"),
        (["--budget", "0.5", "--policy", "fifo"], f"config key cache.policy.name: unknown policy 'fifo'; known: {known_policies()}"),
        (["--budget", "0.5", "--policy", "lru", "cache.policy.rho=0.5"], "unknown config key cache.policy.rho; this node takes no other keys"),
        (["--budget", "0.5", "cache.policy.rho=2"], "cache.policy.rho must be in (0, 1], got 2.0"),
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
        (["--token-log", "t.jsonl"], "generate.token_log logs what each token copies: it needs an offloaded run (--budget)"),
        (["--budget", "0.5", "--token-log", "/nowhere/t.jsonl"], "/nowhere/t.jsonl: cannot write the token log"),
        (["--budget", "0.5", "--link-gbps", "0"], "cache.link_gbps must be > 0, got 0.0"),
        (["--budget", "0.5", "--predictor", "crystal"], "unknown predictor 'crystal'; known: gate_lookahead, mlp, noisy_oracle, none, oracle"),
        (["--budget", "0.5", "--predictor", "oracle"], "the oracle predictor needs the future: set predictor.trace=FILE"),
        (["--budget", "0.5", "--predictor", "gate_lookahead", "--horizon", "0"], "predictor.horizon must be >= 1, got 0"),
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
    assert report["cache"]["predictor"] == {"name": "gate_lookahead", "candidates": None, "horizon": 2, "tap": "router_input"}
