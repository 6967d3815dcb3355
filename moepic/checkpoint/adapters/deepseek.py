"""DeepSeek-V2 / V2-Lite (`deepseek_v2`), DeepSeek-V3 / R1 and the models built on it (`deepseek_v3`),
and GLM-4.5 (`glm4_moe`), which keeps DeepSeek-V3's MoE under grouped-query attention.

Latent attention (core/mla.py: q_proj or q_a → norm → q_b; kv_a_proj_with_mqa → norm; kv_b_proj),
its rotary dims interleaved (V2 always, V3 by `rope_interleave`) and its softmax scale times YaRN's
mscale² where the rope says so; the first `first_k_dense_replace` layers dense, the rest MoE with an
ungated shared expert of `n_shared_experts` × `moe_intermediate_size`; routers (core/routing.py):
V2 softmax top-k (`greedy`) or group-limited (`group_limited_greedy`), V3 sigmoid with a
selection-only bias (`noaux_tc`), both times `routed_scaling_factor`. What HF transformers would
silently ignore or misread is refused instead, naming the key.
"""

from __future__ import annotations


from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec
from moepic.checkpoint.adapters.reader import TensorReader
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.rope import yarn_mscale
from moepic.core.spec import MLASpec, ModelSpec, MoESpec, RouterSpec
from moepic.core.weights import MLAWeights
from moepic.errors import CheckpointError

SIGMOID_ROUTED = ("deepseek_v3", "glm4_moe", "dots1")  # sigmoid scores with a selection bias (`noaux_tc`)
# What HF transformers assumes for a key config.json leaves out, per family (a config written by
# save_pretrained states them all; a hand-trimmed one must still mean the same model):
# (norm_topk_prob, routed_scaling_factor, n_group, topk_group, first_k_dense_replace)
HF_DEFAULTS = {
    "deepseek_v2": (False, 1.0, 1, 1, 0),
    "deepseek_v3": (True, 2.5, 8, 4, 3),
    "glm4_moe": (True, 1.0, 1, 1, 1),
    "dots1": (False, 1.0, 1, 1, 0),
}


def _refuse(cfg: HFConfig, key: str, value, allowed) -> None:
    raise CheckpointError(f"{cfg.source}: {key} {value!r} is not supported for {cfg.model_type}; "
                          f"supported: {', '.join(repr(a) for a in allowed)}")


def deepseek_router(cfg: HFConfig) -> RouterSpec:
    v3 = cfg.model_type in SIGMOID_ROUTED
    scoring = cfg.get("scoring_func", kind=str, default="sigmoid" if v3 else "softmax")
    method = cfg.get("topk_method", kind=str, default="noaux_tc" if v3 else "greedy")
    kinds = {("sigmoid", "noaux_tc"): "sigmoid_group_topk"} if v3 else {
        ("softmax", "greedy"): "softmax_topk", ("softmax", "group_limited_greedy"): "softmax_group_topk"}
    if (scoring, method) not in kinds:
        allowed = sorted({m for _, m in kinds}) if scoring in {s for s, _ in kinds} else sorted({s for s, _ in kinds})
        key, value = ("topk_method", method) if scoring in {s for s, _ in kinds} else ("scoring_func", scoring)
        _refuse(cfg, key, value, allowed)
    norm, scaling, groups, top_groups, _ = HF_DEFAULTS[cfg.model_type]
    renormalize = cfg.get("norm_topk_prob", kind=bool, default=norm)
    if renormalize and not v3:  # HF's DeepSeek-V2 never renormalises; DeepSeek's own code would
        raise CheckpointError(f"{cfg.source}: norm_topk_prob true is not supported for deepseek_v2 "
                              "(HF transformers ignores it, DeepSeek's code honours it: moepic will not guess)")
    return RouterSpec(
        kind=kinds[scoring, method], renormalize=renormalize,
        scaling=cfg.get("routed_scaling_factor", kind=float, default=scaling, positive=True),
        groups=cfg.size("n_group", default=groups), top_groups=cfg.size("topk_group", default=top_groups), fp32_logits=True,
    )


def deepseek_moe(cfg: HFConfig) -> tuple[tuple[str, ...], MoESpec]:
    """(layer kinds, MoESpec) of DeepSeek's MoE layout: `first_k_dense_replace` dense layers, then MoE
    layers with `n_shared_experts` ungated shared experts of the routed experts' width."""
    if cfg.get("moe_layer_freq", kind=int, default=1) != 1:  # HF ignores it; DeepSeek's code does not
        raise CheckpointError(f"{cfg.source}: moe_layer_freq {cfg.data['moe_layer_freq']!r} is not supported "
                              f"for {cfg.model_type} (only 1: every layer after the dense ones is MoE)")
    layers = cfg.size("num_hidden_layers", maximum=MAX_LAYERS)
    dense = cfg.size("first_k_dense_replace", default=HF_DEFAULTS[cfg.model_type][4], minimum=0)
    expert_ffn = cfg.size("moe_intermediate_size")
    moe = MoESpec(
        num_experts=cfg.size("n_routed_experts"), top_k=cfg.size("num_experts_per_tok"), expert_ffn=expert_ffn,
        router=deepseek_router(cfg), shared_expert_ffn=cfg.size("n_shared_experts", default=0, minimum=0) * expert_ffn,
    )
    return tuple("dense" if l < dense else "moe" for l in range(layers)), moe


def mla_spec(cfg: HFConfig, rope) -> MLASpec:
    nope, r = cfg.size("qk_nope_head_dim"), cfg.size("qk_rope_head_dim")
    scale = (nope + r) ** -0.5
    if rope.kind == "yarn" and rope.mscale_all_dim:  # HF's yarn_apply_mscale: the non-rotary dims too
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return MLASpec(
        q_lora_rank=cfg.size("q_lora_rank", default=0, minimum=0), kv_lora_rank=cfg.size("kv_lora_rank"),
        qk_nope_head_dim=nope, qk_rope_head_dim=r, v_head_dim=cfg.size("v_head_dim"), softmax_scale=scale,
    )


class DeepseekAdapter(LlamaLikeAdapter):
    model_types = ("deepseek_v2", "deepseek_v3")
    names = TensorNames(shared_expert="shared_experts")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        if cfg.get("attention_bias", kind=bool, default=False):
            raise CheckpointError(f"{cfg.source}: attention_bias true is not supported for {cfg.model_type}")
        layer_kinds, moe = deepseek_moe(cfg)
        mla = mla_spec(cfg, cfg.rope(10_000.0))
        interleave = cfg.get("rope_interleave", kind=bool, default=True) if cfg.model_type == "deepseek_v3" else True
        return build_spec(
            cfg, layer_kinds=layer_kinds, moe=moe, dense_ffn=cfg.size("intermediate_size"),
            num_kv_heads=cfg.size("num_attention_heads"), head_dim=mla.qk_rope_head_dim, mla=mla,
            rope_layout="interleaved" if interleave else "halves",
        )

    def _attention(self, read: TensorReader, spec: ModelSpec, p: str) -> MLAWeights:
        mla, D, H = spec.mla, spec.hidden_size, spec.num_heads
        Q, L, r = H * mla.qk_head_dim, mla.kv_lora_rank, mla.qk_rope_head_dim
        R = mla.q_lora_rank
        direct = not R
        return MLAWeights(
            kv_a_CD=read(f"{p}.kv_a_proj_with_mqa.weight", L + r, D),
            kv_a_norm_L=read(f"{p}.kv_a_layernorm.weight", L),
            kv_b_ND=read(f"{p}.kv_b_proj.weight", H * (mla.qk_nope_head_dim + mla.v_head_dim), L),
            o_DV=read(f"{p}.o_proj.weight", D, H * mla.v_head_dim),
            q_QD=read(f"{p}.q_proj.weight", Q, D) if direct else None,
            q_a_RD=None if direct else read(f"{p}.q_a_proj.weight", R, D),
            q_a_norm_R=None if direct else read(f"{p}.q_a_layernorm.weight", R),
            q_b_QR=None if direct else read(f"{p}.q_b_proj.weight", Q, R),
        )


class Glm4MoeAdapter(LlamaLikeAdapter):
    """GLM-4.5 / 4.5-Air (`glm4_moe`): grouped-query attention with q/k/v biases (`attention_bias`),
    half of each head rotated (`partial_rotary_factor`, 0.5 when unset, as HF assumes), an optional
    per-head q/k norm (`use_qk_norm`), and DeepSeek-V3's MoE: sigmoid router with a selection bias,
    shared experts, `first_k_dense_replace` dense layers."""

    model_types = ("glm4_moe",)
    names = TensorNames(shared_expert="shared_experts")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        layer_kinds, moe = deepseek_moe(cfg)
        return build_spec(
            cfg, rope=cfg.rope(10_000.0, default_partial=0.5), layer_kinds=layer_kinds, moe=moe,
            dense_ffn=cfg.size("intermediate_size"),
            attention_bias=cfg.get("attention_bias", kind=bool, default=False),
            qk_norm="per_head" if cfg.get("use_qk_norm", kind=bool, default=False) else "none",
        )
