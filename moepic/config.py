"""The run schema: the frozen attrs classes a run reads (model, sampling, generation, cache), and
`load_config`, where YAML + overrides become them. Pure, apart from reading the YAML files.

How YAML becomes attrs (unknown keys, types, ranges, `${a.b}` interpolation, no resolvers) is
moepic/structure.py; which strategy a node names, and the default one, is each strategy's registry.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal

import attrs

from moepic.cache.layout import budget_bytes
from moepic.policies import POLICIES, PolicyConfig
from moepic.predictors import PREDICTORS, PredictorConfig
from moepic.quant import FormatConfig
from moepic.ranges import HOST_THREADS, LINK_GBPS, LINK_LATENCY_US, SEED, THETA, Range
from moepic.structure import load_layers


@attrs.frozen(kw_only=True)
class ModelConfig:
    # A Hugging Face model folder; None means the built-in default model.
    path: str | None = None
    # "auto" keeps the checkpoint's dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"
    # Refuse a weight with NaN/Inf as it loads (one sum per tensor: 0.01-0.03 s per GB
    # with the file in the page cache, up to 0.26 s per GB cold; experiments/bench_weight_check.py).
    check_weights: bool = True
    # How routed experts are kept. None: as the checkpoint stores them (dense, GPT-OSS's MXFP4, or
    # what `moepic quantize` wrote); dense: dequantised on load; int8, int4, mxfp4, fp8: encoded as they
    # load (moepic/quant).
    expert_format: FormatConfig | None = None


@attrs.frozen(kw_only=True)
class SamplingConfig:
    greedy: bool = False
    # Above 100 the distribution is uniform to within float rounding: a larger value is a typo.
    temperature: float = attrs.field(default=0.8, validator=Range(0, 100, low_open=True))
    top_p: float = attrs.field(default=0.95, validator=Range(0, 1, low_open=True))
    seed: int = attrs.field(default=0, validator=SEED)


@attrs.frozen(kw_only=True)
class GenerateConfig:
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = attrs.field(default=None, validator=Range(0, 2**31 - 1, whole=True))
    # 2**20: beyond every model's context (the model's own limit is checked once its config is read).
    max_new_tokens: int = attrs.field(default=32, validator=Range(1, 2**20, whole=True))
    # Write the routing of every token (prompt and generated) to this .npz file (moepic/tracing).
    record_trace: str | None = None
    # Also store each MoE layer's router input in the trace (for training predictors).
    trace_hidden: bool = False
    # Offloaded runs: write one JSON line per token (latency, exposed copy time, bytes) to this file.
    token_log: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.prompt is not None and self.prompt_ids is not None:
            raise ValueError("give generate.prompt or generate.prompt_ids, not both")


def _budget_value(instance, attribute, value) -> None:
    """A budget's form (unit, sign, size) is checked on load, before any work; its bytes need the model."""
    values = value if isinstance(value, tuple) else () if value is None else (value,)
    for i, item in enumerate(values):
        budget_bytes(item, 1, f"cache.budget[{i}]" if isinstance(value, tuple) else "cache.budget")


@attrs.frozen(kw_only=True)
class CacheConfig:
    """Expert offloading (README, "Offloading"). No budget: every expert stays on the device."""

    # Device memory for routed experts: bytes ("512MiB") or a fraction of all expert bytes (0.25),
    # cache and staging together; or a list with one cache size per MoE layer.
    budget: str | float | tuple[str | float, ...] | None = attrs.field(default=None, validator=_budget_value)
    # Split ratio θ: the share of each expert's neurons (its top segment) that the cache keeps.
    # One value, or one per MoE layer; rounded down to whole neuron blocks. None: automatic
    # (moepic.cache.layout.plan_layout: whole experts when the budget holds them all, else 0.5).
    theta: float | tuple[float, ...] | None = attrs.field(default=None, validator=THETA)
    # Replacement policy, by name: {name: lcp, rho: 0.25, window: 128}; see moepic/policies.
    policy: PolicyConfig = POLICIES.default_config()
    # Expert predictor for prefetching: {name: gate_lookahead, candidates: 2, horizon: 1}; see moepic/predictors.
    predictor: PredictorConfig = PREDICTORS.default_config()  # none: load on demand
    # CPU runs only: emulate a host→device link of this bandwidth (GB/s) and per-copy latency (µs).
    link_gbps: float | None = attrs.field(default=None, validator=LINK_GBPS)
    link_latency_us: float = attrs.field(default=0.0, validator=LINK_LATENCY_US)
    # Compute a partial hit's cached top while its bottom is still being copied. Faster where copies
    # are exposed, but the split sum rounds differently: results equal the dense model's only up to
    # floating-point rounding (off: bit for bit).
    overlap_top: bool = False
    # Where loads run (moepic/cache/placement.py): `off` copies every miss and bottom to the device
    # (bit for bit the dense model); `auto` computes each on the host CPU instead where that
    # finishes sooner, priced by the host profile; `host-only` computes all of them on the host.
    # With the host in the sum, results equal the dense model's up to floating-point rounding.
    hybrid: Literal["off", "auto", "host-only"] = "off"
    # Host worker threads for hybrid runs; None: the physical cores left after the main thread.
    host_threads: int | None = attrs.field(default=None, validator=HOST_THREADS)
    # The host profile pricing `auto` on a CUDA device (a bundled name or a YAML file, as `--host`);
    # None: measured at start-up. On a CPU device the host is the device: not allowed.
    host: str | None = None
    # HOBBIT-style, opt-in, changes numbers: an expert loaded whole (a miss) is copied and computed
    # as its low-bit copy in this format ({name: int4, group_size: 64}), while the cache keeps the
    # expert itself (its top filled from the host behind the step's copies). None: misses move the expert.
    miss_format: FormatConfig | None = None


@attrs.frozen(kw_only=True)
class ServeConfig:
    """`moepic serve` (moepic/serve): where it listens and how many requests it holds at once."""

    # Loopback by default: the server has no authentication, so reaching it from elsewhere is a choice.
    bind: str = "127.0.0.1"
    port: int = attrs.field(default=8000, validator=Range(0, 65535, whole=True))  # 0: any free port (announced)
    # The name clients give as `model`; None: the model folder's name.
    model_name: str | None = None
    max_batch: int = attrs.field(default=8, validator=Range(1, 1024, whole=True))  # requests decoded together
    max_queue: int = attrs.field(default=64, validator=Range(0, 10**6, whole=True))  # waiting beyond them; more: 429
    # A chat request without max_tokens may generate what the context has left, up to this many tokens:
    # its KV cache is allocated whole when it starts, so a long-context model's full context per
    # request would exhaust memory at a handful of requests.
    default_max_tokens: int = attrs.field(default=2048, validator=Range(1, 2**20, whole=True))
    # Prompt tokens a request puts through per step while the others decode; None: a prompt at once.
    prefill_chunk: int | None = attrs.field(default=None, validator=Range(1, 2**20, whole=True))
    # On Ctrl-C / SIGTERM: seconds in-flight requests may take to finish before they are cancelled.
    drain_s: float = attrs.field(default=30.0, validator=Range(0, 3600))


@attrs.frozen(kw_only=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    generate: GenerateConfig = GenerateConfig()
    sampling: SamplingConfig = SamplingConfig()
    cache: CacheConfig = CacheConfig()
    serve: ServeConfig = ServeConfig()


def load_config(
    yaml_path: str | Path | None = None, overrides: typing.Sequence[str] = (), *, allow_env: bool = False
) -> RunConfig:
    """defaults ← YAML file ← `key=value` overrides, validated into a frozen RunConfig."""
    return load_layers(RunConfig, [yaml_path], overrides, allow_env=allow_env)
