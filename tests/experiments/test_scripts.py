"""The four ablation scripts (experiments/ablate_*.py) end to end on their toy grid: records, table,
figures; and a mistake on their command line as one `error:` line."""

from __future__ import annotations

import csv
import json
import math
from math import prod

import pytest

from moepic.structure import structure
from moepic.experiments.ablation import ENGINE_WORKLOAD, main, run
from moepic.experiments.config import ExperimentConfig
from moepic.experiments.backends import shape_of

from experiments_support import BASE, SCRIPTS, load_script

PNG = b"\x89PNG\r\n\x1a\n"
ONLINE = ("lru", "lfu", "lcp")


def _argv(out, *more: str) -> list[str]:
    return ["--toy", "--workers", "1", "--no-progress", "--out", str(out), *more]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """name → (the script's module, its Report, its output folder), each run once on its toy grid."""
    done = {}

    def get(name: str):
        if name not in done:
            script = load_script(name)
            out = tmp_path_factory.mktemp(f"ablate_{name}")
            with pytest.MonkeyPatch.context() as mp:  # where the predictors script trains its mlp
                mp.setenv("MOEPIC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
                done[name] = script, run(script.ABLATION, BASE, _argv(out), default_out=out), out
        return done[name]

    return get


def _toy_keys(ablation) -> list[dict]:
    axes = ablation.grid(toy=True)
    keys = [{}]
    for axis in axes:
        keys = [{**key, axis.name: level.label} for key in keys for level in axis.levels]
    return [key for key in keys if ablation.keep is None or ablation.keep(key)]


def _results(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _table_rows(table: str, axes: list[str]) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with the axes."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| " + " | ".join(axes) + " |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _same_label(text: str, label) -> bool:
    return float(text) == label if isinstance(label, (int, float)) else text == str(label)


@pytest.mark.parametrize("name", SCRIPTS)
def test_one_record_per_cell_of_the_toy_grid(toy, name):
    script, report, out = toy(name)
    records = _results(out)
    keys = _toy_keys(script.ABLATION)
    assert len(records) == len(keys) <= prod(len(axis.levels) for axis in script.ABLATION.grid(toy=True))
    assert [r["key"] for r in records] == keys
    assert [r["cell"] for r in records] == list(range(len(keys)))
    assert all(r["script"] == script.ABLATION.name and r["backend"] == "sim" for r in records)
    assert records == json.loads(json.dumps(report.records))  # the file holds what run returned


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_record_has_a_finite_positive_latency_and_one_row_per_moe_layer(toy, name):
    _, _, out = toy(name)
    for record in _results(out):
        config = structure(ExperimentConfig, record["config"])
        ms = record["metrics"]["ms_per_token"]
        assert isinstance(ms, float) and math.isfinite(ms) and ms > 0
        moe_layers = shape_of(config.workload).spec.moe_layers
        assert [row["layer"] for row in record["layers"]] == list(moe_layers)
        workload = config.workload
        if workload.source == "synthetic":  # the toy trace was simulated
            assert len(moe_layers) == 32  # the base's mixtral-8x7b
            assert 0 < record["metrics"]["tokens"] <= workload.synthetic.tokens
        else:  # recorded: the decode tokens of the toy requests
            assert workload.source == "recorded"
            assert record["metrics"]["tokens"] == workload.recorded.requests * (workload.recorded.new_tokens - 1)
        assert record["system"] == config.system


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_recorded_config_is_the_cells_config(toy, name):
    script, _, out = toy(name)
    for record in _results(out):
        config = structure(ExperimentConfig, record["config"])
        for axis in script.ABLATION.grid(toy=True):
            if axis.name == "system":
                assert config.system == record["key"]["system"]
            elif axis.name == "budget":
                assert config.cache.budget == record["key"]["budget"]
            elif axis.name == "theta":
                assert config.cache.theta == record["key"]["theta"]
            elif axis.name == "policy":  # "learned-generic" is learned with its built-in model, "learned" with a file
                assert config.cache.policy.name == record["key"]["policy"].split("-")[0] == record["metrics"]["policy"]
                if config.cache.policy.name == "learned":
                    assert (config.cache.policy.path is None) == (record["key"]["policy"] == "learned-generic")
            elif axis.name == "configurator":  # "uniform-whole" is uniform at θ 1
                assert record["key"]["configurator"].split("-")[0] == config.configurator.name
                if record["key"]["configurator"] == "uniform-whole":
                    assert config.configurator.theta == 1.0
            elif axis.name == "link":
                assert config.workload.link_gbps == script.LINKS[record["key"]["link"]]
            elif axis.name == "predictor":
                assert config.cache.predictor.name == record["key"]["predictor"]
            elif axis.name == "horizon":
                assert getattr(config.cache.predictor, "horizon", 1) == record["key"]["horizon"]
            elif axis.name == "batch":
                assert config.workload.batch == record["key"]["batch"] == record["metrics"]["batch"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_listed_figures_exist_and_are_pngs(toy, name):
    _, report, out = toy(name)
    listed = json.loads((out / "figures.json").read_text())
    assert listed and listed == [str(f.relative_to(out)) for f in report.figures]
    for figure in listed:
        data = (out / figure).read_bytes()
        assert data.startswith(PNG) and len(data) > len(PNG)


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_table_has_a_row_per_cell_and_the_csv_a_line_per_cell(toy, name):
    script, report, out = toy(name)
    records = _results(out)
    text = (out / "table.md").read_text()
    assert text.startswith(script.ABLATION.title + "\n") and report.table in text
    axes = [axis.name for axis in script.ABLATION.grid(toy=True)]  # results.jsonl sorts each key's axes
    rows = _table_rows(text, axes)
    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        assert all(_same_label(cell, record["key"][axis]) for cell, axis in zip(row, axes)), row
    with (out / "results.csv").open(newline="") as f:
        assert [int(r["cell"]) for r in csv.DictReader(f)] == [r["cell"] for r in records]


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_ratio_columns_reference_cells_read_exactly_one(toy, name):
    script, _, out = toy(name)
    axis, level = script.ABLATION.ratio
    records = _results(out)
    axes = [a.name for a in script.ABLATION.grid(toy=True)]
    rows = _table_rows((out / "table.md").read_text(), axes)
    references = [row for row, record in zip(rows, records) if record["key"][axis] == level]
    assert references
    if script.ABLATION.keep is None:  # a full grid: one reference per combination of the other axes
        assert len(references) == len(records) // len(next(a for a in script.ABLATION.grid(toy=True) if a.name == axis).levels)
    assert all(row[-1] == "1.00" for row in references)


def test_belady_hits_at_least_as_often_as_every_online_policy_at_each_budget(toy):
    _, _, out = toy("policies")
    records = {(r["key"]["policy"], r["key"]["budget"]): r for r in _results(out)}
    budgets = {budget for _, budget in records}
    for budget in budgets:
        belady = records["belady", budget]["metrics"]["expert_hit_rate"]
        for policy in ONLINE:
            assert belady >= records[policy, budget]["metrics"]["expert_hit_rate"], (policy, budget)


def test_a_batch_decodes_every_token_of_the_toy_trace_in_fewer_steps(toy):
    """Each batch size simulates the same decode tokens; a batch of B takes fewer, longer steps, and
    its table sets hit rate and throughput side by side for every batch size."""
    _, report, out = toy("batch")
    records = _results(out)
    for record in records:
        metrics = record["metrics"]
        assert metrics["tokens"] == records[0]["metrics"]["tokens"]
        assert metrics["tokens_per_s"] == pytest.approx(metrics["tokens"] / (metrics["ms_per_step"] * 1e-3 * metrics["steps"]))
        if record["key"]["batch"] == 1:
            assert metrics["ms_per_token"] == metrics["ms_per_step"]
        else:
            assert metrics["steps"] < metrics["tokens"] and metrics["ms_per_step"] > 0
    assert "| policy | budget | B=1 | B=4 |" in report.table


def test_the_engine_backend_refuses_a_batch(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(load_script("batch").ABLATION, BASE, _argv(tmp_path, "--backend", "engine", "engine.repeats=1"), default_out=tmp_path)
    assert "workload.batch and workload.stream_tokens are the simulator's" in capsys.readouterr().err


def test_the_theta_ends_of_the_sweep(toy):
    _, _, out = toy("theta")
    by_theta = {r["key"]["theta"]: r for r in _results(out)}
    # θ = 0 caches nothing: no hits, no cache bytes.
    assert by_theta[0.0]["metrics"]["expert_hit_rate"] == 0
    assert all(row["cache_mib"] == 0 and row["hit_rate"] == 0 for row in by_theta[0.0]["layers"])
    assert all(row["theta"] == 1.0 for row in by_theta[1.0]["layers"])


def test_main_prints_the_table_and_where_it_wrote(tmp_path, capsys):
    script = load_script("theta")
    report = main(script.ABLATION, BASE, _argv(tmp_path), default_out=tmp_path)
    out = capsys.readouterr().out
    assert out.startswith(report.table + "\n")
    assert f"wrote {tmp_path}/: results.jsonl, results.csv, table.md, " in out
    assert all(f.name in out for f in report.figures)


@pytest.mark.parametrize(("override", "named"), [
    ("cache.policy.name=lfuu", ["cache.policy.name", "'lfuu'", "known: ", "lcp", "lfu", "lru"]),
    ("cache.policy.rhoo=0.5", ["cache.policy.rhoo", "known keys here: rho, window"]),
    ("workload.hardwaree=a6000", ["workload.hardwaree", "known keys here: ", "model_shape"]),
])
def test_main_reports_a_bad_override_as_one_error_line(tmp_path, capsys, override, named):
    script = load_script("theta")  # no policy axis: a cell's own level would replace the policy override
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(script.ABLATION, BASE, _argv(tmp_path / "out", override), default_out=tmp_path)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert all(text in err for text in named), err
    assert not (tmp_path / "out").exists()  # failed before anything ran


def test_main_reports_an_unknown_system_as_one_error_line(tmp_path, capsys):
    script = load_script("policies")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(script.ABLATION, BASE, _argv(tmp_path, "--system", "adapmo"), default_out=tmp_path)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown baseline 'adapmo'; known: ") and err.count("\n") == 1


def test_the_configurator_ablation_runs_on_a_system_with_configurator_knobs(tmp_path):
    script = load_script("configurator")
    report = run(script.ABLATION, BASE, _argv(tmp_path, "--system", "adapmoe"), default_out=tmp_path)
    assert report.records and all(r["metrics"]["ms_per_token"] > 0 for r in report.records)
    assert {r["config"]["configurator"]["name"] for r in report.records} == {"uniform", "moepic", "dp"}


def test_predictors_ahead_name_at_least_what_one_layer_ahead_names(toy):
    """Recall counts the union of what every earlier layer named, so a deeper horizon never lowers
    it; the oracle is always right; a predictor costs time per layer ahead."""
    _, _, out = toy("predictors")
    records = {(r["key"]["predictor"], r["key"]["horizon"]): r["metrics"] for r in _results(out)}
    assert records["none", 1]["prediction_recall"] is None and records["none", 1]["predictor_ms_per_token"] == 0
    for name in ("gate_lookahead", "mlp", "oracle"):
        one, two = records[name, 1], records[name, 2]
        assert two["prediction_recall"] >= one["prediction_recall"]
        assert two["predictor_ms_per_token"] > one["predictor_ms_per_token"] > 0
    assert records["oracle", 1]["prediction_recall"] == records["oracle", 2]["prediction_recall"] == 1.0


def test_the_engine_backend_counts_what_the_simulator_counts_on_the_same_requests(tmp_path):
    """`--backend engine` runs the recorded requests through the real engine (tokens checked against
    the dense model's); without prediction nothing depends on timing, so its hit rates and bytes
    equal the simulator's on the same recorded routing, cell by cell."""
    script = load_script("policies")
    small = ["workload.recorded.requests=2", "workload.recorded.prompt_tokens=8", "workload.recorded.new_tokens=5",
             "engine.repeats=1", "cache.predictor.name=none"]
    engine = run(script.ABLATION, BASE, _argv(tmp_path / "engine", "--backend", "engine", *small), default_out=tmp_path)
    sim = run(script.ABLATION, BASE, _argv(tmp_path / "sim", *ENGINE_WORKLOAD, *small), default_out=tmp_path)
    assert len(engine.records) == len(sim.records) == len(_toy_keys(script.ABLATION))
    for e, s in zip(engine.records, sim.records):
        assert e["backend"] == "engine" and s["backend"] == "sim" and e["key"] == s["key"]
        assert e["metrics"]["exact"] is True and e["metrics"]["ms_per_token"] > 0
        for metric in ("expert_hit_rate", "mib_loaded_per_token", "tokens", "cache_mib"):
            assert e["metrics"][metric] == pytest.approx(s["metrics"][metric], rel=1e-12), (e["key"], metric)
        assert [r["hit_rate"] for r in e["layers"]] == [r["hit_rate"] for r in s["layers"]]


def test_the_engine_backend_refuses_a_simulated_link(tmp_path, capsys):
    script = load_script("hardware")
    with pytest.raises(SystemExit):
        main(script.ABLATION, BASE, _argv(tmp_path, "--backend", "engine", "engine.repeats=1"), default_out=tmp_path)
    assert "workload.link_gbps rescales a simulated GPU's link" in capsys.readouterr().err


def test_a_hybrid_system_runs_in_the_simulator_backend_with_workload_host(tmp_path, capsys):
    """A hybrid system (some experts on the host CPU) needs the host priced: `workload.host` names
    it, and each record says where the loads ran; without one, one line says so."""
    script = load_script("policies")
    done = run(script.ABLATION, BASE, _argv(tmp_path / "hybrid", "--system", "fiddler", "workload.host=desktop-ddr5"),
               default_out=tmp_path)
    assert done.records and all(r["metrics"]["hybrid"] == "auto" for r in done.records)
    assert any(r["metrics"]["host_ms_per_token"] > 0 for r in done.records)
    with pytest.raises(SystemExit):
        main(script.ABLATION, BASE, _argv(tmp_path / "no-host", "--system", "fiddler"), default_out=tmp_path)
    assert "describes no host CPU; give one (--host NAME|FILE, or workload.host in an experiment config)" in capsys.readouterr().err
