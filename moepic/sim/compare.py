"""Setups side by side on one testbed: each run as a row (latency, hit rate, bytes, recall), its ratio
to moepic and to the oracle bound, and moepic's reduction against the published systems of
docs/design.md §7. Pure (it times the runs it makes)."""

from __future__ import annotations

PAPER_REDUCTION = (37.51, 65.73)  # % lower latency than Pre-gated MoE, AdapMoE, MoE-Infinity (docs/design.md §7)
PAPER_SYSTEMS = ("pre-gated", "adapmoe", "moe-infinity")
HYBRID_SELF = "moepic-hybrid"


def result_row(name: str, approximates: str, run) -> dict:
    """One simulated run (sim.run.run_setup's result) as a report row."""
    return {"name": name, "approximates": approximates, "configure_s": run.configure_s, "simulate_s": run.simulate_s,
            "layer_steps_per_s": run.layer_steps_per_s, **run.result.summary()}


def hybrid_summary(ms_by_name: dict[str, float]) -> dict | None:
    """moepic-hybrid against copy-only moepic and the fastest hybrid baseline, where both ran."""
    from moepic.sim.baseline import HYBRID_ORDER

    ours = ms_by_name.get(HYBRID_SELF)
    others = {n: ms_by_name[n] for n in HYBRID_ORDER if n != HYBRID_SELF and n in ms_by_name}
    if ours is None or not others:
        return None
    best = min(others, key=others.get)
    return {"vs_moepic": ours / ms_by_name["moepic"] if "moepic" in ms_by_name else None,
            "best_hybrid_baseline": best, "vs_best_hybrid_baseline": ours / others[best]}


def compare_setups(setups, testbed, *, progress: bool = False) -> dict:
    """Every setup on one testbed: rows with latency, ratios to moepic and to the oracle bound, and
    moepic's reduction against the published systems (docs/design.md §7)."""
    from moepic.progress import bar as progress_bar
    from moepic.sim.run import run_setup

    rows = []
    for setup in progress_bar(setups, desc="baselines", unit="run", wanted=progress, leave=False):
        rows.append(result_row(setup.name, setup.approximates, run_setup(setup, testbed)))
    by_name = {r["name"]: r["ms_per_token"] for r in rows}
    for r in rows:
        r["vs_moepic"] = r["ms_per_token"] / by_name["moepic"] if "moepic" in by_name else None
        r["vs_oracle"] = r["ms_per_token"] / by_name["oracle"] if "oracle" in by_name else None
    reductions = {
        n: 100 * (1 - by_name["moepic"] / by_name[n]) for n in PAPER_SYSTEMS if n in by_name and "moepic" in by_name
    }
    return {
        "rows": rows, "moepic_reduction_percent": reductions, "paper_reduction_percent": PAPER_REDUCTION,
        "hybrid": hybrid_summary(by_name),
        "hardware": testbed.hw.name, "model_shape": testbed.shape.name, "tokens": rows[0]["tokens"] if rows else 0,
    }
