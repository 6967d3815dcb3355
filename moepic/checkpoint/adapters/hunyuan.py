"""Hunyuan-MoE (`hunyuan_v1_moe`), as HF transformers runs it: every layer MoE with an always-on
shared MLP (`shared_mlp`, as wide as the experts), a float32 softmax top-k router (`gate.wg`)
renormalised, a per-head q/k RMSNorm applied after the rotation (`query_layernorm` /
`key_layernorm`), q/k/v/o biases (`attention_bias`), and RoPE `linear`, or `dynamic` with a fixed
`alpha` (NTK-alpha: the base times alpha^(d / (d - 2)), the same at every length, as HF computes it)."""

from __future__ import annotations

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec, head_dim_of
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.hf_rope import rope_spec_from_hf_config
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RopeSpec, RouterSpec
from moepic.errors import CheckpointError


def _same_everywhere(cfg: HFConfig, key: str, layers: int) -> int:
    """A per-layer setting HF allows as a list: moepic runs one value for every layer."""
    value = cfg.data.get(key)
    if isinstance(value, list):
        if len(value) != layers or len(set(value)) != 1:
            raise CheckpointError(f"{cfg.source}: {key} {value!r} differs between layers; moepic runs one value for all")
        return HFConfig({key: value[0]}, cfg.source).size(key)
    return cfg.size(key)


def ntk_alpha_rope(cfg: HFConfig, head_dim: int) -> RopeSpec:
    """RoPE as HF's Hunyuan reads it: `dynamic` with an `alpha` is NTK-alpha (static), else the usual kinds."""
    rope = cfg.data.get("rope_parameters") or cfg.data.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") if isinstance(rope, dict) else None
    if kind != "dynamic":
        return cfg.rope(10_000.0)
    alpha = rope.get("alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise CheckpointError(f"{cfg.source}: RoPE type 'dynamic' is supported with a fixed alpha (NTK-alpha) only, "
                              f"got alpha {alpha!r}")
    # The base theta, read and checked as for any RoPE, then stretched.
    theta = rope.get("rope_theta", cfg.data.get("rope_theta", 10_000.0))
    base = rope_spec_from_hf_config({"rope_parameters": {"rope_type": "default", "rope_theta": theta}}, source=cfg.source)
    return RopeSpec(theta=base.theta * alpha ** (head_dim / (head_dim - 2)))


class HunyuanMoeAdapter(LlamaLikeAdapter):
    model_types = ("hunyuan_v1_moe",)
    names = TensorNames(shared_expert="shared_mlp", router="gate.wg.weight", q_norm="query_layernorm",
                        k_norm="key_layernorm")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        layers = cfg.size("num_hidden_layers", maximum=MAX_LAYERS)
        F = cfg.size("intermediate_size")
        moe = MoESpec(
            num_experts=_same_everywhere(cfg, "num_experts", layers), top_k=_same_everywhere(cfg, "moe_topk", layers),
            expert_ffn=F, shared_expert_ffn=F, router=RouterSpec(kind="softmax_topk", renormalize=True, fp32_logits=True),
        )
        head_dim = head_dim_of(cfg)
        if head_dim < 4:
            raise CheckpointError(f"{cfg.source}: head_dim {head_dim} is too small for NTK-alpha RoPE")
        bias = cfg.get("attention_bias", kind=bool, default=False)
        return build_spec(
            cfg, rope=ntk_alpha_rope(cfg, head_dim), layer_kinds=("moe",) * layers, moe=moe, attention_bias=bias,
            output_bias=bias, qk_norm="per_head_after_rope",
        )
