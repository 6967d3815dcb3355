"""`moepic configure`: pick every MoE layer's cache size and θ for a budget, and write a run config.

    trace ─replay (policy)─▶ workload profile ─┐
    hardware profile ─▶ model times ───────────┼─▶ latency model ─▶ configurator ─▶ cache YAML
    --model config.json or preset ─▶ shape, dtype ─┘               (+ uniform baselines)

Side effects: reads the files, writes the YAML (checked writable first, written whole or not at all).
"""

from __future__ import annotations

from pathlib import Path

from moepic.commands import arguments
from moepic.errors import ConfigError
from moepic.ranges import CONTEXT_TOKENS

NAME = "configure"
HELP = "choose per-layer cache budgets and θ with the latency model"
BASELINE_THETAS = (0.0, 0.4, 1.0)


def add_parser(subparsers):
    conf = subparsers.add_parser(NAME, help=HELP)
    arguments.add_model(conf, shape=True, help="Hugging Face model folder (only config.json is read unless recall is "
                        "measured), or a preset shape ({presets}) (default: the built-in model)")
    arguments.add_dtype(conf, "the dtype the run will use", default="auto")
    arguments.add_budget(conf, "device memory for routed experts, cache and staging: 24GiB or 0.25", required=True)
    arguments.add_hardware(conf)
    conf.add_argument("--trace", required=True, help="routing trace (.npz or JSONL) whose hit-rate curves to use")
    arguments.strategy_flag(conf, "policy", "cache policy whose hit rates to measure: {names}; auto: the fastest "
                            "predicted of {auto}", auto=_auto_policies)
    conf.add_argument("--learned-policy", metavar="FILE.json", help="a `moepic train-policy` file (fit on other routing "
                      "than --trace): --policy learned uses it, --policy auto weighs it beside the others")
    arguments.strategy_flag(conf, "predictor", "prefetching predictor: {names} (none: load on demand)")
    arguments.add_recall(conf, "assumed instead of measured on the trace's router inputs (which needs the "
                         "weights of a model folder)")
    arguments.strategy_flag(conf, "configurator", "how to choose the layers' budgets and θ: {names}")
    conf.add_argument("--context", type=CONTEXT_TOKENS.parse, default=512, help="KV-cache length the decode step reads (tokens)")
    arguments.add_hybrid(conf)
    arguments.add_expert_format(conf, "routed experts stored as: {formats} (default: the model's own); the config "
                                "written keeps them so (model.expert_format)")
    arguments.add_miss_format(conf, "price misses served from a low-bit copy in this format ({formats}, its default "
                              "knobs; changes numbers: cache.miss_format); the config written keeps it")
    conf.add_argument("--out", metavar="FILE.yaml", help="write the cache config here (for moepic generate --config)")
    arguments.add_json(conf)
    arguments.add_progress(conf)
    return conf


def _auto_policies() -> str:
    from moepic.policies.base import auto_policies

    return ", ".join(auto_policies())


def _recall(args_recall: str | None, trace, trace_path: str, predictor_config, folder: str | None, dtype, moe_layers: int) -> list[float]:
    from moepic.perfmodel.workload import check_router_inputs, first_layer_unpredicted, measured_recall

    by_construction = predictor_config.recall_by_construction()
    if by_construction == 0.0:  # it prefetches nothing
        return [0.0] * moe_layers
    if args_recall is not None:
        recall = arguments.parse_recall(args_recall, moe_layers)
        return first_layer_unpredicted(recall, moe_layers) if isinstance(recall, float) else list(recall)
    if by_construction is not None:
        return first_layer_unpredicted(by_construction, moe_layers)
    from moepic.checkpoint.load import load_model
    from moepic.predictors import PREDICTORS
    from moepic.tracing.checks import router_inputs

    check_router_inputs(trace, trace_path)
    if folder is None:
        raise ConfigError(
            f"measuring the {predictor_config.name} predictor's recall needs the model's weights, and a preset "
            "shape has none: give --model DIR, or --recall"
        )
    model = load_model(folder, dtype=dtype)
    router_inputs(trace, model.spec.hidden_size, trace_path)  # the model's width, or one line naming the trace
    return measured_recall(trace, PREDICTORS.build(predictor_config, model))


def run(args) -> dict:
    import torch
    import yaml
    from moepic.progress import bar as progress_bar

    from moepic.cache.layout import budget_bytes, staging_buffers
    from moepic.checkpoint.hf_config import DTYPES
    from moepic.checkpoint.load import read_spec
    from moepic.configurators import CONFIGURATORS, configure_cache
    from moepic.configurators.base import configure_on_trace
    from moepic.policies.base import auto_policies
    from moepic.outputs import check_writable, write_text_atomic
    from moepic.checkpoint.stored_experts import checkpoint_formats
    from moepic.perfmodel.host_costs import check_priceable
    from moepic.perfmodel.latency import layer_model_times, layer_total_s
    from moepic.policies import POLICIES
    from moepic.predictors import PREDICTORS
    from moepic.tracing import load_any_trace

    budget_bytes(args.budget, 1, "--budget")  # its form (unit, sign, size) before any file is read
    fmt = arguments.expert_format(args)
    source = arguments.model_source(args.model)
    if isinstance(source, str):
        folder = source
        spec, cfg = read_spec(folder)
        if spec.moe is None:
            raise ConfigError(f"{folder}: the model has no routed experts to configure a cache for")
        own_dtype = cfg.checkpoint_dtype()
        formats = (fmt,) * len(spec.moe_layers) if fmt else checkpoint_formats(cfg, len(spec.moe_layers))
    else:  # a preset: its shape, no weights
        folder, spec, own_dtype = None, source.spec, DTYPES[arguments.PRESET_DTYPE]
        formats = (fmt,) * len(spec.moe_layers) if fmt else source.expert_formats
    dtype = own_dtype if args.dtype in (None, "auto") else DTYPES[args.dtype]
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    hw = arguments.hardware_profile(args)
    if args.out:
        check_writable(args.out, "config")  # before the hit-rate curves, not after
    trace = load_any_trace(args.trace, num_experts=spec.moe.num_experts)
    _check_trace_shape(trace, spec, args.trace)
    hybrid = args.hybrid or "off"
    if hybrid != "off":
        for layer_format in formats:
            check_priceable(layer_format, f"--hybrid {hybrid}")
    if hybrid != "off" and hw.host is None:
        raise ConfigError(f"--hybrid {hybrid} computes experts on the host CPU: give --host NAME|FILE to price it "
                          f"(bundled: {arguments.known_host_names()})")
    candidates = auto_policies() if args.policy == "auto" else (args.policy,) if args.policy else (POLICIES.default,)
    nodes = [{"name": name} for name in candidates]
    if args.learned_policy is not None:
        if args.policy not in ("auto", "learned"):
            raise ConfigError(f"--learned-policy has no effect with --policy {args.policy or POLICIES.default}: it is for "
                              "--policy learned or auto")
        nodes = [node for node in nodes if node["name"] != "learned"] + [{"name": "learned", "path": args.learned_policy}]
    policy_configs = [POLICIES.structure_node(node, "--policy") for node in nodes]
    predictor_config = PREDICTORS.structure_node(arguments.strategy_name("predictor", args.predictor), "--predictor")
    configurator_config = CONFIGURATORS.structure_node(arguments.strategy_name("configurator", args.configurator), "--configurator")
    moe = spec.moe
    shape = predictor_config.prefetch_shape(moe.top_k)
    if args.recall is not None and shape.horizon == 0:
        raise ConfigError(f"--recall has no effect with --predictor {predictor_config.name}: nothing is prefetched")
    recall = _recall(args.recall, trace, args.trace, predictor_config, folder, dtype, len(spec.moe_layers))

    miss_format = _checked_miss_format(arguments.miss_format(args), formats, hybrid, spec)
    layer_times = layer_model_times(hw, spec, dtype_bytes=dtype_bytes, context_tokens=args.context, predictor=shape.horizon > 0,
                                    expert_formats=formats, miss_format=miss_format)  # a GGUF file's formats vary by layer
    times = layer_times[0]
    budget = budget_bytes(args.budget, moe.num_experts * sum(t.expert_bytes for t in layer_times), "--budget")
    staging = staging_buffers(moe.top_k, shape)
    with progress_bar(total=len(spec.moe_layers) * len(policy_configs), desc="hit-rate curves", unit="layer",
                      wanted=not args.json, leave=False) as bar:
        configured = configure_on_trace(
            CONFIGURATORS.build(configurator_config), trace, policy_configs, hw=hw, times=layer_times, recall_L=recall,
            candidates=shape.candidates, budget_bytes=budget, staging_experts=staging, progress=bar.update,
            hybrid=hybrid, dtype_bytes=dtype_bytes,
        )
    policy_config, latency, chosen = configured.policy, configured.latency, configured.chosen
    baselines = {}
    for theta in BASELINE_THETAS:
        uniform = CONFIGURATORS["uniform"].config(theta=theta)
        baselines[f"uniform theta={theta:g}"] = configure_cache(CONFIGURATORS.build(uniform), latency, budget, staging).predicted_s * 1e3

    breakdown = latency.breakdown(chosen.layers)
    thetas = chosen.thetas(times.block)
    run_config = {
        "cache": {
            "budget": [f"{b}B" for b in chosen.cache_bytes()],
            "theta": thetas,
            "policy": policy_config.as_dict(),
            "predictor": predictor_config.as_dict(),
            **({"hybrid": hybrid} if hybrid != "off" else {}),
            **({"miss_format": miss_format.config.as_dict()} if miss_format is not None else {}),
        }
    }
    if args.model and folder is not None:
        run_config["model"] = {"path": str(Path(folder).resolve())}
    if fmt is not None and fmt.quantized:  # encoded as they load (a quantized folder keeps its own)
        run_config.setdefault("model", {})["expert_format"] = fmt.config.as_dict()
    header = (
        f"# moepic configure: {configurator_config.name} for a budget of {budget} bytes ({args.budget}) with "
        f"staging for {chosen.staging_experts} experts\n# hardware {hw.name} ({hw.source})\n# trace {args.trace}\n"
        f"# predicted decode: {chosen.predicted_s * 1e3:.2f} ms/token; "
        + ", ".join(f"{name}: {ms:.2f}" for name, ms in baselines.items()) + "\n"
    )
    if args.out:
        write_text_atomic(args.out, "config", header + yaml.safe_dump(run_config, sort_keys=False))
    return {
        "layers": [
            {"layer": l.layer, "budget_bytes": b, "theta": th, "slots": c.slots, "hit_rate": part["hit_rate"],
             "predicted_ms": 1e3 * float(layer_total_s(part))}
            for l, b, th, c, part in zip(latency.workload.layers, chosen.cache_bytes(), thetas, chosen.layers, breakdown)
        ],
        "predicted_ms_per_token": chosen.predicted_s * 1e3,
        "baselines": baselines,
        "budget_bytes": budget,
        "staging_bytes": chosen.staging_experts * max(t.expert_bytes for t in layer_times),
        "total_bytes": chosen.total_bytes,
        "configurator": configurator_config.as_dict(),
        "policy": policy_config.as_dict(),
        "hardware": hw.name,
        "host": arguments.host_name(hw),
        "hybrid": hybrid,
        "recall": recall,
        "workload_s": configured.workload_s,
        "configure_s": configured.configure_s,
        "config": args.out,
    }


def _checked_miss_format(miss_format, formats, hybrid: str, spec):
    """`--miss-format`'s format, checked against the experts (formats, shape) and the hybrid mode, or None."""
    if miss_format is None:
        return None
    from moepic.quant.format import check_miss_format, expert_shape

    check_miss_format(miss_format, formats, hybrid, shape=expert_shape(spec))
    return miss_format


def _check_trace_shape(trace, spec, path) -> None:
    moe = spec.moe
    found = (len(trace.moe_layers), trace.num_experts, trace.top_k)
    expected = (len(spec.moe_layers), moe.num_experts, moe.top_k)
    if found != expected:
        raise ConfigError(
            f"{path}: the trace is for another model shape: {found[0]} MoE layers × {found[1]} experts, top-{found[2]}; "
            f"the model has {expected[0]} × {expected[1]}, top-{expected[2]}"
        )


def text(report: dict) -> str:
    lines = [f"{'layer':>5} {'budget MiB':>10} {'theta':>6} {'slots':>5} {'hit rate':>8} {'ms':>8}"]
    for l in report["layers"]:
        lines.append(
            f"{l['layer']:>5} {l['budget_bytes'] / 2**20:>10.2f} {l['theta']:>6.3f} {l['slots']:>5} "
            f"{l['hit_rate']:>8.1%} {l['predicted_ms']:>8.3f}"
        )
    lines.append(
        f"predicted {report['predicted_ms_per_token']:.2f} ms/token with {report['configurator']['name']} and "
        f"{report['policy']['name']} "
        f"({report['total_bytes'] / 2**20:.1f} of {report['budget_bytes'] / 2**20:.1f} MiB, staging "
        f"{report['staging_bytes'] / 2**20:.1f} MiB; configured in {report['configure_s'] * 1e3:.0f} ms)"
    )
    lines += [f"  vs {name}: {ms:.2f} ms/token ({ms / report['predicted_ms_per_token']:.2f}×)" for name, ms in report["baselines"].items()]
    if report["config"]:
        lines.append(f"wrote {report['config']}: run it with `moepic generate --config {report['config']}`")
    return "\n".join(lines + arguments.host_lines(report))
