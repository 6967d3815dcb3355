"""`moepic simulate`: one configuration (a named baseline or a run config) replayed on a routing trace
for a model and GPU one does not have (moepic/sim). Side effects: reads the files."""

from __future__ import annotations

from moepic.commands import arguments, testbed
from moepic.commands.testbed import mib as _mib
from moepic.errors import ConfigError

NAME = "simulate"
HELP = "simulate one configuration on a routing trace"


def add_parser(subparsers):
    sim = subparsers.add_parser(NAME, help=HELP)
    testbed.add_arguments(sim)
    which = sim.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="a run config YAML (moepic generate --config; e.g. from moepic configure)")
    baseline = which.add_argument("--baseline", metavar="NAME", help="a named baseline: {baselines}")
    baseline.fills = {"baselines": arguments.baseline_names}
    return sim


def run(args) -> dict:
    from moepic.sim.baseline import load_baseline, setup_from_run_config
    from moepic.sim.compare import result_row
    from moepic.sim.run import run_setup

    bed = testbed.from_args(args)
    setup = load_baseline(args.baseline) if args.baseline else setup_from_run_config(args.config)
    if (bed.hybrid or setup.hybrid) != "off" and bed.hw.host is None:
        raise ConfigError(f"{setup.name} computes experts on the host CPU (hybrid {bed.hybrid or setup.hybrid}): "
                          f"give --host NAME|FILE (bundled: {arguments.known_host_names()})")
    return result_row(setup.name, setup.approximates, run_setup(setup, bed)) | {
        "hardware": bed.hw.name, "host": arguments.host_name(bed.hw), "model_shape": bed.shape.name, "trace": args.trace,
        "batch": bed.batch, "stream_tokens": bed.stream_tokens}


def text(report: dict) -> str:
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
        f"{_mib(report['bytes_loaded_per_token'])} MiB/token loaded"
        + (f" (+ {report['miss_fill_bytes'] / 2**20:,.0f} MiB of full-precision tops filled behind)" if report["miss_fill_bytes"] else "")
        + f"; simulated {report['layer_steps_per_s']:,.0f} layer-steps/s"
    )
    if report.get("batch", 1) > 1 or report.get("stream_tokens") is not None:
        lines.append(f"batch {report['batch']}: {report['steps']} decode steps of {report['ms_per_step']:.2f} ms, "
                     f"{report['tokens_per_s']:.2f} tokens/s over all streams (ms/token is each stream's)")
    return "\n".join(lines + arguments.host_lines(report))
