"""Configurators: strategies that pick each MoE layer's cache size and θ under a global budget."""

from moepic.configurators.base import CONFIGURATORS, ConfiguratorConfig, CacheConfiguration, configure_cache
from moepic.configurators import dp, moepic, n_cpu_moe, uniform  # noqa: F401  (registers them)

__all__ = ["CONFIGURATORS", "ConfiguratorConfig", "CacheConfiguration", "configure_cache"]
