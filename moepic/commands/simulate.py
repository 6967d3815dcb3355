"""`moepic simulate` and `moepic compare`: a trace replayed for a model and GPU one does not have.

    trace (.npz / .jsonl) ─┐
    --model-shape NAME|DIR ─┼─▶ Setting ─▶ run_setup(baseline | run config) ─▶ SimResult ─▶ table / JSON
    --hardware NAME|FILE ──┘

Side effects: reads the files, prints.
"""

from __future__ import annotations

PAPER_REDUCTION = (37.51, 65.73)  # % lower latency than Pre-gated MoE, AdapMoE, MoE-Infinity (arXiv 2509.08342)
PAPER_SYSTEMS = ("pre-gated", "adapmoe", "moe-infinity")


def add_parsers(commands, parser_class) -> None:
    from moepic.ranges import CONTEXT_TOKENS

    common = parser_class(add_help=False)
    common.add_argument("--trace", required=True, help="routing trace: .npz (moepic generate --record-trace) or .jsonl")
    common.add_argument("--model-shape", required=True, help="a preset (mixtral-8x7b, qwen1.5-moe-a2.7b, …) or a model folder")
    common.add_argument("--hardware", required=True, help="hardware profile: a bundled name (a6000, …) or a YAML file")
    common.add_argument("--budget", help="device memory for experts (cache and staging): 24GiB, or a share of all expert bytes: 0.25")
    common.add_argument("--recall", help="recall of the gate-lookahead stand-in (a noisy_oracle) where the trace has no router "
                        "inputs: one value, or one per MoE layer (0.8 or 0,0.7,0.9,…)")
    common.add_argument("--model", help="model folder with weights: gate_lookahead/mlp then run on the trace's recorded router inputs")
    common.add_argument("--context", type=CONTEXT_TOKENS.parse, default=512, help="KV-cache tokens the attention time assumes (default 512)")
    common.add_argument("--json", action="store_true", help="print one JSON object")
    sim = commands.add_parser("simulate", parents=[common], help="simulate one configuration on a routing trace")
    which = sim.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="a run config YAML (moepic generate --config; e.g. from moepic configure)")
    which.add_argument("--baseline", help="a named baseline (see moepic compare)")
    cmp = commands.add_parser("compare", parents=[common], help="simulate every baseline side by side")
    cmp.add_argument("--baselines", help="comma-separated subset (default: all)")


def _setting(args):
    from moepic.perfmodel.hardware import load_profile
    from moepic.sim.run import Setting, check_trace_fits
    from moepic.sim.shapes import model_shape
    from moepic.cache.layout import budget_bytes
    from moepic.tracing import load_any_trace

    if args.budget is not None:
        budget_bytes(args.budget, 1, "--budget")  # its form (unit, sign, size) before any file is read
    shape = model_shape(args.model_shape)
    hw = load_profile(args.hardware)
    trace = check_trace_fits(load_any_trace(args.trace, num_experts=shape.spec.moe.num_experts), shape, args.trace)
    recall = _recall(args.recall, len(shape.spec.moe_layers))
    model = None
    if args.model:
        from moepic.checkpoint.load import load_model

        model = load_model(args.model)
        if trace.hidden_NLD is not None:  # gate_lookahead / mlp score them: the model's width, or one line naming the trace
            from moepic.tracing.checks import router_inputs

            router_inputs(trace, model.spec.hidden_size, args.trace)
    return Setting(trace=trace, shape=shape, hw=hw, budget=args.budget, recall=recall, model=model, context_tokens=args.context)


def _recall(text: str | None, moe_layers: int) -> float | tuple[float, ...] | None:
    from moepic.errors import ConfigError

    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, moe_layers) or not all(0 <= v <= 1 for v in values):  # nan fails too
        raise ConfigError(f"--recall must be one value in [0, 1] or {moe_layers} (one per MoE layer), got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _row(name: str, approximates: str, run) -> dict:
    return {"name": name, "approximates": approximates, "configure_s": run.configure_s, "simulate_s": run.simulate_s,
            "layer_steps_per_s": run.layer_steps_per_s, **run.result.summary()}


def run_simulate(args) -> dict:
    from moepic.sim.baseline import load_baseline, setup_from_run_config
    from moepic.sim.run import run_setup

    setting = _setting(args)
    setup = load_baseline(args.baseline) if args.baseline else setup_from_run_config(args.config)
    return _row(setup.name, setup.approximates, run_setup(setup, setting)) | {"hardware": setting.hw.name, "model_shape": setting.shape.name, "trace": args.trace}


def run_compare(args) -> dict:
    from moepic.errors import ConfigError
    from moepic.sim.baseline import ORDER, known_baselines, load_baseline

    names = ORDER if not args.baselines else tuple(n.strip() for n in args.baselines.split(","))
    setups = [load_baseline(n) for n in names]
    if args.budget is None:
        raise ConfigError(f"compare: --budget is required (all baselines run at the same budget: {known_baselines()})")
    setting = _setting(args)
    return compare_setups(setups, setting, progress=not args.json) | {"trace": args.trace, "budget": args.budget, "recall": setting.recall}


def compare_setups(setups, setting, *, progress: bool = False) -> dict:
    """Every setup on one setting: rows with latency, ratios to moepic and to the oracle bound, and
    moepic's reduction against the systems the paper compares with."""
    from moepic.progress import bar as progress_bar

    from moepic.sim.run import run_setup

    rows = []
    for setup in progress_bar(setups, desc="baselines", unit="run", wanted=progress, leave=False):
        rows.append(_row(setup.name, setup.approximates, run_setup(setup, setting)))
    by_name = {r["name"]: r["ms_per_token"] for r in rows}
    for r in rows:
        r["vs_moepic"] = r["ms_per_token"] / by_name["moepic"] if "moepic" in by_name else None
        r["vs_oracle"] = r["ms_per_token"] / by_name["oracle"] if "oracle" in by_name else None
    reductions = {
        n: 100 * (1 - by_name["moepic"] / by_name[n]) for n in PAPER_SYSTEMS if n in by_name and "moepic" in by_name
    }
    return {
        "rows": rows, "moepic_reduction_percent": reductions, "paper_reduction_percent": PAPER_REDUCTION,
        "hardware": setting.hw.name, "model_shape": setting.shape.name, "tokens": rows[0]["tokens"] if rows else 0,
    }


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def simulate_text(report: dict) -> str:
    lines = [f"{report['name']} ({report['approximates'] or 'run config'}) on {report['model_shape']}, {report['hardware']}, "
             f"{report['tokens']} decode tokens"]
    lines.append(f"{'layer':>5} {'theta':>6} {'slots':>5} {'hit rate':>8} {'recall':>7} {'MiB/token':>10} {'ms':>8} {'exposed':>8}")
    for l in report["layers"]:
        recall = f"{l['recall']:.1%}" if l["recall"] is not None else "–"
        lines.append(f"{l['layer']:>5} {l['theta']:>6.3f} {l['slots']:>5} {l['hit_rate']:>8.1%} {recall:>7} "
                     f"{_mib(l['bytes_loaded_per_token']):>10} {l['ms_per_token']:>8.3f} {l['exposed_copy_ms_per_token']:>8.3f}")
    lines.append(
        f"{report['ms_per_token']:.2f} ms/token (p50 {report['p50_ms']:.2f}, p99 {report['p99_ms']:.2f}); exposed copies "
        f"{report['exposed_copy_ms_per_token']:.2f} ms/token; hit rate {report['expert_hit_rate']:.1%}; "
        f"{_mib(report['bytes_loaded_per_token'])} MiB/token loaded; simulated {report['layer_steps_per_s']:,.0f} layer-steps/s"
    )
    return "\n".join(lines)


def compare_text(report: dict) -> str:
    lines = [f"{report['model_shape']} on {report['hardware']}, budget {report['budget']}, trace {report['trace']} "
             f"({report['tokens']} decode tokens)" + (f", gate-lookahead stand-in recall {report['recall']}" if report["recall"] is not None else "")]
    lines.append(f"{'baseline':<14} {'ms/token':>9} {'p99':>9} {'× moepic':>9} {'× oracle':>9} {'hit rate':>8} "
                 f"{'MiB/token':>10} {'exposed ms':>10} {'recall':>7}")
    for r in report["rows"]:
        ratio = lambda v: f"{v:.2f}" if v is not None else "–"  # noqa: E731
        recall = f"{r['prediction_recall']:.1%}" if r["prediction_recall"] is not None else "–"
        lines.append(
            f"{r['name']:<14} {r['ms_per_token']:>9.1f} {r['p99_ms']:>9.1f} {ratio(r['vs_moepic']):>9} {ratio(r['vs_oracle']):>9} "
            f"{r['expert_hit_rate']:>8.1%} {_mib(r['bytes_loaded_per_token']):>10} {r['exposed_copy_ms_per_token']:>10.1f} {recall:>7}"
        )
    if report["moepic_reduction_percent"]:
        low, high = report["paper_reduction_percent"]
        found = ", ".join(f"{n} {v:.1f} %" for n, v in report["moepic_reduction_percent"].items())
        lines.append(f"moepic's latency reduction: {found} (the paper reports {low}–{high} %)")
    return "\n".join(lines)
