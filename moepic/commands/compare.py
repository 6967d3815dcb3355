"""`moepic compare`: every named baseline (or a subset) simulated side by side on one routing trace,
model shape, GPU and budget (moepic/sim/compare.py). Side effects: reads the files, draws a bar."""

from __future__ import annotations

from moepic.commands import arguments, testbed
from moepic.commands.testbed import mib as _mib
from moepic.errors import ConfigError

NAME = "compare"
HELP = "simulate every baseline side by side"


def add_parser(subparsers):
    cmp = subparsers.add_parser(NAME, help=HELP)
    testbed.add_arguments(cmp)
    baselines = cmp.add_argument("--baselines", metavar="A,B,…", help="comma-separated subset of {baselines} (default: all)")
    baselines.fills = {"baselines": arguments.baseline_names}
    arguments.add_progress(cmp)
    return cmp


def run(args) -> dict:
    from moepic.sim.baseline import ORDER, known_baselines, load_baseline
    from moepic.sim.compare import compare_setups

    names = ORDER if not args.baselines else tuple(n.strip() for n in args.baselines.split(","))
    setups = [load_baseline(n) for n in names]
    if args.budget is None:
        raise ConfigError(f"compare: --budget is required (all baselines run at the same budget: {known_baselines()})")
    bed = testbed.from_args(args)
    return compare_setups(setups, bed, progress=not args.json) | {"trace": args.trace, "budget": args.budget, "recall": bed.recall,
                                                                   "host": arguments.host_name(bed.hw)}


def text(report: dict) -> str:
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
    return "\n".join(lines + arguments.host_lines(report))
