"""The shared shape of Llama-family MoE checkpoints: spec fields every one has, and a loader driven by name templates.

An architecture that fits this mould (Mixtral, Qwen2/3-MoE, OLMoE) is a spec function plus a
`TensorNames`. One that does not (DeepSeek's MLA attention, GPT-OSS's fused experts) writes its own
`load_weights` in its own file and registers it the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from moepic.progress import bar as progress_bar

from moepic.checkpoint.adapters.base import Adapter
from moepic.checkpoint.adapters.reader import TensorReader
from moepic.checkpoint.hf_config import HFConfig
from moepic.core.spec import ModelSpec, RopeSpec
from moepic.core.weights import (
    AttentionWeights,
    LayerWeights,
    ModelWeights,
    MoEWeights,
    SwiGLUWeights,
)
from moepic.errors import CheckpointError


def common_spec_fields(cfg: HFConfig, default_rope_theta: float, rope: RopeSpec | None = None) -> dict[str, Any]:
    """Keyword arguments of ModelSpec that every Llama-family config spells the same way.

    `default_rope_theta` is what the architecture assumes when config.json states no theta
    (transformers: 1e6 for Mixtral, 1e4 for the others); `rope`, an adapter's own reading of its
    RoPE, replaces the usual one (which is then not read at all).
    """
    act = cfg.get("hidden_act", kind=str, default="silu")
    if act != "silu":
        raise CheckpointError(f"{cfg.source}: hidden_act {act!r} is not supported (moepic runs SwiGLU/silu experts)")
    hidden, heads = cfg.size("hidden_size"), cfg.size("num_attention_heads")
    return dict(
        model_type=cfg.model_type,
        vocab_size=cfg.size("vocab_size"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=cfg.size("num_key_value_heads", default=heads),
        head_dim=head_dim_of(cfg),
        norm_eps=cfg.get("rms_norm_eps", kind=float, positive=True),
        rope=cfg.rope(default_rope_theta) if rope is None else rope,
        tie_word_embeddings=cfg.get("tie_word_embeddings", kind=bool, default=False),
        max_position_embeddings=cfg.size("max_position_embeddings", default=4096),
        eos_token_ids=cfg.eos_token_ids(),
        bos_token_id=(cfg.token_ids("bos_token_id") or (None,))[0],
    )


def head_dim_of(cfg: HFConfig) -> int:
    """Each attention head's width: `head_dim`, or hidden_size / num_attention_heads where unstated."""
    hidden, heads = cfg.size("hidden_size"), cfg.size("num_attention_heads")
    head_dim = cfg.size("head_dim", default=None)
    if head_dim is not None:
        return head_dim
    if hidden % heads:
        raise CheckpointError(f"{cfg.source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return hidden // heads


def build_spec(cfg: HFConfig, *, default_rope_theta: float = 10_000.0, **fields: Any) -> ModelSpec:
    """ModelSpec(**common + fields). Its validation errors become CheckpointErrors in `read_spec`."""
    return ModelSpec(**(common_spec_fields(cfg, default_rope_theta, fields.pop("rope", None)) | fields))


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(
    cfg: HFConfig, layers: int, *, default_window: int, untyped_sliding: Callable[[int], bool]
) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), from `layer_types`, or where the file
    does not list them, from the family's rule (`untyped_sliding(layer)`: HF's default layout).
    `default_window` is HF's where `sliding_window` is absent; an explicit null means none."""
    window = None if "sliding_window" in cfg.data and cfg.data["sliding_window"] is None else cfg.size(
        "sliding_window", default=default_window)
    types = cfg.data.get("layer_types")
    if types is None:
        return tuple(window if window is not None and untyped_sliding(l) else None for l in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise CheckpointError(f"{cfg.source}: layer_types should list {layers} of {', '.join(LAYER_TYPES)}, got {types!r}")
    if window is None and "sliding_attention" in types:
        raise CheckpointError(f"{cfg.source}: layer_types names sliding_attention layers but sliding_window is null")
    return tuple(window if t == "sliding_attention" else None for t in types)


@attrs.frozen
class TensorNames:
    """Where each canonical weight lives in the checkpoint. `{l}` is the layer, `{e}` the expert."""

    moe_prefix: str = "model.layers.{l}.mlp"
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    dense_prefix: str = "model.layers.{l}.mlp"
    shared_expert: str = "shared_expert"  # under moe_prefix
    router: str = "gate.weight"  # under moe_prefix
    q_norm: str = "q_norm"  # under the attention's prefix
    k_norm: str = "k_norm"
    first_norm: str = "input_layernorm"  # under the layer's prefix (LayerWeights says where each sits)
    second_norm: str = "post_attention_layernorm"
    router_bias: str = "gate.e_score_correction_bias"  # under moe_prefix: a router's selection-only bias, if it has one


class LlamaLikeAdapter(Adapter):
    """Base for architectures whose files follow the Llama naming scheme: a subclass writes `spec`
    (still abstract here) and names its tensors (`names`), and overrides a part's reader where its
    files differ (DeepSeek's latent attention, a router's bias)."""

    names = TensorNames()

    def load_weights(self, read: TensorReader, spec: ModelSpec, progress: bool) -> ModelWeights:
        D, V = spec.hidden_size, spec.vocab_size
        embed = read("model.embed_tokens.weight", V, D)
        # `with` clears the bar when a read fails, so the error line is not printed after it.
        with progress_bar(range(spec.num_layers), desc="loading layers", wanted=progress, leave=False) as bar:
            layers = tuple(self._layer(read, spec, l) for l in bar)
        final_norm = read("model.norm.weight", D)
        if spec.tie_word_embeddings and not read.ckpt.has("lm_head.weight"):
            lm_head = embed
        else:
            lm_head = read("lm_head.weight", V, D)
        return ModelWeights(embed, layers, final_norm, lm_head, final_norm_bias_D=self._norm_bias(read, spec, "model.norm"),
                            lm_head_bias_V=read("lm_head.bias", V) if spec.lm_head_bias else None)

    @staticmethod
    def _norm_bias(read: TensorReader, spec: ModelSpec, name: str):
        """A LayerNorm's bias (spec.norm "layer"); RMSNorm has none."""
        return read(f"{name}.bias", spec.hidden_size) if spec.norm == "layer" else None

    def _layer(self, read: TensorReader, spec: ModelSpec, l: int) -> LayerWeights:
        D = spec.hidden_size
        p = f"model.layers.{l}"
        ffn = self._moe(read, spec, l) if spec.layer_kinds[l] == "moe" else self._dense(read, spec, l)
        return LayerWeights(
            input_norm_D=read(f"{p}.{self.names.first_norm}.weight", D),
            attention=self._attention(read, spec, f"{p}.self_attn"),
            post_attention_norm_D=read(f"{p}.{self.names.second_norm}.weight", D),
            ffn=ffn,
            input_norm_bias_D=self._norm_bias(read, spec, f"{p}.{self.names.first_norm}"),
            post_attention_norm_bias_D=self._norm_bias(read, spec, f"{p}.{self.names.second_norm}"),
        )

    def _attention(self, read: TensorReader, spec: ModelSpec, p: str) -> AttentionWeights:
        D, Q, K = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        bias = spec.attention_bias
        per_head = (spec.head_dim, spec.head_dim)
        norm_width = {"none": (None, None), "weightless_after_rope": (None, None), "per_head": per_head,
                      "per_head_after_rope": per_head, "full": (Q, K)}[spec.qk_norm]
        return AttentionWeights(
            q_QD=read(f"{p}.q_proj.weight", Q, D),
            k_KD=read(f"{p}.k_proj.weight", K, D),
            v_KD=read(f"{p}.v_proj.weight", K, D),
            o_DQ=read(f"{p}.o_proj.weight", D, Q),
            q_bias=read(f"{p}.q_proj.bias", Q) if bias else None,
            k_bias=read(f"{p}.k_proj.bias", K) if bias else None,
            v_bias=read(f"{p}.v_proj.bias", K) if bias else None,
            q_norm=read(f"{p}.{self.names.q_norm}.weight", norm_width[0]) if norm_width[0] else None,
            k_norm=read(f"{p}.{self.names.k_norm}.weight", norm_width[1]) if norm_width[1] else None,
            o_bias=read(f"{p}.o_proj.bias", D) if spec.output_bias else None,
            sinks_H=read(f"{p}.sinks", spec.num_heads) if spec.attention_sinks else None,
        )

    def _dense(self, read: TensorReader, spec: ModelSpec, l: int) -> SwiGLUWeights:
        prefix = self.names.dense_prefix.format(l=l)
        return read.swiglu(prefix, ("gate_proj", "up_proj", "down_proj"), spec.hidden_size, spec.dense_ffn)

    def _moe(self, read: TensorReader, spec: ModelSpec, l: int) -> MoEWeights:
        moe, D = spec.moe, spec.hidden_size
        prefix = self.names.moe_prefix.format(l=l)
        experts = tuple(
            read.routed_expert(f"{prefix}.experts.{e}", self.names.expert_projections, D, moe.expert_ffn)
            for e in range(moe.num_experts)
        )
        shared = shared_gate = None
        if moe.shared_expert_ffn:
            shared = read.swiglu(
                f"{prefix}.{self.names.shared_expert}", ("gate_proj", "up_proj", "down_proj"), D, moe.shared_expert_ffn
            )
            if moe.shared_expert_gated:
                shared_gate = read(f"{prefix}.shared_expert_gate.weight", 1, D)
        bias_E = self._router_bias(read, spec, prefix) if moe.router.selection_bias else None
        return MoEWeights(read.router(f"{prefix}.{self.names.router}", moe.num_experts, D, spec=spec), experts, shared, shared_gate,
                          bias_E)

    def _router_bias(self, read: TensorReader, spec: ModelSpec, prefix: str):
        """The layer's selection-only router bias [E] (core/routing.py), where `names.router_bias` says."""
        return read.router(f"{prefix}.{self.names.router_bias}", spec.moe.num_experts, spec=spec)
