"""What a simulation counts, and the report it makes of it. Pure (plain counters).

The cache counters fold into the same `LayerCacheStats` the engine reports, split into decode
(one token, or one of each stream of a batch) and prefill steps, and the byte and prediction counters mean what the engine's do
(moepic/runtime/engine_stats.py), so a simulated run and a real one compare field by field.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from moepic.cache.layout import CacheLayout, LayerCacheLayout
from moepic.cache.stats import HostCounts, LayerCacheStats, PredictionCounts, summary


class Counters:
    """What the simulator counts as it goes, per MoE layer (by column) and for the whole run."""

    def __init__(self, layers: Sequence[LayerCacheLayout]) -> None:
        self.decode = [LayerCacheStats(layer=l.layer) for l in layers]  # decode steps
        self.prefill = list(self.decode)
        self.predicted = [PredictionCounts() for _ in layers]  # decode steps
        self.host = [HostCounts() for _ in layers]  # decode steps
        self.demand = self.prefetch = self.wasted = self.kept_bytes = 0  # bytes, as the engine counts them
        self.cancelled = self.kept_count = 0
        self.miss_fill_bytes = 0  # admitted tops of misses served from their low-bit copy (cache.miss_format)

    def kept(self, nbytes: int) -> None:
        self.kept_count += 1
        self.kept_bytes += nbytes

    def result(
        self, *, token_s, exposed_s, layer_time_L, exposed_L, predictor_s: float, layout: CacheLayout, hybrid: str = "off",
        host_s=None, host_wait_s=None, step_tokens=None,
    ) -> SimResult:
        def ratio(a, b):
            return a / b if b else None

        return SimResult(
            layout=layout,
            decode=tuple(self.decode),
            prefill=tuple(self.prefill),
            token_s=token_s,
            exposed_s=exposed_s,
            layer_s=layer_time_L / max(1, len(token_s)),
            layer_exposed_s=exposed_L / max(1, len(token_s)),
            predictor_s=predictor_s,
            recall=tuple(r.recall for r in self.predicted),
            precision=tuple(r.precision for r in self.predicted),
            demand_bytes=self.demand,
            prefetch_bytes=self.prefetch,
            wasted_prefetch_bytes=self.wasted,
            cancelled_prefetches=self.cancelled,
            kept_prefetches=self.kept_count,
            kept_prefetch_bytes=self.kept_bytes,
            miss_fill_bytes=self.miss_fill_bytes,
            overall_recall=ratio(sum(r.correct for r in self.predicted), sum(r.routed for r in self.predicted)),
            overall_precision=ratio(sum(r.correct for r in self.predicted), sum(r.predicted for r in self.predicted)),
            hybrid=hybrid,
            host=tuple(self.host),
            host_s=np.zeros(len(token_s)) if host_s is None else host_s,
            host_wait_s=np.zeros(len(token_s)) if host_wait_s is None else host_wait_s,
            step_tokens=np.ones(len(token_s), np.int64) if step_tokens is None else step_tokens,
        )


@attrs.frozen(kw_only=True, eq=False)
class SimResult:
    layout: CacheLayout
    decode: tuple[LayerCacheStats, ...]  # per MoE layer, decode steps
    prefill: tuple[LayerCacheStats, ...]
    # Per decode step (a token at batch 1; with a batch, one token of each running stream): a
    # stream waits a step per token, so its latency per token is the step's.
    token_s: np.ndarray  # [decode steps] simulated latency
    exposed_s: np.ndarray  # [decode steps] time compute waited for copies
    layer_s: np.ndarray  # [L] mean time per decode step in each MoE layer (attention to last expert): a stream's per token
    layer_exposed_s: np.ndarray  # [L] of which compute waited for copies
    predictor_s: float  # per decode step: the predictions every layer ran (inside token_s)
    recall: tuple[float | None, ...]  # per MoE layer, decode steps (None: not predicted)
    precision: tuple[float | None, ...]
    overall_recall: float | None
    overall_precision: float | None
    demand_bytes: int  # whole run (prefill too), as the engine counts them
    prefetch_bytes: int
    wasted_prefetch_bytes: int
    cancelled_prefetches: int
    kept_prefetches: int
    kept_prefetch_bytes: int
    miss_fill_bytes: int = 0  # admitted tops of misses served from their low-bit copy, filled from the host
    hybrid: str = "off"  # where loads ran (moepic/cache/placement.py)
    host: tuple[HostCounts, ...] = ()  # per MoE layer, decode steps
    host_s: np.ndarray = attrs.field(factory=lambda: np.zeros(0))  # [decode steps] the host's busy time
    host_wait_s: np.ndarray = attrs.field(factory=lambda: np.zeros(0))  # [decode steps] of which the device waited for
    step_tokens: np.ndarray = attrs.field(factory=lambda: np.zeros(0, np.int64))  # [decode steps] tokens in each (the batch)

    @property
    def steps(self) -> int:
        return len(self.token_s)

    @property
    def tokens(self) -> int:
        """Decode tokens: one a step at batch 1."""
        return int(self.step_tokens.sum())

    def per_token(self, per_step: np.ndarray) -> float | None:
        """Work done per step (the host's busy seconds) summed over the run, per decode token, as the
        engine divides it; at batch 1 the mean per step."""
        return float(per_step.sum() / self.tokens) if self.tokens else None

    def per_stream(self, per_step: np.ndarray) -> float | None:
        """A wait every stream of a step sees (its time, its copy waits) per token of a stream: the
        steps' mean weighted by their tokens; at batch 1 the mean per step."""
        return float((per_step * self.step_tokens).sum() / self.tokens) if self.tokens else None

    def summary(self) -> dict[str, object]:
        """Decode figures per token and per MoE layer (JSON-ready). With a batch: `ms_per_token` is
        what a stream waits per token (each step's time, weighted by its tokens), and so are the
        copy and host waits; `ms_per_step` is a step's mean, `tokens_per_s` all streams together;
        amounts (bytes, the host's busy time) are per token, as the engine counts them, and the hit
        rate is per (step, expert) load. The layer rows are means per decode step."""
        cache = summary(self.decode, self.tokens)
        ms = self.token_s * 1e3
        q = (lambda p: float(np.percentile(ms, p))) if self.tokens else (lambda p: None)
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "ms_per_token": self.per_stream(ms),
            "ms_per_step": float(ms.mean()) if self.tokens else None,
            "tokens_per_s": float(self.tokens / self.token_s.sum()) if self.tokens else None,
            "p50_ms": q(50),
            "p99_ms": q(99),
            "exposed_copy_ms_per_token": self.per_stream(self.exposed_s) * 1e3 if self.tokens else None,
            "exposed_copy_ms_per_step": float(self.exposed_s.mean() * 1e3) if self.tokens else None,
            "expert_hit_rate": cache["expert_hit_rate"],
            "hits": cache["hits"],
            "partial_hits": cache["partial_hits"],
            "misses": cache["misses"],
            "bytes_loaded_per_token": cache["bytes_loaded_per_token"],
            "prediction_recall": self.overall_recall,
            "prediction_precision": self.overall_precision,
            "demand_bytes": self.demand_bytes,
            "prefetch_bytes": self.prefetch_bytes,
            "wasted_prefetch_bytes": self.wasted_prefetch_bytes,
            "cancelled_prefetches": self.cancelled_prefetches,
            "kept_prefetches": self.kept_prefetches,
            "hybrid": self.hybrid,
            "host_experts": sum(h.experts for h in self.host),
            "host_bottoms": sum(h.bottoms for h in self.host),
            "host_splits": sum(h.splits for h in self.host),
            "fill_bytes": sum(h.fill_bytes for h in self.host),
            "miss_fill_bytes": self.miss_fill_bytes,
            "decode_host_s_per_token": self.per_token(self.host_s),
            "host_ms_per_token": self.per_token(self.host_s) * 1e3 if self.tokens else None,
            "host_wait_ms_per_token": self.per_stream(self.host_wait_s) * 1e3 if self.tokens else None,
            "cache_bytes": self.layout.cache_bytes,
            "staging_bytes": self.layout.staging_bytes,
            "layers": [
                {"layer": l.layer, "theta": l.theta, "slots": l.slots, "hit_rate": s.hit_rate,
                 "bytes_loaded_per_token": s.bytes_loaded / self.tokens if self.tokens else 0.0,
                 "recall": r, "precision": p, "ms_per_token": float(t * 1e3), "exposed_copy_ms_per_token": float(x * 1e3),
                 "host_experts": h.experts, "host_bottoms": h.bottoms, "host_splits": h.splits,
                 "host_ms_per_token": h.seconds * 1e3 / self.tokens if self.tokens else 0.0}
                for l, s, r, p, t, x, h in zip(
                    self.layout.layers, self.decode, self.recall, self.precision, self.layer_s, self.layer_exposed_s,
                    self.host or [HostCounts()] * len(self.layout.layers),
                )
            ],
        }
