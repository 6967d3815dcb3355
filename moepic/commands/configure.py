"""`moepic configure`: pick every MoE layer's cache size and θ for a budget, and write a run config.

    trace ─replay (policy)─▶ workload profile ─┐
    hardware profile ─▶ model times ───────────┼─▶ latency model ─▶ configurator ─▶ cache YAML
    --model config.json ─▶ shape, dtype ───────┘                   (+ uniform baselines)

Side effects: reads the files, writes the YAML (checked writable first, written whole or not at all).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moepic.errors import ConfigError

BASELINE_THETAS = (0.0, 0.4, 1.0)


def _recall(args_recall: str | None, trace, trace_path: str, predictor_config, folder: str, dtype, moe_layers: int) -> list[float]:
    from moepic.perfmodel.workload import check_router_inputs, first_layer_unpredicted, measured_recall

    by_construction = predictor_config.recall_by_construction()
    if by_construction == 0.0:  # it prefetches nothing
        return [0.0] * moe_layers
    if args_recall is not None:
        try:
            values = [float(v) for v in args_recall.split(",")]
        except ValueError:
            raise ConfigError(f"--recall: expected a number in [0, 1] or one per MoE layer, got {args_recall!r}") from None
        if len(values) not in (1, moe_layers) or not all(0 <= v <= 1 for v in values):
            raise ConfigError(f"--recall: expected one value in [0, 1] or {moe_layers} (one per MoE layer), got {args_recall!r}")
        return first_layer_unpredicted(values[0], moe_layers) if len(values) == 1 else values
    if by_construction is not None:
        return first_layer_unpredicted(by_construction, moe_layers)
    from moepic.checkpoint.load import load_model
    from moepic.predictors import PREDICTORS

    from moepic.tracing.checks import router_inputs

    check_router_inputs(trace, trace_path)
    model = load_model(folder, dtype=dtype)
    router_inputs(trace, model.spec.hidden_size, trace_path)  # the model's width, or one line naming the trace
    return measured_recall(trace, PREDICTORS.build(predictor_config, model))


def run_configure(args) -> dict:
    import torch
    from moepic.progress import bar as progress_bar

    from moepic.cache.layout import budget_bytes, staging_buffers
    from moepic.checkpoint.hf_config import DTYPES
    from moepic.checkpoint.load import read_spec
    from moepic.configurators import CONFIGURATORS, configure_cache
    from moepic.configurators.base import configure_on_trace
    from moepic.policies.base import auto_policies
    from moepic.core.footprint import footprint
    from moepic.default_model import model_folder
    from moepic.perfmodel.hardware import load_profile
    from moepic.outputs import check_writable, write_text_atomic
    from moepic.perfmodel.latency import layer_total_s, model_times
    from moepic.policies import POLICIES
    from moepic.predictors import PREDICTORS
    from moepic.tracing import load_any_trace

    budget_bytes(args.budget, 1, "--budget")  # its form (unit, sign, size) before any file is read
    folder = model_folder(args.model)
    spec, cfg = read_spec(folder)
    if spec.moe is None:
        raise ConfigError(f"{folder}: the model has no routed experts to configure a cache for")
    dtype = cfg.checkpoint_dtype() if args.dtype in (None, "auto") else DTYPES[args.dtype]
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    hw = load_profile(args.hardware)
    if args.out:
        check_writable(args.out, "config")  # before the hit-rate curves, not after
    trace = load_any_trace(args.trace, num_experts=spec.moe.num_experts)
    _check_trace_shape(trace, spec, args.trace)
    candidates = auto_policies() if args.policy == "auto" else (args.policy,) if args.policy else (POLICIES.default,)
    policy_configs = [POLICIES.structure_node({"name": name}, "--policy") for name in candidates]
    predictor_config = PREDICTORS.structure_node({"name": args.predictor}, "--predictor")
    configurator_config = CONFIGURATORS.structure_node({"name": args.configurator}, "--configurator")
    moe = spec.moe
    shape = predictor_config.prefetch_shape(moe.top_k)
    recall = _recall(args.recall, trace, args.trace, predictor_config, folder, dtype, len(spec.moe_layers))

    expert_bytes_all = footprint(spec).routed_expert_bytes(dtype_bytes)
    budget = budget_bytes(args.budget, expert_bytes_all, "--budget")
    times = model_times(hw, spec, dtype_bytes=dtype_bytes, context_tokens=args.context, predictor=shape.horizon > 0)
    staging = staging_buffers(moe.top_k, shape)
    with progress_bar(total=len(spec.moe_layers) * len(policy_configs), desc="hit-rate curves", unit="layer",
                      wanted=not args.json, leave=False) as bar:
        configured = configure_on_trace(
            CONFIGURATORS.build(configurator_config), trace, policy_configs, hw=hw, times=times, recall_L=recall,
            candidates=shape.candidates, budget_bytes=budget, staging_experts=staging, progress=bar.update,
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
        }
    }
    if args.model:
        run_config["model"] = {"path": str(Path(folder).resolve())}
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
        "staging_bytes": chosen.staging_experts * times.expert_bytes,
        "total_bytes": chosen.total_bytes,
        "configurator": configurator_config.as_dict(),
        "policy": policy_config.as_dict(),
        "hardware": hw.name,
        "recall": recall,
        "workload_s": configured.workload_s,
        "configure_s": configured.configure_s,
        "config": args.out,
    }



def _check_trace_shape(trace, spec, path) -> None:
    moe = spec.moe
    found = (len(trace.moe_layers), trace.num_experts, trace.top_k)
    expected = (len(spec.moe_layers), moe.num_experts, moe.top_k)
    if found != expected:
        raise ConfigError(
            f"{path}: the trace is for another model shape: {found[0]} MoE layers × {found[1]} experts, top-{found[2]}; "
            f"the model has {expected[0]} × {expected[1]}, top-{expected[2]}"
        )


def configure_text(report: dict) -> str:
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
    return "\n".join(lines)
