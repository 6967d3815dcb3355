"""Shared by the experiments' tests: the base config, the toy workload and the ablation scripts
(experiments/ is not a package, so a script is imported by its path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "experiments" / "configs" / "base.yaml"
SCRIPTS = ("policies", "theta", "configurator", "hardware", "predictors", "batch", "learned_policy")
# Fields of a record's metrics that time the run itself (they differ from run to run).
TIMING = ("wall_s", "configure_s", "simulate_s")


def load_script(name: str):
    """experiments/ablate_NAME.py as a module (its ABLATION, its helpers)."""
    path = ROOT / "experiments" / f"ablate_{name}.py"
    spec = importlib.util.spec_from_file_location(f"ablate_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_timing(records) -> list[tuple[dict, list[dict]]]:
    """What a cell computed: its metrics less the timing fields, and its per-layer rows."""
    return [({k: v for k, v in r["metrics"].items() if k not in TIMING}, r["layers"]) for r in records]


# A tiny synthetic workload (what --toy adds): never the shared traces, which CI lacks.
TOY = load_script("policies").ABLATION.toy
assert TOY, "the policies script has no --toy workload"
