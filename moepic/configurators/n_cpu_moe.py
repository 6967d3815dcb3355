"""`n_cpu_moe`: llama.cpp's `--n-cpu-moe N` as a configurator. Pure.

llama.cpp keeps the routed experts of the first N layers in host memory, computed there by the
CPU, and every expert of the other layers resident on the GPU. Here: the last MoE layers are
given their whole experts (θ = 1, every slot), as many as the cache bytes hold, and the first
ones nothing at all; N is the smallest that fits the budget, as its users tune it. The layers
without a cache run their experts where the run's `hybrid` mode says (the `llama-cpp-n-cpu-moe`
baseline: on the host).
"""

from __future__ import annotations

import attrs

from moepic.configurators.base import ConfiguratorConfig, register_configurator
from moepic.perfmodel.latency import LatencyModel, LayerChoice


@attrs.frozen(kw_only=True)
class NCpuMoEConfig(ConfiguratorConfig):
    pass


@register_configurator("n_cpu_moe", NCpuMoEConfig)
class NCpuMoE:
    def __init__(self, config: NCpuMoEConfig = NCpuMoEConfig()) -> None:
        self.config = config

    def configure(self, model: LatencyModel, cache_bytes: int) -> tuple[LayerChoice, ...]:
        t, E, L = model.times, model.num_experts, model.num_layers
        resident = min(L, cache_bytes // (E * t.expert_bytes))  # layers whose every expert fits
        on_host = LayerChoice(slots=0, top_neurons=0)
        return (on_host,) * (L - resident) + (LayerChoice(slots=E, top_neurons=t.ffn_size),) * resident
