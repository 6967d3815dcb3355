"""How the expert memory budget becomes per-layer caches: sizes, slots and θ. Pure.

Two forms of budget (see README, "Offloading"):
- one global value: all the device memory routed experts may use, cache *and* staging. Staging
  (`top_k` whole-expert buffers, where misses and bottoms land before they are used) must fit, so
  a smaller budget fails and names the minimum; the rest is split across the MoE layers in
  proportion to their expert bytes. The one exception: if every layer caches whole experts
  (θ = 1) and the budget holds them all, nothing is ever loaded and no staging is kept.
- one value per MoE layer: that layer's cache alone (what a configurator emits); staging is extra.
A value is bytes (`512MiB`, `2GB`, `1048576`) or a fraction of the experts it covers (`0.25`, `25%`).

Per layer, θ becomes a whole number of neuron blocks (`top_neurons`), and the cache holds
`slots = min(E, ⌊cache bytes / top bytes⌋)` top segments. θ not given (None) is decided here, once
for the engine, the simulator and the configurator: whole experts (θ 1, the dense layout) where the
budget holds every expert whole, else `AUTO_THETA`. A given θ that rounds to another value is
reported in `CacheLayout.notes` (`ThetaRounding`; the command shows them, and refuses a θ > 0 that
rounds to no block at all: it would silently cache nothing). Here that is a note, not an error: the
simulator and the ablations sweep one θ grid over model shapes of any expert width.

These rules are written once, here: the slots formula (`slots_for`), the all-resident case
(`holds_every_expert`) and the minimum working set (`cache_bytes_after_staging`); the
configurators (moepic/configurators/) call them too.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from decimal import Decimal
import attrs
import numpy as np

from moepic.core.ffn import top_neurons_for
from moepic.core.spec import ModelSpec
from moepic.core.weights import neuron_block
from moepic.errors import ConfigError
from moepic.quant import ExpertFormat, build_format

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*|%)\s*$")

BudgetValue = str | float | int
AUTO_THETA = 0.5  # θ when none is given and the budget cannot hold every expert whole
# No device has a petabyte of memory: a larger budget is a typo (or "1e400"), not a size.
MAX_BUDGET_BYTES = 2**50


class BudgetError(ConfigError):
    """A budget or θ that cannot be laid out; the message names the key and the minimum."""


def budget_bytes(value: BudgetValue, whole_bytes: int, what: str) -> int:
    """`value` in bytes: a size with a unit, a byte count (> 1), or a fraction (≤ 1) or percentage of `whole_bytes`.

    Decimal arithmetic, so "8.2GB" is 8,200,000,000 bytes and 57 % of 100 is 57, not a float's 56.
    """
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise BudgetError(f"{what}: expected bytes (512MiB) or a fraction (0.25), got {value!r}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise BudgetError(f"{what}: expected bytes (512MiB, 2GB) or a fraction (0.25, 25%), got {value!r}")
        number, unit = Decimal(match.group(1)), match.group(2).lower()
    else:
        if not math.isfinite(value) or value < 0:
            raise BudgetError(f"{what}: expected a size ≥ 0, got {value!r}")
        # repr gives the shortest decimal that reads back as the float: 0.57, not 0.5699999…
        number = Decimal(int(value)) if isinstance(value, numbers.Integral) else Decimal(repr(float(value)))
        unit = ""
    if unit == "%":
        if number > 100:
            raise BudgetError(f"{what}: a percentage must be at most 100%, got {value!r}")
        return int(number / 100 * whole_bytes)
    if unit == "" and number <= 1:  # nobody means "one byte": a unitless number up to 1 is a fraction
        return int(number * whole_bytes)
    if unit not in _UNITS:
        raise BudgetError(f"{what}: unknown unit {unit!r} in {value!r}; use B, KB, MB, GB, KiB, MiB, GiB or %")
    if number != int(number) and unit in ("", "b"):
        raise BudgetError(f"{what}: a byte count must be a whole number (or a fraction ≤ 1), got {value!r}")
    if number * _UNITS[unit] > MAX_BUDGET_BYTES:
        raise BudgetError(f"{what}: expected a size of at most 1 PiB ({MAX_BUDGET_BYTES} bytes), got {value!r}")
    return int(number * _UNITS[unit])


@attrs.frozen(kw_only=True)
class LayerCacheLayout:
    layer: int  # the model layer index
    num_experts: int
    ffn_size: int
    block: int  # neuron block: the granularity of the split
    top_neurons: int
    slots: int
    neuron_bytes: int  # one neuron's gate row, up row and down row (and its gate/up biases: core/packing.py)
    # With a miss format (`cache.miss_format`, HOBBIT-style): the bytes a neuron of its low-bit copy
    # takes. An expert loaded whole (a miss) then moves and computes that copy; None: the expert itself.
    miss_neuron_bytes: int | None = None

    @property
    def theta(self) -> float:
        """The split ratio actually used (θ rounded down to whole neuron blocks)."""
        return self.top_neurons / self.ffn_size

    # Derived sizes, fixed at construction: the planner reads them on every step.
    expert_bytes: int = attrs.field(init=False)
    top_bytes: int = attrs.field(init=False)
    bottom_bytes: int = attrs.field(init=False)
    whole_load_bytes: int = attrs.field(init=False)  # what loading an expert whole moves (a miss, or its prefetch)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.top_neurons <= self.ffn_size or self.top_neurons % self.block:
            raise ValueError(f"top_neurons {self.top_neurons} must be whole blocks of {self.block} in [0, {self.ffn_size}]")
        if not 0 <= self.slots <= self.num_experts or (self.slots and not self.top_neurons):
            raise ValueError(f"slots {self.slots} must be in [0, {self.num_experts}], and 0 when there is no top segment")
        object.__setattr__(self, "expert_bytes", self.ffn_size * self.neuron_bytes)
        object.__setattr__(self, "top_bytes", self.top_neurons * self.neuron_bytes)
        object.__setattr__(self, "bottom_bytes", self.expert_bytes - self.top_bytes)
        object.__setattr__(self, "whole_load_bytes", self.ffn_size * (self.miss_neuron_bytes or self.neuron_bytes))

    @property
    def low_bit_misses(self) -> bool:
        """Whether a miss is served from the expert's low-bit copy (`miss_neuron_bytes`)."""
        return self.miss_neuron_bytes is not None

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.top_bytes

    @property
    def fully_resident(self) -> bool:
        """Every expert whole in the cache: this layer never loads anything."""
        return self.slots == self.num_experts and self.top_neurons == self.ffn_size


@attrs.frozen
class ThetaRounding:
    """A given θ that whole neuron blocks turned into `used`."""

    theta: float
    used: float
    block: int
    ffn_size: int

    @property
    def caches_nothing(self) -> bool:
        return self.theta > 0 and self.used == 0

    def __str__(self) -> str:
        steps = self.ffn_size // self.block
        shown = range(steps + 1) if steps <= 4 else range(3)
        grid = ", ".join(f"{k * self.block / self.ffn_size:.3g}" for k in shown) + (", ..." if steps > 4 else "")
        return (f"cache.theta {self.theta:g} rounds down to {self.used:.3g} "
                f"(whole {self.block}-neuron blocks of {self.ffn_size} neurons: {grid})")

    def problem(self) -> str | None:
        """Why a run must not go ahead with this θ: it asked for a cache and would get none."""
        if not self.caches_nothing:
            return None
        return f"{self}, which caches nothing: give 0 for no cache or at least {self.block / self.ffn_size:.3g}"


@attrs.frozen(kw_only=True)
class CacheLayout:
    layers: tuple[LayerCacheLayout, ...]  # MoE layers, in model order
    staging_experts: int  # whole-expert staging buffers (0 when every layer is fully resident)
    dtype_bytes: int
    # Each given θ that whole neuron blocks turned into another value: the caller shows them.
    notes: tuple[ThetaRounding, ...] = ()

    @property
    def staging_bytes(self) -> int:
        return self.staging_experts * max((l.expert_bytes for l in self.layers), default=0)

    @property
    def cache_bytes(self) -> int:
        return sum(l.cache_bytes for l in self.layers)

    @property
    def expert_bytes(self) -> int:
        """All routed experts of the model."""
        return sum(l.num_experts * l.expert_bytes for l in self.layers)

    def for_layer(self, layer: int) -> LayerCacheLayout:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise KeyError(f"layer {layer} is not an MoE layer")


@attrs.frozen
class PrefetchShape:
    """How much a predictor prefetches: k′ experts for each of `horizon` MoE layers ahead.

    Staging is sized from it, before any predictor is built (a predictor config's `prefetch_shape`).
    A built predictor has the same two fields, so the functions below take one as well."""

    candidates: int  # k′: experts prefetched per layer ahead
    horizon: int  # MoE layers ahead (0: no prefetching)


def prefetch_buffers(prefetch: PrefetchShape) -> int:
    """Staging buffers prefetching may hold: k′ for each layer ahead and for the layer computing."""
    return prefetch.candidates * (prefetch.horizon + 1) if prefetch.horizon else 0


def staging_buffers(top_k: int, prefetch: PrefetchShape) -> int:
    """The current layer's own loads, plus what prefetching holds."""
    return top_k + prefetch_buffers(prefetch)


def slots_for(cache_bytes, top_bytes, num_experts: int):
    """C = min(E, ⌊cache bytes / top bytes⌋): the top segments a cache holds, 0 where a top is empty
    (θ = 0 caches nothing). An int for ints; elementwise for numpy arrays (the configurators' grids)."""
    top = np.asarray(top_bytes)
    slots = np.where(top > 0, np.minimum(num_experts, np.asarray(cache_bytes) // np.maximum(top, 1)), 0)
    return int(slots) if slots.ndim == 0 else slots


def holds_every_expert(budget: int, num_layers: int, num_experts: int, expert_bytes: int) -> bool:
    """Whether `budget` bytes hold every routed expert of `num_layers` MoE layers whole: then nothing
    is ever loaded, so no staging is kept (the dense layout)."""
    return budget >= num_layers * num_experts * expert_bytes


def cache_bytes_after_staging(budget: int, staging_experts: int, expert_bytes: int, *, what: str) -> int:
    """What a global budget leaves for the caches once staging (`staging_experts` whole-expert buffers)
    is kept. A smaller budget cannot run at all: the error names the minimum (`what`: the budget)."""
    staging = staging_experts * expert_bytes
    if budget < staging:
        raise BudgetError(
            f"{what} is {_mib(budget)}, below the minimum working set of {_mib(staging)}: "
            f"staging for {staging_experts} whole experts of {expert_bytes} bytes each"
        )
    return budget - staging


def slot_count_layout(layer: int, num_experts: int, slots: int) -> LayerCacheLayout:
    """A layer caching `slots` whole experts of one neuron each (θ = 1). For replays that only count
    hits: what the planner decides depends on the slot count alone, not on expert sizes or θ."""
    return LayerCacheLayout(layer=layer, num_experts=num_experts, ffn_size=1, block=1, top_neurons=1, slots=slots, neuron_bytes=1)


def _per_moe_layer(value, count: int, what: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise BudgetError(f"{what}: expected one value per MoE layer ({count}), got {len(value)}")
        return tuple(value)
    return (value,) * count


def plan_layout(
    spec: ModelSpec,
    *,
    dtype_bytes: int,
    budget: BudgetValue | Sequence[BudgetValue],
    theta: float | Sequence[float] | None,
    widest_neuron_block: int | None = None,
    staging_experts: int | None = None,
    expert_format: ExpertFormat | Sequence[ExpertFormat] | None = None,
    miss_format: ExpertFormat | None = None,
) -> CacheLayout:
    """Per-layer cache sizes and slot counts for `budget` (see the module docstring) and θ
    (None: automatic, see the module docstring), for experts stored in `expert_format` (default:
    dense in `dtype_bytes`; a percentage budget is of the experts' bytes in that format), or one
    format per MoE layer (a GGUF file's kinds vary by layer): a global budget is then split in
    proportion to each layer's bytes, and staging holds the largest expert.

    `staging_experts` whole-expert buffers are staged (default: top_k; prefetching needs more).
    `miss_format`: misses are served from a low-bit copy in this format (`cache.miss_format`)."""
    moe = spec.moe
    if moe is None or not spec.moe_layers:
        raise BudgetError(f"{spec.model_type}: the model has no routed experts to offload")
    layers_n = len(spec.moe_layers)
    F, E = moe.expert_ffn, moe.num_experts
    staging_n = moe.top_k if staging_experts is None else staging_experts
    block = neuron_block(F) if widest_neuron_block is None else neuron_block(F, widest_neuron_block)
    formats = _per_moe_layer(expert_format or build_format("dense"), layers_n, "expert formats")
    neuron_bytes = [fmt.spec_neuron_bytes(spec, dtype_bytes) for fmt in formats]
    expert_bytes = [F * n for n in neuron_bytes]
    layer_bytes = [E * b for b in expert_bytes]
    per_layer_budget = isinstance(budget, (list, tuple))
    if per_layer_budget:
        per_layer = _per_moe_layer(budget, layers_n, "cache.budget")
        caches = [budget_bytes(v, layer_bytes[i], f"cache.budget[{i}]") for i, v in enumerate(per_layer)]
    else:
        total = budget_bytes(budget, sum(layer_bytes), "cache.budget")
    if theta is None:  # whole experts where the budget holds them all: the dense layout, nothing loaded
        if per_layer_budget:
            fits = [holds_every_expert(c, 1, E, b) for c, b in zip(caches, expert_bytes)]
        else:
            fits = [total >= sum(layer_bytes)] * layers_n
        thetas = tuple(1.0 if whole else AUTO_THETA for whole in fits)
    else:
        thetas = _per_moe_layer(theta, layers_n, "cache.theta")
        for t in thetas:
            if not 0 <= t <= 1:
                raise BudgetError(f"cache.theta: each value must be in [0, 1], got {t}")
    tops = [top_neurons_for(t, F, block) for t in thetas]
    notes = () if theta is None else _rounding_notes(thetas, tops, F, block)

    miss_neuron_bytes = None if miss_format is None else miss_format.spec_neuron_bytes(spec, dtype_bytes)

    def layout(cache_bytes_per_layer: Sequence[int], staging_experts: int) -> CacheLayout:
        entries = tuple(
            LayerCacheLayout(
                layer=l, num_experts=E, ffn_size=F, block=block, top_neurons=top, neuron_bytes=n,
                slots=slots_for(cache, top * n, E), miss_neuron_bytes=miss_neuron_bytes,
            )
            for l, top, cache, n in zip(spec.moe_layers, tops, cache_bytes_per_layer, neuron_bytes)
        )
        return CacheLayout(layers=entries, staging_experts=staging_experts, dtype_bytes=dtype_bytes, notes=notes)

    if per_layer_budget:
        result = layout(caches, staging_n)
    else:
        if all(top == F for top in tops) and total >= sum(layer_bytes):
            return layout(layer_bytes, 0)
        caches_total = cache_bytes_after_staging(total, staging_n, max(expert_bytes), what=f"cache.budget {budget!r}")
        # In proportion to each layer's bytes: equal shares where every layer stores its experts alike.
        result = layout([caches_total * b // sum(layer_bytes) for b in layer_bytes], staging_n)
    if all(l.fully_resident for l in result.layers):
        result = attrs.evolve(result, staging_experts=0)
    return result


def _rounding_notes(thetas: Sequence[float], tops: Sequence[int], ffn_size: int, block: int) -> tuple[ThetaRounding, ...]:
    """One record per distinct θ that whole neuron blocks turn into another value."""
    notes: dict[float, ThetaRounding] = {}
    for theta, top in zip(thetas, tops):
        if top / ffn_size != theta:
            notes.setdefault(theta, ThetaRounding(theta, top / ffn_size, block, ffn_size))
    return tuple(notes.values())


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n} bytes)"
