"""`moepic generate --hybrid`: loads computed on the host keep the dense run's greedy tokens, the
report carries the host counters, and every mistake is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from moepic.cli import main
from tests_support import cli_error

GREEDY = ["generate", "--json", "--greedy", "--prompt-ids", "1,2,3,4,5,6", "--max-new-tokens", "8"]
HOST_KEYS = ("host_experts", "host_bottoms", "host_bytes", "fill_bytes", "host_s", "decode_host_s_per_token",
             "layer_host_experts", "layer_host_bottoms", "layer_host_s")


@pytest.fixture
def mixtral(checkpoint_dir):
    return str(checkpoint_dir("mixtral"))


def _run(capsys, argv) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def test_host_only_run_generates_the_dense_tokens_and_reports_what_the_host_computed(capsys, mixtral):
    dense, _ = _run(capsys, [*GREEDY, "--model", mixtral])
    hybrid, _ = _run(capsys, [*GREEDY, "--model", mixtral, "--budget", "0.5", "--hybrid", "host-only"])
    assert hybrid["token_ids"] == dense["token_ids"]
    stats = hybrid["stats"]
    assert all(key in stats for key in HOST_KEYS)
    assert stats["host_experts"] > 0 and stats["demand_bytes"] == 0
    assert hybrid["cache"]["hybrid"] == "host-only"


def test_copy_only_run_reports_the_host_counters_as_zero(capsys, mixtral):
    report, _ = _run(capsys, [*GREEDY, "--model", mixtral, "--budget", "0.5"])
    assert report["cache"]["hybrid"] == "off"
    assert report["stats"]["host_experts"] == report["stats"]["host_bottoms"] == report["stats"]["fill_bytes"] == 0


def test_auto_on_a_cpu_prices_with_the_emulated_link_and_says_so(capsys, mixtral):
    dense, _ = _run(capsys, [*GREEDY, "--model", mixtral])
    report, err = _run(capsys, [*GREEDY, "--model", mixtral, "--budget", "0.5", "--hybrid", "auto", "--link-gbps", "0.001"])
    assert report["token_ids"] == dense["token_ids"]
    assert err.count("moepic: note: hybrid auto prices with host measured now") == 1
    assert "link 0.0 GB/s" in err
    # A 1 MB/s link is far slower than any host, even one measured on a busy machine (a hand-off
    # measured at milliseconds): every load is computed there.
    assert report["stats"]["demand_bytes"] == 0 and report["stats"]["host_bytes"] == report["stats"]["bytes_loaded"]


def test_plain_output_says_what_the_host_computed(capsys, mixtral):
    capsys.readouterr()
    assert main(["generate", "--model", mixtral, "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--budget", "0.5",
                 "--hybrid", "host-only"]) == 0
    assert "host computed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--budget", "0.5", "--hybrid", "banana"], "generate: argument --hybrid: expected one of off, auto, host-only, got 'banana'"),
        (["--budget", "0.5", "--hybrid", "host-only", "--host-threads", "0"],
         "generate: argument --host-threads: expected an integer in [1, 4096], got '0'"),
        (["--budget", "0.5", "--hybrid", "auto", "--host", "desktop-ddr5"],
         "cache.host (--host) is for a CUDA device; on 'cpu' the host is the device (priced by measuring it)"),
        (["--budget", "0.5", "--hybrid", "host-only", "--host-threads", "2"],
         "cache.host_threads (--host-threads) is for a CUDA device; on 'cpu' the host is the device (torch's threads)"),
        (["--hybrid", "auto"], "cache.hybrid (--hybrid) needs cache.budget (--budget): with every expert resident nothing is loaded"),
        (["--budget", "0.5", "--host", "desktop-ddr5"],
         "cache.host (--host) has no effect with cache.hybrid off (--hybrid): it is for --hybrid auto"),
        (["--budget", "0.5", "--hybrid", "host-only", "--host", "desktop-ddr5"],
         "cache.host (--host) has no effect with cache.hybrid host-only (--hybrid): it is for --hybrid auto"),
        (["--budget", "0.5", "--host-threads", "2"],
         "cache.host_threads (--host-threads) has no effect with cache.hybrid off (--hybrid): it is for --hybrid auto or host-only"),
        (["--budget", "0.5", "cache.hybrid=banana"], "cache.hybrid"),
    ],
)
def test_hybrid_mistakes_are_one_line_and_write_nothing(capsys, mixtral, tmp_path, argv, message):
    outputs = ["--record-trace", str(tmp_path / "t.npz"), "--token-log", str(tmp_path / "log.jsonl")]
    assert message in cli_error(capsys, [*GREEDY, "--model", mixtral, *outputs, *argv])
    assert list(tmp_path.iterdir()) == []
