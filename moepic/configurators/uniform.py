"""`uniform`: every MoE layer gets the same cache bytes and the same θ. Pure. The baseline to beat."""

from __future__ import annotations

import attrs

from moepic.cache.layout import slots_for
from moepic.configurators.base import ConfiguratorConfig, register_configurator
from moepic.core.ffn import top_neurons_for
from moepic.perfmodel.latency import LatencyModel, LayerChoice


def _unit_interval(instance, attribute, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"configurator.{attribute.name} must be in [0, 1], got {value}")


@attrs.frozen(kw_only=True)
class UniformConfig(ConfiguratorConfig):
    theta: float = attrs.field(default=0.5, validator=_unit_interval)


@register_configurator("uniform", UniformConfig)
class Uniform:
    def __init__(self, config: UniformConfig) -> None:
        self.config = config

    def configure(self, model: LatencyModel, cache_bytes: int) -> tuple[LayerChoice, ...]:
        t = model.times
        top = top_neurons_for(self.config.theta, t.ffn_size, t.block)
        per_layer = cache_bytes // model.num_layers
        return tuple(LayerChoice(slots=slots_for(per_layer, top * model.times_for(c).neuron_bytes, model.num_experts), top_neurons=top)
                     for c in range(model.num_layers))
