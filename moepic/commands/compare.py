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
    from moepic.sim.baseline import HYBRID_ORDER, ORDER, known_baselines, load_baseline
    from moepic.sim.compare import compare_setups

    if args.budget is None:
        raise ConfigError(f"compare: --budget is required (all baselines run at the same budget: {known_baselines()})")
    bed = testbed.from_args(args)
    if args.baselines:
        names = tuple(n.strip() for n in args.baselines.split(","))
    else:  # the hybrid systems where a host profile prices their CPU work (a miss format runs on the device)
        names = ORDER + (HYBRID_ORDER if bed.hw.host is not None and bed.miss_format is None else ())
    setups = [load_baseline(n) for n in names]
    for setup in setups:
        if (bed.hybrid or setup.hybrid) != "off" and bed.hw.host is None:
            raise ConfigError(f"baseline {setup.name} computes experts on the host CPU (hybrid {bed.hybrid or setup.hybrid}): "
                              f"give --host NAME|FILE (bundled: {arguments.known_host_names()})")
    return compare_setups(setups, bed, progress=not args.json) | {"trace": args.trace, "budget": args.budget, "recall": bed.recall,
                                                                   "host": arguments.host_name(bed.hw), "batch": bed.batch,
                                                                   "stream_tokens": bed.stream_tokens}


def text(report: dict) -> str:
    lines = [f"{report['model_shape']} on {report['hardware']}, budget {report['budget']}, trace {report['trace']} "
             f"({report['tokens']} decode tokens)" + (f", gate-lookahead stand-in recall {report['recall']}" if report["recall"] is not None else "")
             + (f", batch {report['batch']} (ms/token: each stream's)" if report.get("batch", 1) > 1 else "")]
    width = max([14] + [len(r["name"]) for r in report["rows"]])
    lines.append(f"{'baseline':<{width}} {'ms/token':>9} {'p99':>9} {'× moepic':>9} {'× oracle':>9} {'hit rate':>8} "
                 f"{'MiB/token':>10} {'exposed ms':>10} {'recall':>7} {'host ms':>8} {'host wait':>9}")
    for r in report["rows"]:
        ratio = lambda v: f"{v:.2f}" if v is not None else "–"  # noqa: E731
        recall = f"{r['prediction_recall']:.1%}" if r["prediction_recall"] is not None else "–"
        lines.append(
            f"{r['name']:<{width}} {r['ms_per_token']:>9.1f} {r['p99_ms']:>9.1f} {ratio(r['vs_moepic']):>9} {ratio(r['vs_oracle']):>9} "
            f"{r['expert_hit_rate']:>8.1%} {_mib(r['bytes_loaded_per_token']):>10} {r['exposed_copy_ms_per_token']:>10.1f} {recall:>7} "
            f"{r['host_ms_per_token']:>8.1f} {r['host_wait_ms_per_token']:>9.1f}"
        )
    if report["moepic_reduction_percent"]:
        low, high = report["paper_reduction_percent"]
        found = ", ".join(f"{n} {v:.1f} %" for n, v in report["moepic_reduction_percent"].items())
        lines.append(f"moepic's latency reduction: {found} (the paper reports {low}–{high} %)")
    hybrid = report.get("hybrid")
    if hybrid:
        versus = f"{hybrid['vs_moepic']:.2f}× copy-only moepic, " if hybrid["vs_moepic"] is not None else ""
        lines.append(f"moepic-hybrid: {versus}{hybrid['vs_best_hybrid_baseline']:.2f}× the best hybrid baseline "
                     f"({hybrid['best_hybrid_baseline']})")
    return "\n".join(lines + arguments.host_lines(report))
