"""moepic/experiments/executors.py: cells in one process, in a local process pool, or on Ray all give
the same records in cell order; a cell's own error comes back as itself."""

from __future__ import annotations

import pytest

from moepic.experiments.ablation import main, markdown_table
from moepic.experiments.config import ExecutorConfig
from moepic.experiments.executors import run_cells
from moepic.experiments.grid import expand
from moepic.tracing.trace import TraceError

from experiments_support import BASE, load_script, without_timing

POLICIES = load_script("policies").ABLATION


@pytest.fixture(scope="module")
def cells():
    """One cell per policy of the policies script's toy grid (4 cells)."""
    every = expand(BASE, POLICIES.grid(toy=True), [*POLICIES.overrides, *POLICIES.toy])
    per_budget = len(POLICIES.grid(toy=True)[-1].levels)
    return every[::per_budget]


@pytest.fixture(scope="module")
def serial(cells):
    return run_cells(cells, ExecutorConfig(kind="local", workers=1), desc="serial", progress=False)


def _missing_trace_cells(tmp_path):
    missing = tmp_path / "no-such-trace.npz"
    return expand(BASE, POLICIES.grid(toy=True)[:1], [*POLICIES.overrides, f"workload.trace={missing}"])[:2]


def _table(cells, records) -> str:
    return markdown_table(POLICIES, [{"key": cell.key, **record} for cell, record in zip(cells, records)])


def test_cells_run_in_one_process_in_order(cells, serial):
    assert len(cells) == len(POLICIES.grid(toy=True)[0].levels)
    assert [r["metrics"]["policy"] for r in serial] == [c.key["policy"] for c in cells]


def test_a_local_process_pool_gives_the_same_records_in_cell_order(cells, serial):
    pooled = run_cells(cells, ExecutorConfig(kind="local", workers=2), desc="pool", progress=False)
    assert without_timing(pooled) == without_timing(serial)
    assert _table(cells, pooled) == _table(cells, serial)


def test_a_cells_error_in_the_process_pool_is_the_original_exception(tmp_path):
    bad = _missing_trace_cells(tmp_path)
    with pytest.raises(TraceError) as one:
        run_cells(bad, ExecutorConfig(workers=1), desc="serial", progress=False)
    assert str(one.value) == f"{tmp_path / 'no-such-trace.npz'}: trace file not found"
    with pytest.raises(TraceError) as pooled:
        run_cells(bad, ExecutorConfig(workers=2), desc="pool", progress=False)
    assert str(pooled.value) == str(one.value)


# --- Ray: a local instance started by the test ---------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_gives_the_same_table_as_the_local_executor(ray_instance, cells, serial):
    remote = run_cells(cells, ExecutorConfig(kind="ray"), desc="ray", progress=False)
    assert without_timing(remote) == without_timing(serial)
    assert _table(cells, remote) == _table(cells, serial)


def test_a_cells_error_on_ray_is_the_original_exception_with_its_message(ray_instance, tmp_path):
    bad = _missing_trace_cells(tmp_path)
    with pytest.raises(TraceError) as local:
        run_cells(bad, ExecutorConfig(workers=1), desc="serial", progress=False)
    with pytest.raises(TraceError) as remote:
        run_cells(bad, ExecutorConfig(kind="ray"), desc="ray", progress=False)
    assert str(remote.value).rstrip().endswith(str(local.value))


def test_a_cells_error_on_ray_is_one_error_line_from_main(ray_instance, tmp_path, capsys):
    missing = tmp_path / "no-such-trace.npz"
    argv = ["--toy", "--executor", "ray", "--no-progress", "--out", str(tmp_path / "out"), "workload.source=trace",
            f"workload.trace={missing}"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(load_script("theta").ABLATION, BASE, argv, default_out=tmp_path)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {missing}: trace file not found\n"
