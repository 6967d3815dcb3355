"""Predicted decode latency of uniform θ against the moepic and dp configurators, and how fast they run.

    python experiments/bench_configure.py [--hardware FILE] [--quick] [--plot FILE.png]

Tables (all numbers are the latency model's predictions, ms per decode token):
(a) the shared Mixtral-8x7B traces with the bundled A6000 profile (published figures, not measured
    here) and an assumed gate-lookahead recall of 0.85 (published: >80–90 %; the traces carry no
    hidden states to measure it);
(b) the bundled model on a trace it generated, with gate-lookahead recall measured on that trace,
    and the hardware profile measured on this machine (`moepic profile`, or --hardware FILE);
(c) configuring a 64-layer, 128-expert, top-8 model (Qwen3-30B-A3B-like, random concave curves):
    wall time of each configurator, median of 5.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_cache import MIXTRAL, SHARED_TRACES, machine_line  # noqa: E402

from moepic.configurators import CONFIGURATORS, configure_cache  # noqa: E402
from moepic.perfmodel.hardware import load_profile  # noqa: E402
from moepic.perfmodel.latency import LatencyModel, model_times  # noqa: E402
from moepic.perfmodel.workload import first_layer_unpredicted, workload_from_trace  # noqa: E402
from moepic.policies.lcp import LCPConfig  # noqa: E402

BUDGETS = (0.125, 0.25, 0.5)
THETAS = (0.0, 0.25, 0.4, 0.6, 1.0)


def build(name: str, **knobs):
    return CONFIGURATORS.build(CONFIGURATORS[name].config(**knobs))


def table(title: str, model: LatencyModel, staging: int) -> tuple[str, list[dict]]:
    all_bytes = model.num_layers * model.num_experts * model.times.expert_bytes
    head = " | ".join([f"uniform θ={t:g}" for t in THETAS] + ["moepic", "dp", "best uniform / moepic", "moepic θ (min–max)"])
    lines = [title, f"| budget | {head} |", "|" + " --- |" * (len(THETAS) + 5)]
    rows = []
    for fraction in BUDGETS:
        budget = int(fraction * all_bytes)
        uniform = [configure_cache(build("uniform", theta=t), model, budget, staging).predicted_s * 1e3 for t in THETAS]
        ours = configure_cache(build("moepic"), model, budget, staging)
        dp = configure_cache(build("dp"), model, budget, staging).predicted_s * 1e3
        thetas = ours.thetas(model.times.block)
        cells = [f"{v:.1f}" for v in uniform] + [f"**{ours.predicted_s * 1e3:.1f}**", f"{dp:.1f}", f"{min(uniform) / (ours.predicted_s * 1e3):.3f}×", f"{min(thetas):.2f}–{max(thetas):.2f}"]
        lines.append(f"| {fraction:.1%} | " + " | ".join(cells) + " |")
        rows.append({"budget": fraction, "uniform": dict(zip(THETAS, uniform)), "moepic": ours.predicted_s * 1e3, "dp": dp, "thetas": thetas})
    return "\n".join(lines), rows


def mixtral_tables() -> list[str]:
    from moepic.tracing.jsonl import load_jsonl_trace

    if not SHARED_TRACES.is_dir():
        return [f"(a) skipped: the shared Mixtral traces are not at {SHARED_TRACES}"]
    hw = load_profile("a6000")
    out = []
    for path in sorted(SHARED_TRACES.glob("*.jsonl")):
        trace = load_jsonl_trace(path)
        workload = workload_from_trace(trace, LCPConfig(), recall_L=first_layer_unpredicted(0.85, 32), candidates=2)
        model = LatencyModel(hw, model_times(hw, MIXTRAL, dtype_bytes=2, predictor=True), workload)
        out.append(table(f"(a) Mixtral-8x7B {path.stem}, {hw.name} (published figures), LCP, gate lookahead recall 0.85 assumed", model, 6)[0])
    return out


def bundled_table(hardware: str | None, quick: bool) -> str:
    import torch

    from moepic.checkpoint.load import load_model
    from moepic.cli import main as cli
    from moepic.default_model import default_model_dir
    from moepic.predictors import PREDICTORS
    from moepic.predictors.gate_lookahead import GateLookaheadConfig
    from moepic.perfmodel.workload import measured_recall
    from moepic.runtime.measure import measure_profile
    from moepic.tracing import load_trace

    folder = str(default_model_dir())
    hw = load_profile(hardware) if hardware else measure_profile(device="cpu", model_folder=folder, dtype=torch.bfloat16, quick=quick)
    model = load_model(folder)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/trace.npz"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli(["generate", "--prompt", "And God said", "--greedy", "--max-new-tokens", "100" if quick else "400",
                 "--record-trace", path, "--trace-hidden"])
        trace = load_trace(path)
    recall = measured_recall(trace, PREDICTORS.build(GateLookaheadConfig(), model))
    workload = workload_from_trace(trace, LCPConfig(), recall_L=recall, candidates=model.spec.moe.top_k)
    latency = LatencyModel(hw, model_times(hw, model.spec, dtype_bytes=2, predictor=True, context_tokens=256), workload)
    title = (f"(b) bundled kjv-moe-tiny, its own {trace.num_tokens}-token trace, profile {hw.name} ({hw.source}), LCP, "
             f"gate lookahead recall measured {np.round(recall, 2).tolist()}")
    return table(title, latency, model.spec.moe.top_k * 3)[0]


def speed_line() -> str:
    from perf_support import moe_spec, power_curve, workload

    rng = np.random.default_rng(0)
    spec = moe_spec(64, 128, 8, 2048, 768)
    curves = [power_curve(128, a) for a in rng.uniform(1.0, 3.0, 64)]
    hw = load_profile("h100-pcie")
    model = LatencyModel(hw, model_times(hw, spec, dtype_bytes=2, predictor=True), workload(curves, 8, 0.9, 8))
    budget = int(0.25 * 64 * 128 * model.times.expert_bytes)
    parts = []
    for name in ("moepic", "dp"):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            configure_cache(build(name), model, budget, 24)
            times.append(time.perf_counter() - t0)
        parts.append(f"{name} {statistics.median(times) * 1e3:.0f} ms")
    return "(c) configuring 64 layers × 128 experts (top-8, 500 budget units): " + ", ".join(parts) + " (median of 5)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hardware", help="a profile for table (b) instead of measuring this machine")
    parser.add_argument("--quick", action="store_true", help="a shorter trace and quick profiling (a smoke test)")
    args = parser.parse_args(argv)
    for text in mixtral_tables():
        print(text, end="\n\n")
    print(bundled_table(args.hardware, args.quick), end="\n\n")
    print(speed_line())
    print(machine_line())


if __name__ == "__main__":
    main()
