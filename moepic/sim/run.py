"""One simulated run: a setup (baseline or run config) on a trace, a model shape and a hardware profile. Pure (it times itself).

    setup ─▶ policy, predictor (a noisy_oracle stands in where the trace has no router inputs)
          └▶ layout: θ and an even budget split, or the configurator's per-layer choice on the
             latency model (workload measured on the same trace, recall measured from the predictor)
    trace ─▶ steps (the trace's order, or its requests `batch` at a time: moepic/sim/steps.py)
    trace, steps, layout, policy, predictor, times ─▶ simulate ─▶ SimResult
"""

from __future__ import annotations

import time

import attrs

from moepic.cache.layout import CacheLayout, budget_bytes, plan_layout, staging_buffers
from moepic.configurators import CONFIGURATORS
from moepic.configurators.base import configure_on_trace
from moepic.core.spec import ModelSpec
from moepic.errors import ConfigError
from moepic.perfmodel.host_costs import check_priceable
from moepic.perfmodel.hardware import HardwareProfile
from moepic.perfmodel.latency import layer_model_times
from moepic.perfmodel.workload import measured_recall
from moepic.policies.base import build_policy_on
from moepic.predictors import PREDICTORS, PredictorConfig
from moepic.predictors.noisy_oracle import NoisyOracleConfig
from moepic.quant import FormatConfig, build_format
from moepic.quant.format import check_miss_format, expert_shape
from moepic.sim.baseline import Setup
from moepic.sim.result import SimResult
from moepic.sim.shapes import ModelShape
from moepic.sim.simulate import simulate
from moepic.sim.steps import TraceSteps, batched_steps, trace_steps
from moepic.tracing import RoutingTrace
from moepic.tracing.checks import fit_trace_to_model


@attrs.frozen
class SpecOnly:
    """A model without weights: what the oracle predictors need of one."""

    spec: ModelSpec


@attrs.frozen(kw_only=True, eq=False)
class Testbed:
    """What every setup of a comparison runs on: the routing, the model shape, the hardware, and the
    budget, stand-in recall and weights given for all of them (a setup is one system, sim.baseline)."""

    __test__ = False  # pytest collects classes named Test*: this one is not a test

    trace: RoutingTrace
    shape: ModelShape
    hw: HardwareProfile
    budget: str | float | None = None  # global: caches and staging; None: the setup's own
    recall: float | tuple[float, ...] | None = None  # a noisy_oracle's (per MoE layer), standing in for a predictor that cannot run here
    model: object | None = None  # a loaded model (weights), for gate_lookahead/mlp on recorded router inputs
    context_tokens: int = 512
    hybrid: str | None = None  # global: where loads run; None: the setup's own
    miss_format: FormatConfig | None = None  # global: misses served from a low-bit copy; None: the setup's own
    # The trace's requests decoded `batch` at a time (continuous batching), cut into pieces of
    # `stream_tokens` decode tokens where given (moepic/sim/steps.py); 1, None: one after another.
    batch: int = 1
    stream_tokens: int | None = None

    def steps(self) -> TraceSteps:
        return batched_steps(self.trace, self.batch, self.stream_tokens)


def hybrid_of(setup: Setup, testbed: Testbed) -> str:
    return testbed.hybrid if testbed.hybrid is not None else setup.hybrid


def resolve_predictor(config: PredictorConfig, testbed: Testbed):
    """The predictor to run: the setup's own, or a noisy_oracle of the given recall where it cannot run."""
    trace = testbed.trace
    if config.needs_router_inputs and (testbed.model is None or trace.hidden_NLD is None):
        if testbed.recall is None:
            missing = "the trace has no router inputs" if trace.hidden_NLD is None else "no model weights were given (--model)"
            raise ConfigError(
                f"the {config.name} predictor cannot run here ({missing}); give --recall R to simulate it as a "
                "noisy_oracle of that recall"
            )
        if getattr(config, "horizon", 1) > 1:
            raise ConfigError(
                f"the noisy_oracle standing in for the {config.name} predictor names one MoE layer ahead, not "
                f"{config.horizon}; run the predictor itself on a trace recorded with --trace-hidden (and --model)"
            )
        config = NoisyOracleConfig(recall=testbed.recall, candidates=getattr(config, "candidates", None))
    model = testbed.model if config.needs_router_inputs else SpecOnly(testbed.shape.spec)
    # An oracle reads the future of the run it predicts: the simulated trace, whatever file it names.
    future = {"future": trace} if config.reads_the_future else {}
    return PREDICTORS.build(config, model, **future)


def setup_layout(setup: Setup, testbed: Testbed, policies, predictor, times, routed=None) -> tuple[CacheLayout, object]:
    """The layout and the policy to run it with: θ and an even split with the first policy, or the
    configurator's choice on the trace among `policies` (the fastest predicted), replayed in the
    order it is `routed` (a batch's: moepic/sim/steps.py `TraceSteps.routed`; default: the trace's)."""
    spec, dtype_bytes, fmt = testbed.shape.spec, testbed.shape.dtype_bytes, testbed.shape.expert_formats
    staging = staging_buffers(spec.moe.top_k, predictor)
    budget = testbed.budget if testbed.budget is not None else setup.budget
    if budget is None:
        raise ConfigError(f"{setup.name}: no budget; give --budget (bytes like 24GiB, or a share of all expert bytes like 0.25)")
    if setup.configurator is None or isinstance(budget, (list, tuple)):
        layout = plan_layout(spec, dtype_bytes=dtype_bytes, budget=budget, theta=setup.theta, staging_experts=staging,
                             expert_format=fmt, miss_format=miss_format_of(setup, testbed))
        return layout, policies[0]
    total = budget_bytes(budget, testbed.shape.expert_bytes, "--budget")
    configured = configure_on_trace(
        CONFIGURATORS.build(setup.configurator), testbed.trace if routed is None else routed, policies, hw=testbed.hw, times=times,
        recall_L=measured_recall(testbed.trace, predictor), candidates=predictor.candidates, budget_bytes=total,
        staging_experts=staging, hybrid=hybrid_of(setup, testbed), dtype_bytes=dtype_bytes,
    )
    chosen = configured.chosen
    if chosen.staging_experts == 0:  # everything fits whole
        layout = plan_layout(spec, dtype_bytes=dtype_bytes, budget=total, theta=1.0, staging_experts=staging, expert_format=fmt,
                             miss_format=miss_format_of(setup, testbed))
    else:
        layout = plan_layout(
            spec, dtype_bytes=dtype_bytes, budget=[f"{b}B" for b in chosen.cache_bytes()], theta=chosen.thetas(times[0].block),
            staging_experts=staging, expert_format=fmt, miss_format=miss_format_of(setup, testbed),
        )
    return layout, configured.policy


@attrs.frozen(eq=False)
class Prepared:
    """A setup made concrete for a testbed: what the engine would be built from, and the times."""

    policy: object
    predictor: object
    layout: CacheLayout
    times: object
    steps: TraceSteps | None = None  # the order the trace is routed in (None: its own)


@attrs.frozen(eq=False)
class SetupRun:
    result: SimResult
    configure_s: float  # building policy, predictor and layout (the configurator's replays included)
    simulate_s: float  # the simulation alone

    @property
    def layer_steps_per_s(self) -> float:
        return self.result.steps * len(self.result.layout.layers) / max(self.simulate_s, 1e-9)


def prepare(setup: Setup, testbed: Testbed) -> Prepared:
    """Policy, predictor and layout. A setup with `policy_choices` and a configurator configures
    each candidate policy and keeps the one the latency model predicts fastest on the trace."""
    if hybrid_of(setup, testbed) != "off":
        for fmt in testbed.shape.expert_formats:
            check_priceable(fmt, f"{setup.name} (hybrid {hybrid_of(setup, testbed)})")
    if miss_format_of(setup, testbed) is not None:
        spec = testbed.shape.spec
        check_miss_format(miss_format_of(setup, testbed), testbed.shape.expert_formats, hybrid_of(setup, testbed),
                          shape=expert_shape(spec))
    predictor = resolve_predictor(setup.predictor, testbed)
    times = layer_model_times(
        testbed.hw, testbed.shape.spec, dtype_bytes=testbed.shape.dtype_bytes, context_tokens=testbed.context_tokens,
        predictor=predictor.horizon > 0, expert_formats=testbed.shape.expert_formats, miss_format=miss_format_of(setup, testbed),
    )
    steps = testbed.steps()
    # A policy that reads the future (belady) reads it in the order the run routes it.
    routed = steps.routed(testbed.trace)
    policies = [build_policy_on(config, routed) for config in setup.policy_choices or (setup.policy,)]
    layout, policy = setup_layout(setup, testbed, policies, predictor, times, routed)
    return Prepared(policy, predictor, layout, times, steps)


def miss_format_of(setup: Setup, testbed: Testbed):
    """The built miss format a setup runs with (the testbed's, else its own `cache.miss_format`), or None."""
    config = testbed.miss_format if testbed.miss_format is not None else setup.miss_format
    return None if config is None else build_format(config)


def run_setup(setup: Setup, testbed: Testbed) -> SetupRun:
    start = time.perf_counter()
    ready = prepare(setup, testbed)
    configured = time.perf_counter()
    result = simulate(
        testbed.trace, ready.layout, ready.policy, ready.times, testbed.hw, ready.predictor, hybrid=hybrid_of(setup, testbed),
        steps=ready.steps,
    )
    return SetupRun(result, configured - start, time.perf_counter() - configured)


def check_trace_fits(trace: RoutingTrace, shape: ModelShape, where: str) -> RoutingTrace:
    """`trace` as the shape's routing (moepic/tracing/checks.py), if it has decode steps to time; else a clear error."""
    fitted = fit_trace_to_model(trace, shape.spec, where, model=f"the model shape {shape.name}")
    if not trace_steps(fitted).decode_S.any():
        raise ConfigError(f"{where}: the trace has no decode tokens to time (only prompt steps)")
    return fitted

