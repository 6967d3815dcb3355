"""What a simulation counts, and the report it makes of it. Pure (plain counters).

The cache counters fold into the same `LayerCacheStats` the engine reports, split into decode
(one-token) and prefill steps, and the byte and prediction counters mean what the engine's do
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
        self.decode = [LayerCacheStats(layer=l.layer) for l in layers]  # one-token steps
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
        host_s=None, host_wait_s=None,
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
        )


@attrs.frozen(kw_only=True, eq=False)
class SimResult:
    layout: CacheLayout
    decode: tuple[LayerCacheStats, ...]  # per MoE layer, decode steps
    prefill: tuple[LayerCacheStats, ...]
    token_s: np.ndarray  # [decode tokens] simulated latency
    exposed_s: np.ndarray  # [decode tokens] time compute waited for copies
    layer_s: np.ndarray  # [L] mean time per decode token in each MoE layer (attention to last expert)
    layer_exposed_s: np.ndarray  # [L] of which compute waited for copies
    predictor_s: float  # per decode token: the predictions every layer ran (inside token_s)
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
    host_s: np.ndarray = attrs.field(factory=lambda: np.zeros(0))  # [decode tokens] the host's busy time
    host_wait_s: np.ndarray = attrs.field(factory=lambda: np.zeros(0))  # [decode tokens] of which the device waited for

    @property
    def tokens(self) -> int:
        return len(self.token_s)

    def summary(self) -> dict[str, object]:
        """Decode figures per token and per MoE layer (JSON-ready)."""
        cache = summary(self.decode, self.tokens)
        ms = self.token_s * 1e3
        q = (lambda p: float(np.percentile(ms, p))) if self.tokens else (lambda p: None)
        return {
            "tokens": self.tokens,
            "ms_per_token": float(ms.mean()) if self.tokens else None,
            "p50_ms": q(50),
            "p99_ms": q(99),
            "exposed_copy_ms_per_token": float(self.exposed_s.mean() * 1e3) if self.tokens else None,
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
            "decode_host_s_per_token": float(self.host_s.mean()) if self.tokens else None,
            "host_ms_per_token": float(self.host_s.mean() * 1e3) if self.tokens else None,
            "host_wait_ms_per_token": float(self.host_wait_s.mean() * 1e3) if self.tokens else None,
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
