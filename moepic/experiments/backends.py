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
from pathlib import Path

import attrs
import numpy as np

from moepic.errors import ConfigError
from moepic.experiments.config import ExperimentConfig, RecordedConfig, WorkloadConfig
from moepic.perfmodel.hardware import HardwareProfile, load_host, load_profile
from moepic.sim.run import Testbed, check_trace_fits, prepare
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
    if workload.host is not None:
        hw = attrs.evolve(hw, host=load_host(workload.host))
    return attrs.evolve(hw, link_gbps=workload.link_gbps) if workload.link_gbps else hw


def shape_of(workload: WorkloadConfig) -> ModelShape:
    return model_shape(_model_folder(None) if workload.model_shape == "bundled" else workload.model_shape)


@functools.lru_cache(maxsize=4)
def workload_trace(workload: WorkloadConfig) -> RoutingTrace:
    """The workload's routing, checked against its shape and cut to `max_tokens`."""
    shape = shape_of(workload)
    if workload.source == "synthetic":
        trace, where = synthetic_trace(workload, shape), "workload.synthetic"
    elif workload.source == "recorded":
        trace, where = recorded_run(_shape_folder(workload), workload.recorded).trace, "workload.recorded"
    elif workload.trace is None:
        raise ConfigError("config key workload.trace: not set, and workload.source is trace (give a .npz or .jsonl file)")
    else:
        trace, where = load_any_trace(workload.trace, num_experts=shape.spec.moe.num_experts), workload.trace
    if workload.max_tokens is not None:
        trace = select_tokens(trace, slice(0, workload.max_tokens))
    return check_trace_fits(trace, shape, where)


def synthetic_trace(workload: WorkloadConfig, shape: ModelShape) -> RoutingTrace:
    synthetic, spec = workload.synthetic, shape.spec
    L, E, k = len(spec.moe_layers), spec.moe.num_experts, spec.moe.top_k
    if synthetic.params is not None:
        laws = load_synthetic(synthetic.params).for_shape(E, k, L)
    else:
        laws = SyntheticRouting(
            num_experts=E, top_k=k, skew=[synthetic.skew] * L, reuse=[synthetic.reuse] * L,
            decay=[synthetic.decay] * L, correlation=[0.0] + [synthetic.correlation] * (L - 1),
        )
    return generate_trace(laws, synthetic.tokens, synthetic.seed, min(synthetic.sequences, synthetic.tokens))


@attrs.frozen(eq=False)
class RecordedRun:
    prompts: list[list[int]]
    token_ids: list[list[int]]  # the dense model's greedy tokens, per request
    trace: RoutingTrace  # every request's routing (prompt and decode), with router inputs


@functools.lru_cache(maxsize=2)
def recorded_run(folder: str, recorded: RecordedConfig) -> RecordedRun:
    """The dense model's greedy runs of `recorded.requests` prompts, cut one after another from the
    middle of the dataset's text (its second half: the mlp predictor trains on the first)."""
    from moepic.datasets import DATASETS
    from moepic.tokenizer import TextCodec

    if recorded.dataset not in DATASETS:
        raise ConfigError(f"config key workload.recorded.dataset: unknown dataset {recorded.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    text = DATASETS[recorded.dataset].read_text()
    ids = TextCodec.from_folder(folder).encode(text[len(text) // 2 :])
    n = recorded.prompt_tokens
    if len(ids) < recorded.requests * n:
        raise ConfigError(f"workload.recorded: {recorded.dataset}'s second half has {len(ids)} tokens, fewer than "
                          f"{recorded.requests} prompts of {n}")
    prompts = [ids[i * n : (i + 1) * n] for i in range(recorded.requests)]
    token_ids, trace = record_greedy(folder, prompts, recorded.new_tokens, source=f"{folder} on {recorded.dataset}")
    return RecordedRun(prompts, token_ids, trace)


def training_routing(folder: str, *, requests: int = 16, prompt_tokens: int = 32, new_tokens: int = 64,
                     dataset: str = "kjv-heldout") -> RoutingTrace:
    """Routing to learn from, never evaluated on: the model's greedy runs of `requests` prompts cut at
    even strides across the *first* half of the dataset's text (recorded workloads use the second)."""
    from moepic.datasets import DATASETS
    from moepic.tokenizer import TextCodec

    text = DATASETS[dataset].read_text()
    ids = TextCodec.from_folder(folder).encode(text[: len(text) // 2])
    stride = len(ids) // requests
    prompts = [ids[i * stride : i * stride + prompt_tokens] for i in range(requests)]
    return record_greedy(folder, prompts, new_tokens, source=f"{Path(folder).name} on {dataset}'s first half", progress=True)[1]


def record_greedy(folder: str, prompts: list[list[int]], new_tokens: int, *, source: str,
                  progress: bool = False) -> tuple[list[list[int]], RoutingTrace]:
    """The dense model's greedy tokens for each prompt, and the routing of all of them (with router inputs)."""
    from moepic.progress import bar
    from moepic.runtime.generation import generate
    from moepic.tracing.recorder import RoutingRecorder

    model = _model(folder)
    recorder = RoutingRecorder(model.spec, model_name=folder, record_hidden=True)
    token_ids = []
    with bar(total=len(prompts), desc="recording routing", unit="request", wanted=progress) as done:
        for i, prompt in enumerate(prompts):
            if i:
                recorder.begin_sequence()
            token_ids.append(generate(model, prompt, max_new_tokens=new_tokens, eos_ids=(), tap=recorder).token_ids)
            done.update(1)
    return token_ids, recorder.trace(source=source)


@functools.lru_cache(maxsize=2)
def _model(folder: str):
    from moepic.checkpoint.load import load_model

    return load_model(folder, offload_experts=True)


def _model_folder(name: str | None) -> str:
    from moepic.default_model import model_folder

    return model_folder(name)


def _shape_folder(workload: WorkloadConfig) -> str:
    """The model folder a recorded workload (and the engine) runs."""
    name = workload.model_shape
    if name == "bundled":
        return _model_folder(None)
    if not Path(name).is_dir():
        raise ConfigError(f"config key workload.model_shape: a recorded workload runs a model; {name!r} is not a model folder (or bundled)")
    return name


# -- simulator -----------------------------------------------------------------------------------


def run_sim(config: ExperimentConfig) -> dict:
    workload = config.workload
    shape = shape_of(workload)
    trace = workload_trace(workload)
    # Predictors that read router inputs run for real on a recorded workload (the trace has them,
    # and the model's weights are at hand); otherwise the noisy oracle of `workload.recall` stands in.
    model = _model(_shape_folder(workload)) if workload.source == "recorded" else None
    context = _recorded_context(workload.recorded) if workload.source == "recorded" else workload.context_tokens
    testbed = Testbed(
        trace=trace, shape=shape, hw=hardware(workload), budget=config.cache.budget, recall=workload.recall, model=model,
        context_tokens=context, batch=workload.batch, stream_tokens=workload.stream_tokens,
    )
    start = time.perf_counter()
    setup = config.setup()
    ready = prepare(setup, testbed)
    configured = time.perf_counter()
    result = simulate(trace, ready.layout, ready.policy, ready.times, testbed.hw, ready.predictor, hybrid=setup.hybrid,
                      steps=ready.steps)
    summary = result.summary()
    metrics = {
        "ms_per_token": summary["ms_per_token"],  # per stream: a step's time, weighted by its tokens
        "ms_per_step": summary["ms_per_step"],
        "tokens_per_s": summary["tokens_per_s"],  # all streams together
        "batch": workload.batch,
        "p99_ms": summary["p99_ms"],
        "exposed_copy_ms_per_token": summary["exposed_copy_ms_per_token"],
        "expert_hit_rate": summary["expert_hit_rate"],
        "mib_loaded_per_token": summary["bytes_loaded_per_token"] / MIB,
        "prediction_recall": summary["prediction_recall"],
        "prediction_precision": summary["prediction_precision"],
        "predictor_ms_per_token": result.predictor_s * 1e3,
        "hybrid": setup.hybrid,
        "host_ms_per_token": summary["host_ms_per_token"],
        "host_wait_ms_per_token": summary["host_wait_ms_per_token"],
        "cache_mib": summary["cache_bytes"] / MIB,
        "staging_mib": summary["staging_bytes"] / MIB,
        "policy": ready.policy.config.name,
        "tokens": summary["tokens"],
        "steps": summary["steps"],  # decode steps: one per token at batch 1
        "configure_s": configured - start,
        "simulate_s": time.perf_counter() - configured,
    }
    return {"metrics": metrics, "layers": [_layer_row(row, layout) for row, layout in zip(summary["layers"], result.layout.layers)]}


def _recorded_context(recorded: RecordedConfig) -> int:
    return recorded.prompt_tokens + recorded.new_tokens // 2  # a decode step's mean context


def _layer_row(row: dict, layout) -> dict:
    return {
        "layer": row["layer"], "theta": row["theta"], "slots": row["slots"], "cache_mib": layout.cache_bytes / MIB,
        "hit_rate": row["hit_rate"], "mib_loaded_per_token": row["bytes_loaded_per_token"] / MIB,
        "recall": row["recall"], "ms_per_token": row.get("ms_per_token"), "exposed_copy_ms_per_token": row.get("exposed_copy_ms_per_token"),
    }


# -- engine --------------------------------------------------------------------------------------


def run_engine(config: ExperimentConfig) -> dict:
    from moepic.runtime.copy_engine import Link
    from moepic.runtime.generation import generate
    from moepic.runtime.offload import OffloadedExperts

    workload, cache = config.workload, config.cache
    if workload.source != "recorded":
        raise ConfigError("backend engine runs workload.recorded on its model: set workload.source=recorded "
                          "(and workload.model_shape=bundled or a model folder)")
    if cache.budget is None:
        raise ConfigError("backend engine: config key cache.budget is not set (bytes like 64MiB, or a share like 0.25)")
    if workload.batch != 1 or workload.stream_tokens is not None:
        raise ConfigError("backend engine: workload.batch and workload.stream_tokens are the simulator's (the engine "
                          "backend generates one request after another); set them to 1 and null")
    if workload.link_gbps is not None:
        raise ConfigError("backend engine: workload.link_gbps rescales a simulated GPU's link; the engine copies over "
                          "this machine's link, emulated at cache.link_gbps on a CPU")
    folder = _shape_folder(workload)
    model = _model(folder)
    run = recorded_run(folder, workload.recorded)
    shape = ModelShape(name=folder, spec=model.spec, dtype_bytes=model.dtype.itemsize)
    testbed = Testbed(
        trace=run.trace, shape=shape, hw=hardware(workload), budget=cache.budget, model=model,
        context_tokens=_recorded_context(workload.recorded),
    )
    setup = config.setup()
    ready = prepare(setup, testbed)
    link = Link(gbps=cache.link_gbps, latency_us=cache.link_latency_us) if cache.link_gbps else None
    pricing = None
    if setup.hybrid == "auto":  # priced as `moepic generate` prices it on this machine
        from moepic.quant import format_of
        from moepic.runtime.host_pricing import run_pricing

        expert = next(lw.ffn.experts[0] for lw in model.weights.layers if hasattr(lw.ffn, "experts"))
        pricing = run_pricing(model.device, model.dtype.itemsize, host=None, link=link, threads=None,
                              expert_format=format_of(expert))
    ms_per_token, report, decode_stats = [], {}, {}
    for repeat in range(config.engine.repeats + 1):  # the first warms up
        engine = OffloadedExperts(model.weights, ready.layout, ready.policy, device=model.device, predictor=ready.predictor,
                                  link=link, hybrid=setup.hybrid, pricing=pricing)
        decode_s = steps = 0
        try:
            for prompt, expected in zip(run.prompts, run.token_ids):
                out = generate(model, prompt, max_new_tokens=workload.recorded.new_tokens, eos_ids=(), experts=engine)
                if out.token_ids != expected:
                    raise AssertionError(f"{config.system}: the offloaded tokens differ from the dense model's")
                decode_s, steps = decode_s + out.stats.decode_s, steps + out.stats.tokens - 1
            report, decode_stats = engine.report(), engine.decode_stats
        finally:
            engine.close()
        if repeat:
            ms_per_token.append(decode_s / max(steps, 1) * 1e3)
    tokens = next(iter(decode_stats.values())).tokens
    metrics = {
        "ms_per_token": statistics.median(ms_per_token),
        "p99_ms": float(np.percentile(ms_per_token, 99)),  # over repeats: the run-to-run spread
        "exposed_copy_ms_per_token": report["decode_exposed_copy_s_per_token"] * 1e3,
        "expert_hit_rate": report["decode_expert_hit_rate"],
        "mib_loaded_per_token": report["decode_bytes_loaded_per_token"] / MIB,
        "prediction_recall": report["prediction_recall"],
        "prediction_precision": report["prediction_precision"],
        "predictor_ms_per_token": report["predictor_s"] / max(tokens, 1) * 1e3,  # measured: every step's predictions
        "cache_mib": report["cache_bytes"] / MIB,
        "staging_mib": report["staging_bytes"] / MIB,
        "policy": ready.policy.config.name,
        "tokens": tokens,
        "exact": True,  # every run's tokens equal the dense model's (checked above)
    }
    rows = [
        {"layer": l.layer, "theta": l.theta, "slots": l.slots, "cache_mib": l.cache_bytes / MIB,
         "hit_rate": decode_stats[l.layer].hit_rate, "mib_loaded_per_token": decode_stats[l.layer].bytes_loaded / max(tokens, 1) / MIB,
         "recall": recall, "ms_per_token": None, "exposed_copy_ms_per_token": None}  # the engine does not time layers
        for l, recall in zip(ready.layout.layers, report["layer_prediction_recall"])
    ]
    return {"metrics": metrics, "layers": rows}
