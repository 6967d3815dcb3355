"""What copying an expert costs against computing it on the host: the prices `place_loads`
(moepic/cache/placement.py) decides with, and the latency model and simulator time with. Pure.

    copy      link latency + bytes / link bandwidth                          (as every copy is priced)
    host      hand-off per call + max(bytes / host expert rate,  flops / host matmul rate)
              (the rate of the experts' format's host kernel: dense bf16 / fp32, or int4-fused's)
    hand-off  the tokens' input to the host, and a result back to the device (host.result_latency_us)

The host streams expert weights from the same DRAM that host→device copies read, so while the
link is busy the host's expert rate is at most what the copies leave of the DRAM bandwidth (never
below half of it: the memory controller shares it between the two): `shared_dram_gbps`. It is
priced so always — a layer that hosts experts is one whose link is busy — which errs toward
copying when the link is in fact idle.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from moepic.cache.layout import LayerCacheLayout
from moepic.cache.placement import LoadCosts
from moepic.errors import ConfigError
from moepic.perfmodel.hardware import HardwareProfile, HostProfile
from moepic.quant import ExpertFormat


def shared_dram_gbps(host: HostProfile, link_gbps: float, expert_gbps: float) -> float:
    """The host's expert rate (10⁹ stored bytes/s; `expert_gbps` alone) with host→device copies
    reading the same DRAM."""
    return min(expert_gbps, max(host.memory_gbps - link_gbps, host.memory_gbps / 2))


def check_priceable(expert_format: ExpertFormat | None, what: str) -> None:
    """Host compute is priced for formats the host computes as stored (`host_kernel`: dense
    experts through a GEMV, int4-fused through torch's fused int4 kernel). moepic's host path
    decodes the other quantized formats to float32 first, which no profile prices: refused by
    name, not mispriced."""
    if expert_format is not None and expert_format.host_kernel is None:
        raise ConfigError(f"{what} prices host compute of experts the host computes as stored (dense, int4-fused); "
                          f"with {expert_format.name} experts the host decodes to float32 before its GEMV, which is "
                          "not priced: use --expert-format int4-fused, hybrid off, or host-only in the engine (which "
                          "measures rather than prices)")


@attrs.frozen(kw_only=True)
class HostPricing:
    """Prices of the two ways to run a loaded expert, for one machine (link + host) and dtype."""

    host: HostProfile
    link_gbps: float
    link_latency_us: float
    dtype_bytes: int
    kernel: str = "dense"  # the experts' host kernel (ExpertFormat.host_kernel), whose rate the host profile gives
    weight_bytes: float | None = None  # stored bytes an expert weight takes, scales included (None: dtype_bytes)
    _costs: dict = attrs.field(factory=dict, init=False, repr=False, eq=False)  # (layer, tokens) → LoadCosts

    def __attrs_post_init__(self) -> None:
        self.host.expert_gbps(self.dtype_bytes, self.kernel)  # a profile without the kernel's rate: one line, now

    @classmethod
    def of(cls, hw: HardwareProfile, dtype_bytes: int, *, kernel: str | None = "dense", weight_bytes: float | None = None) -> HostPricing:
        if hw.host is None:
            raise ConfigError(f"hardware profile {hw.name!r} describes no host CPU; give one (--host NAME|FILE, "
                              "or workload.host in an experiment config)")
        if kernel is None:
            raise ConfigError("these experts' format has no host kernel to price (perfmodel/host_costs.check_priceable)")
        return cls(host=hw.host, link_gbps=hw.link_gbps, link_latency_us=hw.link_latency_us, dtype_bytes=dtype_bytes,
                   kernel=kernel, weight_bytes=weight_bytes)

    @property
    def handoff_s(self) -> float:
        return (self.host.result_latency_us or 0.0) * 1e-6

    def copy_s(self, nbytes: int) -> float:
        return self.link_latency_us * 1e-6 + nbytes / (self.link_gbps * 1e9)

    def busy_s(self, in_flight_bytes: Iterable[int]) -> float:
        """The link time still held by copies under way, each priced whole: neither the engine nor
        the simulator's rule knows how far one has got."""
        return sum(self.copy_s(nbytes) for nbytes in in_flight_bytes)

    def host_s(self, nbytes: int, tokens: int) -> float:
        """One host call over `nbytes` of expert weights for `tokens` tokens."""
        rate = shared_dram_gbps(self.host, self.link_gbps, self.host.expert_gbps(self.dtype_bytes, self.kernel))
        stream_s = nbytes / (rate * 1e9)
        if tokens > 1:
            gflops, weights = self.host.matmul_gflops, nbytes / (self.weight_bytes or self.dtype_bytes)
            # 2 flops per weight per token; without a matmul rate each token streams the weights again.
            compute_s = 2 * weights * tokens / (gflops * 1e9) if gflops else tokens * stream_s
            stream_s = max(stream_s, compute_s)
        return self.host.call_overhead_us * 1e-6 + stream_s

    def load_costs(self, layout: LayerCacheLayout, tokens: int) -> LoadCosts:
        return self.costs_for(layout.expert_bytes, layout.top_bytes, tokens)

    def costs_for(self, expert_bytes: int, top_bytes: int, tokens: int) -> LoadCosts:
        """The prices for experts of `expert_bytes` whose top segment is `top_bytes`."""
        key = (expert_bytes, top_bytes, tokens)
        costs = self._costs.get(key)
        if costs is None:
            bottom_bytes = expert_bytes - top_bytes
            costs = self._costs[key] = LoadCosts(
                copy_whole_s=self.copy_s(expert_bytes), copy_bottom_s=self.copy_s(bottom_bytes),
                host_whole_s=self.host_s(expert_bytes, tokens), host_bottom_s=self.host_s(bottom_bytes, tokens),
                handoff_s=self.handoff_s, fill_s=self.copy_s(top_bytes), can_split=0 < top_bytes < expert_bytes,
            )
        return costs


def host_pricing(hw: HardwareProfile, times, dtype_bytes: int) -> HostPricing:
    """HostPricing for experts whose `times` (perfmodel/latency.py ModelTimes) name their host kernel."""
    return HostPricing.of(hw, dtype_bytes, kernel=times.host_kernel, weight_bytes=times.weight_bytes)
