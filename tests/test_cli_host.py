"""`--host` on the commands that take `--hardware` (configure, simulate, compare): the host profile
is read, checked and carried into each report's `host` field, and the text says plainly that it is
not used yet; mistakes are one line."""

from __future__ import annotations

import json

import pytest
import yaml

from moepic.cli import main
from moepic.perfmodel.hardware import known_hosts, load_host, load_profile
from tests_support import mixtral_shaped_trace, cli_error

@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> str:
    """A small Mixtral-shaped synthetic trace (32 MoE layers, 8 experts, top-2)."""
    return mixtral_shaped_trace(tmp_path_factory.mktemp("host_trace"))


def _argv(command: str, trace: str, *more: str) -> list[str]:
    budget = ["--budget", "0.25"]
    which = {"simulate": ["--baseline", "moepic", "--recall", "0.85"], "compare": ["--baselines", "moepic,cache-only", "--recall", "0.85"],
             "configure": ["--predictor", "none"]}[command]
    return [command, "--trace", trace, "--model", "mixtral-8x7b", "--hardware", "a6000", *budget, *which, *more]


def _output(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["configure", "simulate", "compare"])
def test_host_profile_is_carried_into_the_json_report(capsys, trace, command):
    report = json.loads(_output(capsys, _argv(command, trace, "--host", "desktop-ddr5", "--json")))
    assert (report["hardware"], report["host"]) == ("a6000", "desktop-ddr5")
    without = json.loads(_output(capsys, _argv(command, trace, "--json")))
    assert without["host"] is None
    # Not yet used by the latency model: the numbers are those of the run without it.
    ms = lambda r: r["predicted_ms_per_token"] if command == "configure" else [row["ms_per_token"] for row in r.get("rows", [r])]
    assert ms(report) == ms(without)


def test_host_given_as_a_file_is_carried_by_its_name(capsys, trace, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(load_host("server-amx").as_dict() | {"name": "my-server"}))
    report = json.loads(_output(capsys, _argv("simulate", trace, "--host", str(path), "--json")))
    assert report["host"] == "my-server"


def test_a_hardware_yaml_with_a_host_section_carries_it_without_the_flag(capsys, trace, tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(load_profile("a6000").as_dict() | {"name": "box", "host": "workstation-ddr5"}))
    argv = _argv("simulate", trace, "--json")
    argv[argv.index("a6000")] = str(path)
    assert json.loads(_output(capsys, argv))["host"] == "workstation-ddr5"
    # --host replaces it.
    assert json.loads(_output(capsys, [*argv, "--host", "server-amx"]))["host"] == "server-amx"


def test_simulate_text_names_the_host_profile(capsys, trace):
    out = _output(capsys, _argv("simulate", trace, "--host", "desktop-ddr5"))
    assert out.rstrip("\n").splitlines()[-1] == "host: desktop-ddr5"
    assert "host:" not in _output(capsys, _argv("simulate", trace))


@pytest.mark.parametrize("command", ["configure", "simulate", "compare"])
def test_unknown_host_name_lists_the_known_ones(capsys, trace, command):
    message = cli_error(capsys, _argv(command, trace, "--host", "no-such-cpu", "--json"))
    assert message.startswith("unknown host profile 'no-such-cpu'; known: ")
    assert all(name in message for name in known_hosts())


def test_bad_host_file_is_one_line_naming_file_and_key(capsys, trace, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(load_host("desktop-ddr5").as_dict() | {"memory_gbps": -1}))
    message = cli_error(capsys, _argv("simulate", trace, "--host", str(path), "--json"))
    assert message == f"{path}: memory_gbps: expected a number in (0, 10000], got -1"


def test_host_with_a_cpu_hardware_profile_is_refused(capsys, trace, tmp_path):
    path = tmp_path / "cpu.yaml"
    path.write_text(yaml.safe_dump(load_profile("a6000").as_dict() | {"name": "cpu-box", "device": "cpu"}))
    argv = _argv("simulate", trace, "--host", "desktop-ddr5", "--json")
    argv[argv.index("a6000")] = str(path)
    assert "--host desktop-ddr5: the hardware profile 'cpu-box' is a CPU" in cli_error(capsys, argv)
