"""`--hybrid` and the hybrid baselines on `moepic simulate` and `moepic compare` end to end: a host
profile prices host compute, compare adds the hybrid rows where one is given and says how
moepic-hybrid fares; every mistake is one line."""

from __future__ import annotations

import json
import re

import pytest

from moepic.cli import main
from moepic.sim.baseline import HYBRID_ORDER, ORDER
from tests_support import mixtral_shaped_trace, cli_error


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> str:
    """A small Mixtral-shaped synthetic trace (32 MoE layers, 8 experts, top-2): at a quarter of the
    expert bytes most routed experts miss."""
    return mixtral_shaped_trace(tmp_path_factory.mktemp("hybrid_trace"))


def _argv(command: str, trace: str, *more: str) -> list[str]:
    return [command, "--trace", trace, "--model", "mixtral-8x7b", "--hardware", "a6000", "--budget", "0.25", "--recall", "0.85",
            *more]


def _output(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def _json(capsys, argv) -> dict:
    return json.loads(_output(capsys, [*argv, "--json"]))


# --- mistakes ---------------------------------------------------------------------------------------------


def test_an_unknown_hybrid_mode_is_one_line_naming_the_modes(capsys, trace):
    message = cli_error(capsys, _argv("simulate", trace, "--baseline", "moepic", "--hybrid", "banana"))
    assert message == "simulate: argument --hybrid: expected one of off, auto, host-only, got 'banana'"


@pytest.mark.parametrize("mode", ["auto", "host-only"])
def test_a_hybrid_mode_without_a_host_is_one_line_asking_for_host(capsys, trace, mode):
    message = cli_error(capsys, _argv("simulate", trace, "--baseline", "moepic", "--hybrid", mode))
    assert message.startswith(f"--hybrid {mode} computes experts on the host CPU: give --host NAME|FILE")
    assert "desktop-ddr5" in message  # the bundled hosts are named


def test_a_hybrid_baseline_without_a_host_is_one_line_asking_for_host(capsys, trace):
    assert cli_error(capsys, _argv("compare", trace, "--baselines", "fiddler")).startswith(
        "baseline fiddler computes experts on the host CPU (hybrid auto): give --host NAME|FILE (bundled: ")
    assert cli_error(capsys, _argv("simulate", trace, "--baseline", "ktransformers")).startswith(
        "ktransformers computes experts on the host CPU (hybrid host-only): give --host NAME|FILE")
    assert "give --host" in cli_error(capsys, _argv("simulate", trace, "--baseline", "ktransformers"))


# --- simulate ------------------------------------------------------------------------------------------------


def test_simulate_moepic_hybrid_hosts_misses_and_reports_it(capsys, trace):
    report = _json(capsys, _argv("simulate", trace, "--baseline", "moepic-hybrid", "--host", "desktop-ddr5"))
    assert report["hybrid"] == "auto" and report["host"] == "desktop-ddr5"
    assert report["misses"] > 0 and report["host_experts"] > 0
    assert report["host_experts"] + report["host_bottoms"] <= report["misses"] + report["partial_hits"]
    assert report["host_ms_per_token"] > 0 and 0 <= report["host_wait_ms_per_token"] <= report["ms_per_token"]
    assert sum(layer["host_experts"] for layer in report["layers"]) == report["host_experts"]


def test_the_hybrid_flag_replaces_the_setups_own_mode(capsys, trace):
    copy_only = _json(capsys, _argv("simulate", trace, "--baseline", "moepic", "--host", "desktop-ddr5"))
    assert copy_only["hybrid"] == "off" and copy_only["host_experts"] == copy_only["host_bottoms"] == 0
    host_only = _json(capsys, _argv("simulate", trace, "--baseline", "moepic", "--host", "desktop-ddr5", "--hybrid", "host-only"))
    assert host_only["hybrid"] == "host-only" and host_only["demand_bytes"] == 0
    assert host_only["host_experts"] == host_only["misses"] > 0
    # And off turns a hybrid baseline into a copy-only run.
    off = _json(capsys, _argv("simulate", trace, "--baseline", "moepic-hybrid", "--host", "desktop-ddr5", "--hybrid", "off"))
    assert off["hybrid"] == "off" and off["host_experts"] == 0


# --- compare ---------------------------------------------------------------------------------------------------

_HYBRID_LINE = re.compile(r"^moepic-hybrid: (\d+\.\d\d)× copy-only moepic, (\d+\.\d\d)× the best hybrid baseline \(([a-z-]+)\)$")


def test_compare_with_a_host_adds_the_hybrid_rows_and_ends_with_how_moepic_hybrid_fares(capsys, trace):
    lines = _output(capsys, _argv("compare", trace, "--host", "desktop-ddr5")).rstrip("\n").splitlines()
    names = [line.split()[0] for line in lines[2 : 2 + len(ORDER) + len(HYBRID_ORDER)]]
    assert names == list(ORDER + HYBRID_ORDER)
    assert lines[-1] == "host: desktop-ddr5"
    found = _HYBRID_LINE.match(lines[-2])
    assert found, lines[-2]
    assert found[3] in HYBRID_ORDER and found[3] != "moepic-hybrid"


def test_compare_without_a_host_runs_no_hybrid_row(capsys, trace):
    report = _json(capsys, _argv("compare", trace))
    assert [r["name"] for r in report["rows"]] == list(ORDER)
    assert report["hybrid"] is None and report["host"] is None
    assert all(r["hybrid"] == "off" and r["host_experts"] == 0 for r in report["rows"])
    text = _output(capsys, _argv("compare", trace, "--baselines", "moepic,cache-only"))
    assert "moepic-hybrid" not in text and "host:" not in text


def test_compare_json_carries_moepic_hybrid_against_copy_only_moepic_and_the_best_hybrid_baseline(capsys, trace):
    report = _json(capsys, _argv("compare", trace, "--host", "desktop-ddr5"))
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == list(ORDER + HYBRID_ORDER)
    assert [rows[n]["hybrid"] for n in HYBRID_ORDER] == ["auto", "host-only", "host-only", "auto", "auto"]
    assert all(rows[n]["hybrid"] == "off" for n in ORDER)
    hybrid = report["hybrid"]
    assert set(hybrid) == {"vs_moepic", "best_hybrid_baseline", "vs_best_hybrid_baseline"}
    ms = {n: r["ms_per_token"] for n, r in rows.items()}
    others = {n: ms[n] for n in HYBRID_ORDER if n != "moepic-hybrid"}
    assert hybrid["best_hybrid_baseline"] == min(others, key=others.get)
    assert hybrid["vs_moepic"] == pytest.approx(ms["moepic-hybrid"] / ms["moepic"])
    assert hybrid["vs_best_hybrid_baseline"] == pytest.approx(ms["moepic-hybrid"] / others[hybrid["best_hybrid_baseline"]])
    assert rows["moepic-hybrid"]["vs_moepic"] == pytest.approx(hybrid["vs_moepic"])


def test_compare_without_copy_only_moepic_leaves_that_ratio_out(capsys, trace):
    argv = _argv("compare", trace, "--baselines", "fiddler,moepic-hybrid", "--host", "desktop-ddr5")
    report = _json(capsys, argv)
    assert report["hybrid"]["vs_moepic"] is None and report["hybrid"]["best_hybrid_baseline"] == "fiddler"
    lines = _output(capsys, argv).rstrip("\n").splitlines()
    assert re.fullmatch(r"moepic-hybrid: \d+\.\d\d× the best hybrid baseline \(fiddler\)", lines[-2]), lines[-2]
    # Without moepic-hybrid there is nothing to say.
    assert _json(capsys, _argv("compare", trace, "--baselines", "fiddler,hybrimoe", "--host", "desktop-ddr5"))["hybrid"] is None
