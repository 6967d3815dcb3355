"""ModelSpec: everything about an architecture that the core needs, as frozen, validated values.

Pure. Checkpoint adapters (moepic/checkpoint/adapters) turn a Hugging Face config.json into one of
these; nothing in the core reads config.json keys directly.
"""

from __future__ import annotations

from typing import Literal

import attrs
from attrs import validators as v

LayerKind = Literal["dense", "moe"]
# q/k RMSNorm: per head or over the full width, before the rotation; per head after it (Hunyuan);
# or per head without a weight after it, on rotating layers only (Llama-4's L2 norm).
QKNorm = Literal["none", "per_head", "full", "per_head_after_rope", "weightless_after_rope"]


def _positive(instance, attribute, value) -> None:
    if not value > 0:  # also false for NaN
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen(kw_only=True)
class RopeSpec:
    """Rotary embedding settings, in Hugging Face's `rope_parameters` vocabulary."""

    theta: float = attrs.field(validator=_positive)
    kind: Literal["default", "linear", "llama3", "yarn", "longrope"] = "default"
    # Scaling knobs; which ones matter depends on `kind` (see core/rope.py).
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # LongRoPE (PhiMoE): a divisor per frequency, and the cos/sin scale up to and beyond
    # `original_max_position` (see core/rope.py for which factors apply when).
    short_factor: tuple[float, ...] = attrs.field(default=(), converter=tuple)
    long_factor: tuple[float, ...] = attrs.field(default=(), converter=tuple)
    short_mscale: float | None = None
    long_mscale: float | None = None
    # Fraction of each head's dims that rotate (1.0 for every supported model).
    partial_rotary_factor: float = 1.0


@attrs.frozen(kw_only=True)
class GatedActivation:
    """How a routed expert's gate and up projections meet, per neuron:
        h = gate' · σ(alpha · gate') ⊙ (up' + up_offset),  gate' = min(gate, limit), up' = clamp(up, ±limit)
    The default is SwiGLU (silu(gate) ⊙ up); GPT-OSS's clamped SwiGLU is alpha 1.702, limit 7, up_offset 1."""

    alpha: float = attrs.field(default=1.0, validator=_positive)
    limit: float | None = attrs.field(default=None, validator=v.optional(_positive))
    up_offset: float = 0.0

    @property
    def is_silu(self) -> bool:
        return self.alpha == 1.0 and self.limit is None and self.up_offset == 0.0


SILU = GatedActivation()


@attrs.frozen(kw_only=True)
class RouterSpec:
    """How router logits become (weights_TK, ids_TK). See core/routing.py for the registered kinds."""

    kind: str = "softmax_topk"
    # Renormalise the top-k probabilities to sum to 1 (Mixtral always; Qwen/OLMoE/DeepSeek `norm_topk_prob`).
    renormalize: bool = True
    # The routed experts' weights times this (DeepSeek's `routed_scaling_factor`).
    scaling: float = attrs.field(default=1.0, validator=_positive)
    # Group-limited kinds: experts in `groups` equal groups, tokens routed within the best `top_groups`.
    groups: int = attrs.field(default=1, validator=_positive)
    top_groups: int = attrs.field(default=1, validator=_positive)
    # Logits from float32 inputs and router weights, as DeepSeek's routers compute them (in bf16
    # runs too); otherwise in the activations' dtype, as Mixtral's and Qwen's do.
    fp32_logits: bool = False
    # A bias added to the logits themselves (GPT-OSS): it moves choice and weights alike, unlike a
    # selection-only bias (MoEWeights.router_bias_E).
    logit_bias: bool = False
    # Llama-4: each expert's *input* is scaled by its weight (the output is not), so one expert per token.
    weighs_input: bool = False
    # SparseMixer (PhiMoE): experts whose logit is within this relative distance of the best stay
    # in each choice's softmax (`router_jitter_noise`; core/routing.py).
    jitter_eps: float = attrs.field(default=0.01, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if self.top_groups > self.groups:
            raise ValueError(f"router top_groups ({self.top_groups}) > groups ({self.groups})")

    @property
    def selection_bias(self) -> bool:
        """Whether the router reads a per-expert selection bias (MoEWeights.router_bias_E)."""
        return self.kind in ("sigmoid_group_topk", "softmax_biased_topk")


@attrs.frozen(kw_only=True)
class MoESpec:
    num_experts: int = attrs.field(validator=_positive)
    top_k: int = attrs.field(validator=_positive)
    expert_ffn: int = attrs.field(validator=_positive)
    router: RouterSpec = RouterSpec()
    # Qwen2-MoE style always-on shared expert; 0 means none.
    shared_expert_ffn: int = 0
    # Whether the shared expert's output is scaled by sigmoid(x · w_gate) (Qwen2-MoE).
    shared_expert_gated: bool = False
    # The routed experts' activation, and whether they carry biases (GPT-OSS: a gate/up bias per
    # neuron, which travels with its neurons, and a down bias per expert, added once per expert).
    activation: GatedActivation = SILU
    expert_bias: bool = False

    def __attrs_post_init__(self) -> None:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) > num_experts ({self.num_experts})")
        groups = self.router.groups
        if self.num_experts % groups:
            raise ValueError(f"num_experts ({self.num_experts}) is not a whole number of router groups ({groups})")
        if self.router.weighs_input and self.top_k != 1:
            raise ValueError(f"a router that weighs the experts' input routes each token to one expert, not top_k {self.top_k}")
        if self.router.kind == "sparsemixer" and self.top_k != 2:
            raise ValueError(f"the sparsemixer router chooses 2 experts (as HF's PhiMoE does), not top_k {self.top_k}")
        if self.top_k > self.router.top_groups * (self.num_experts // groups):
            raise ValueError(f"top_k ({self.top_k}) > the experts in the router's top_groups "
                             f"({self.router.top_groups} of {groups} groups of {self.num_experts // groups})")


@attrs.frozen(kw_only=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3, core/mla.py): keys and values come from one
    compressed latent per token, which is what the KV cache keeps, beside one rotary key shared by
    every head. The spec's head_dim is the rotary width (`qk_rope_head_dim`)."""

    q_lora_rank: int = attrs.field(validator=attrs.validators.ge(0))  # 0: queries projected directly
    kv_lora_rank: int = attrs.field(validator=_positive)
    qk_nope_head_dim: int = attrs.field(validator=_positive)
    qk_rope_head_dim: int = attrs.field(validator=_positive)
    v_head_dim: int = attrs.field(validator=_positive)
    softmax_scale: float = attrs.field(validator=_positive)  # qk_head_dim^-0.5, times YaRN's mscale² where set

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@attrs.frozen(kw_only=True)
class ModelSpec:
    model_type: str
    vocab_size: int = attrs.field(validator=_positive)
    # Every block norm and the final one: RMSNorm (weight only), or LayerNorm with a bias (PhiMoE).
    norm: Literal["rms", "layer"] = "rms"
    # Where a block's two norms sit: before each sublayer (pre: Llama and most), or on each
    # sublayer's output before it joins the residual (post: FlexOlmo, whose router then reads the
    # residual itself).
    norm_placement: Literal["pre", "post"] = "pre"
    lm_head_bias: bool = False
    hidden_size: int = attrs.field(validator=_positive)
    num_heads: int = attrs.field(validator=_positive)
    num_kv_heads: int = attrs.field(validator=_positive)
    head_dim: int = attrs.field(validator=_positive)
    norm_eps: float = attrs.field(validator=_positive)
    rope: RopeSpec
    layer_kinds: tuple[LayerKind, ...] = attrs.field(converter=tuple, validator=v.min_len(1))
    moe: MoESpec | None = None
    dense_ffn: int = 0
    attention_bias: bool = False  # q, k and v projections
    output_bias: bool = False  # the output projection (GPT-OSS)
    # A learned logit per head that joins every softmax as one more key with no value (GPT-OSS's
    # attention sinks): attention may put weight on "nothing".
    attention_sinks: bool = False
    qk_norm: QKNorm = "none"
    clip_qkv: float | None = None
    sliding_window: int | None = None  # every layer's, unless `layer_windows` says per layer
    # Per layer: its sliding window, or None for full attention (alternating layers: dots.llm1,
    # GPT-OSS); empty: `sliding_window` for all.
    layer_windows: tuple[int | None, ...] = attrs.field(default=(), converter=tuple)
    # Per layer: its attention chunk (a token attends within its own chunk of this many positions:
    # Llama-4's rotating layers), or None; empty: none anywhere.
    layer_chunks: tuple[int | None, ...] = attrs.field(default=(), converter=tuple)
    # Per layer: whether it rotates q and k; empty: every layer does (Llama-4 has NoPE layers).
    layer_rope: tuple[bool, ...] = attrs.field(default=(), converter=tuple)
    # Llama-4's attention temperature on NoPE layers, (attn_scale, floor_scale): queries at position
    # p times 1 + attn_scale · ln(1 + floor((p + 1) / floor_scale)); None: none.
    nope_temperature: tuple[float, float] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    bos_token_id: int | None = None
    mla: MLASpec | None = None  # latent attention instead of grouped-query attention
    # Granite's scalings: the embeddings times, each sublayer's output times (before it joins the
    # residual), attention logits times (None: 1/sqrt(head_dim)), and the output logits divided by.
    embedding_multiplier: float = attrs.field(default=1.0, validator=_positive)
    residual_multiplier: float = attrs.field(default=1.0, validator=_positive)
    attention_scale: float | None = None
    logits_scaling: float = attrs.field(default=1.0, validator=_positive)
    # Which of a head's rotated dims rotate together: "halves" pairs dim j with j + r/2 (Llama and
    # most), "interleaved" pairs 2i with 2i + 1 (DeepSeek's `rope_interleave`, ERNIE-4.5). Attention
    # scores depend only on the pairing, so either output order serves (core/rope.py).
    rope_layout: Literal["halves", "interleaved"] = "halves"

    def __attrs_post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if "moe" in self.layer_kinds and self.moe is None:
            raise ValueError("a layer is 'moe' but the spec has no MoESpec")
        if "dense" in self.layer_kinds and self.dense_ffn <= 0:
            raise ValueError("a layer is 'dense' but dense_ffn is not set")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"unknown norm {self.norm!r}; expected 'rms' or 'layer'")
        if self.norm_placement not in ("pre", "post"):
            raise ValueError(f"unknown norm placement {self.norm_placement!r}; expected 'pre' or 'post'")
        for kind in self.layer_kinds:
            if kind not in ("dense", "moe"):
                raise ValueError(f"unknown layer kind {kind!r}; expected 'dense' or 'moe'")
        for name in ("layer_windows", "layer_chunks", "layer_rope"):
            entries = getattr(self, name)
            if entries and len(entries) != len(self.layer_kinds):
                raise ValueError(f"{name} has {len(entries)} entries for {len(self.layer_kinds)} layers")
        if self.mla is not None and self.attention_sinks:
            raise ValueError("attention sinks are supported with grouped-query attention only, not latent attention")
        if self.mla is not None and self.head_dim != self.mla.qk_rope_head_dim:
            raise ValueError(f"with latent attention head_dim is the rotary width: {self.head_dim} != {self.mla.qk_rope_head_dim}")

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention (None: it attends to every earlier position)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    def chunk(self, layer: int) -> int | None:
        """The attention chunk of `layer` (None: not chunked)."""
        return self.layer_chunks[layer] if self.layer_chunks else None

    def rotates(self, layer: int) -> bool:
        """Whether `layer` applies the rotary embedding to q and k."""
        return self.layer_rope[layer] if self.layer_rope else True

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.layer_kinds) if kind == "moe")
