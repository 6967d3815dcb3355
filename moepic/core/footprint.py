"""Parameter counts and bytes from a ModelSpec alone, without loading weights. Pure.

The offloading budget is stated against these numbers ("25 % of routed-expert bytes"), and
`moepic inspect` prints them for a checkpoint before anyone commits memory to it.
"""

from __future__ import annotations

import attrs

from moepic.core.attention_kinds import attention_kind
from moepic.core.kv_cache_layer import span_of
from moepic.core.spec import ModelSpec


def swiglu_params(D: int, F: int) -> int:
    return 3 * D * F


def expert_neuron_params(spec: ModelSpec) -> int:
    """One routed-expert neuron: its gate, up and down rows, and its gate/up biases where experts
    have them (core/packing.py lays an expert out neuron by neuron; the down bias is resident)."""
    return 3 * spec.hidden_size + (2 if spec.moe.expert_bias else 0)


@attrs.frozen(kw_only=True)
class Footprint:
    """Parameter counts, split the way offloading splits the model."""

    routed_expert_params: int  # per expert
    num_routed_experts: int  # over all MoE layers
    resident_params: int  # everything that stays on the accelerator: attention, norms, routers, shared/dense MLPs, embeddings

    @property
    def total_params(self) -> int:
        return self.resident_params + self.routed_expert_params * self.num_routed_experts

    def routed_expert_bytes(self, dtype_bytes: int) -> int:
        return self.routed_expert_params * self.num_routed_experts * dtype_bytes


def attention_params(spec: ModelSpec) -> int:
    """One layer's attention weights (norms and biases included), by attention kind."""
    return attention_kind(spec).params(spec)


def kv_cache_numbers(spec: ModelSpec) -> int:
    """Numbers one token adds to one layer's KV cache, by attention kind."""
    return attention_kind(spec).cache_numbers(spec)


def _ring_spans(spec: ModelSpec) -> list[int | None]:
    """Per layer: the span it keeps as a ring (core/kv_cache_layer.py), or None if it keeps every position."""
    rings = attention_kind(spec).rings
    return [span_of(spec, layer) if rings else None for layer in range(spec.num_layers)]


def kv_cache_numbers_at(spec: ModelSpec, context: int) -> int:
    """Numbers the whole KV cache holds at `context` tokens: a ring layer stops growing at its span."""
    return kv_cache_numbers(spec) * sum(context if s is None else min(s, context) for s in _ring_spans(spec))


def kv_cache_growth(spec: ModelSpec) -> tuple[int, int]:
    """(numbers each token adds to the whole cache once every ring is full, numbers the rings hold then)."""
    spans = _ring_spans(spec)
    return kv_cache_numbers(spec) * spans.count(None), kv_cache_numbers(spec) * sum(s for s in spans if s is not None)


def footprint(spec: ModelSpec) -> Footprint:
    D, V = spec.hidden_size, spec.vocab_size
    attention = attention_params(spec)
    norm = D * (2 if spec.norm == "layer" else 1)  # a LayerNorm has a bias
    # embeddings, lm_head (and its bias), final norm
    resident = V * D * (1 if spec.tie_word_embeddings else 2) + V * spec.lm_head_bias + norm
    moe = spec.moe
    for kind in spec.layer_kinds:
        resident += attention + 2 * norm  # + the two norms
        if kind == "dense":
            resident += swiglu_params(D, spec.dense_ffn)
        else:
            # router (and its biases), and the experts' down biases: per expert, so resident, not offloaded
            resident += moe.num_experts * (D + moe.router.selection_bias + moe.router.logit_bias + D * moe.expert_bias)
            if moe.shared_expert_ffn:
                resident += swiglu_params(D, moe.shared_expert_ffn) + (D if moe.shared_expert_gated else 0)
    return Footprint(
        routed_expert_params=expert_neuron_params(spec) * moe.expert_ffn if moe else 0,
        num_routed_experts=len(spec.moe_layers) * moe.num_experts if moe else 0,
        resident_params=resident,
    )
