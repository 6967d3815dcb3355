"""Run one experiment cell: on the simulator (default) or on the real engine. Returns a plain record.

    ExperimentConfig ─▶ sim:    trace (file, or synthetic) ─▶ moepic.sim.run (prepare, simulate)
                     └▶ engine: the model generates greedily through the offloading engine over the
                                emulated link; tokens are checked against the dense model's

Both give the same record: `metrics` (scalars, per decode token) and `layers` (one dict per MoE
layer: θ, slots, cache MiB, hit rate, recall, ms, exposed ms). Loaded traces and models are kept
per process, so a worker running many cells of one workload reads it once.
"""

from __future__ import annotations

import functools
import statistics
import time

import attrs
import numpy as np

from moepic.errors import ConfigError
from moepic.experiments.config import ExperimentConfig, WorkloadConfig
from moepic.perfmodel.hardware import HardwareProfile, load_profile
from moepic.sim.run import Setting, check_trace_fits, prepare
from moepic.sim.shapes import ModelShape, model_shape
from moepic.sim.simulate import simulate
from moepic.tracing import RoutingTrace, load_any_trace
from moepic.tracing.synthetic import SyntheticRouting, generate_trace, load_synthetic, select_tokens

MIB = 2**20


def run_cell(config: ExperimentConfig) -> dict:
    """One cell's record: {"metrics": {...}, "layers": [...]}."""
    start = time.perf_counter()
    record = (run_engine if config.backend == "engine" else run_sim)(config)
    record["metrics"]["wall_s"] = time.perf_counter() - start
    return record


# -- workload ------------------------------------------------------------------------------------


def hardware(workload: WorkloadConfig) -> HardwareProfile:
    hw = load_profile(workload.hardware)
    return attrs.evolve(hw, link_gbps=workload.link_gbps) if workload.link_gbps else hw


@functools.lru_cache(maxsize=4)
def workload_trace(workload: WorkloadConfig, shape: ModelShape) -> RoutingTrace:
    """The workload's trace, fitted to the shape (checked), cut to `max_tokens`."""
    if workload.trace is None:
        synthetic = workload.synthetic
        spec = shape.spec
        L, E, k = len(spec.moe_layers), spec.moe.num_experts, spec.moe.top_k
        if synthetic.params is not None:
            laws = load_synthetic(synthetic.params).for_shape(E, k, L)
        else:
            laws = SyntheticRouting(
                num_experts=E, top_k=k, skew=[synthetic.skew] * L, reuse=[synthetic.reuse] * L,
                decay=[synthetic.decay] * L, correlation=[0.0] + [synthetic.correlation] * (L - 1),
            )
        trace = generate_trace(laws, synthetic.tokens, synthetic.seed, min(synthetic.sequences, synthetic.tokens))
        where = "workload.synthetic"
    else:
        trace, where = load_any_trace(workload.trace), workload.trace
    if workload.max_tokens is not None:
        trace = select_tokens(trace, slice(0, workload.max_tokens))
    return check_trace_fits(trace, shape, where)


@functools.lru_cache(maxsize=2)
def _model(folder: str):
    from moepic.checkpoint.load import load_model

    return load_model(folder, offload_experts=True)


def _model_folder(name: str | None) -> str:
    from moepic.default_model import model_folder

    return model_folder(name)


# -- simulator -----------------------------------------------------------------------------------


def run_sim(config: ExperimentConfig) -> dict:
    workload = config.workload
    shape = model_shape(workload.model_shape)
    trace = workload_trace(workload, shape)
    # Predictors that read router inputs run for real when the trace has them and the shape is a
    # model folder (its weights); otherwise the noisy oracle of `workload.recall` stands in.
    model = _model(workload.model_shape) if trace.hidden_NLD is not None and shape.name == workload.model_shape else None
    setting = Setting(
        trace=trace, shape=shape, hw=hardware(workload), budget=config.cache.budget, recall=workload.recall, model=model,
        context_tokens=workload.context_tokens,
    )
    start = time.perf_counter()
    ready = prepare(config.setup(), setting)
    configured = time.perf_counter()
    result = simulate(trace, ready.layout, ready.policy, ready.times, setting.hw, ready.predictor)
    summary = result.summary()
    predicted_layers = sum(r is not None for r in result.recall)
    metrics = {
        "ms_per_token": summary["ms_per_token"],
        "p99_ms": summary["p99_ms"],
        "exposed_copy_ms_per_token": summary["exposed_copy_ms_per_token"],
        "expert_hit_rate": summary["expert_hit_rate"],
        "mib_loaded_per_token": summary["bytes_loaded_per_token"] / MIB,
        "prediction_recall": summary["prediction_recall"],
        "prediction_precision": summary["prediction_precision"],
        "predictor_ms_per_token": ready.times.predictor_s * predicted_layers * 1e3,
        "cache_gib": summary["cache_bytes"] / 2**30,
        "staging_gib": summary["staging_bytes"] / 2**30,
        "policy": ready.policy.config.name,
        "tokens": summary["tokens"],
        "configure_s": configured - start,
        "simulate_s": time.perf_counter() - configured,
    }
    return {"metrics": metrics, "layers": [_layer_row(row, layout) for row, layout in zip(summary["layers"], result.layout.layers)]}


def _layer_row(row: dict, layout) -> dict:
    return {
        "layer": row["layer"], "theta": row["theta"], "slots": row["slots"], "cache_mib": layout.cache_bytes / MIB,
        "hit_rate": row["hit_rate"], "mib_loaded_per_token": row["bytes_loaded_per_token"] / MIB,
        "recall": row["recall"], "ms_per_token": row.get("ms_per_token"), "exposed_copy_ms_per_token": row.get("exposed_copy_ms_per_token"),
    }


# -- engine --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _dense_run(folder: str, dataset: str, prompt_tokens: int, new_tokens: int):
    """The prompt (from the middle of the dataset's text), the dense model's greedy tokens and their trace."""
    from moepic.commands.routing_report import DATASETS
    from moepic.runtime.generation import generate
    from moepic.tokenizer import TextCodec
    from moepic.tracing.recorder import RoutingRecorder

    if dataset not in DATASETS:
        raise ConfigError(f"config key engine.dataset: unknown dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}")
    model = _model(folder)
    text = DATASETS[dataset].read_text()
    middle = len(text) // 2
    prompt = TextCodec.from_folder(folder).encode(text[middle : middle + 40 * prompt_tokens])[:prompt_tokens]
    recorder = RoutingRecorder(model.spec, model_name=folder, record_hidden=True)
    dense = generate(model, prompt, max_new_tokens=new_tokens, eos_ids=(), tap=recorder)
    return prompt, dense.token_ids, recorder.trace()


def run_engine(config: ExperimentConfig) -> dict:
    from moepic.runtime.copy_engine import Link
    from moepic.runtime.generation import generate
    from moepic.runtime.offload import OffloadedExperts

    engine_config, cache = config.engine, config.cache
    if cache.budget is None:
        raise ConfigError("backend engine: config key cache.budget is not set (bytes like 64MiB, or a share like 0.25)")
    folder = _model_folder(engine_config.model)
    model = _model(folder)
    prompt, dense_ids, trace = _dense_run(folder, engine_config.dataset, engine_config.prompt_tokens, engine_config.new_tokens)
    shape = ModelShape(name=folder, spec=model.spec, dtype_bytes=model.dtype.itemsize)
    setting = Setting(
        trace=trace, shape=shape, hw=hardware(config.workload), budget=cache.budget, model=model,
        context_tokens=len(prompt) + engine_config.new_tokens // 2,
    )
    ready = prepare(config.setup(), setting)
    link = Link(gbps=cache.link_gbps, latency_us=cache.link_latency_us) if cache.link_gbps else None
    decode_s, report, decode_stats = [], {}, {}
    for repeat in range(engine_config.repeats + 1):  # the first warms up
        engine = OffloadedExperts(model.weights, ready.layout, ready.policy, device=model.device, predictor=ready.predictor, link=link)
        try:
            run = generate(model, prompt, max_new_tokens=engine_config.new_tokens, eos_ids=(), experts=engine)
            report, decode_stats = engine.report(), engine.decode_stats
        finally:
            engine.close()
        if run.token_ids != dense_ids:
            raise AssertionError(f"{config.system}: the offloaded tokens differ from the dense model's")
        if repeat:
            decode_s.append(run.stats.decode_s_per_token)
    tokens = engine_config.new_tokens
    layers = ready.layout.layers
    metrics = {
        "ms_per_token": statistics.median(decode_s) * 1e3,
        "p99_ms": float(np.percentile(np.array(decode_s) * 1e3, 99)),  # over repeats: run-to-run spread
        "exposed_copy_ms_per_token": report["decode_exposed_copy_s_per_token"] * 1e3,
        "expert_hit_rate": report["decode_expert_hit_rate"],
        "mib_loaded_per_token": report["decode_bytes_loaded_per_token"] / MIB,
        "prediction_recall": report["prediction_recall"],
        "prediction_precision": report["prediction_precision"],
        "predictor_ms_per_token": report["predictor_s"] / tokens * 1e3,
        "cache_gib": report["cache_bytes"] / 2**30,
        "staging_gib": report["staging_bytes"] / 2**30,
        "policy": ready.policy.config.name,
        "tokens": tokens,
        "exact": True,
    }
    rows = [
        {"layer": l.layer, "theta": l.theta, "slots": l.slots, "cache_mib": l.cache_bytes / MIB,
         "hit_rate": decode_stats[l.layer].hit_rate, "mib_loaded_per_token": decode_stats[l.layer].bytes_loaded / tokens / MIB,
         "recall": recall, "ms_per_token": None, "exposed_copy_ms_per_token": None}  # the engine does not time layers
        for l, recall in zip(layers, report["layer_prediction_recall"])
    ]
    return {"metrics": metrics, "layers": rows}
