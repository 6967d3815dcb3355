"""Qwen2-MoE and Qwen3-MoE.

Qwen2-MoE: qkv bias, a sigmoid-gated shared expert, dense layers where `decoder_sparse_step` or
`mlp_only_layers` say so. Qwen3-MoE: no bias, no shared expert, a per-head RMSNorm on q and k.
Both: softmax → top-k, renormalised only when `norm_topk_prob` is true.
"""

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, build_spec
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec
from moepic.errors import CheckpointError


def qwen_layer_kinds(cfg: HFConfig, num_experts: int) -> tuple[str, ...]:
    """Layer l is MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid (HF's rule)."""
    step = cfg.size("decoder_sparse_step", default=1)
    num_layers = cfg.size("num_hidden_layers", maximum=MAX_LAYERS)
    dense_only = cfg.data.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(isinstance(l, int) and not isinstance(l, bool) for l in dense_only):
        raise CheckpointError(f"{cfg.source}: mlp_only_layers should be a list of layer indices, got {dense_only!r}")
    # HF skips an index that names no layer; here it is a typo in the file, so say so.
    stray = [l for l in dense_only if not 0 <= l < num_layers]
    if stray:
        raise CheckpointError(
            f"{cfg.source}: mlp_only_layers names layer {stray[0]}, outside [0, {num_layers}) (num_hidden_layers)"
        )
    return tuple(
        "moe" if (l not in dense_only and num_experts > 0 and (l + 1) % step == 0) else "dense"
        for l in range(num_layers)
    )


def qwen_moe_spec(cfg: HFConfig, *, shared_expert: bool, **fields) -> MoESpec:
    shared_ffn = cfg.size("shared_expert_intermediate_size", default=0, minimum=0) if shared_expert else 0
    return MoESpec(
        num_experts=cfg.size("num_experts", "num_local_experts", "n_routed_experts"),
        top_k=cfg.size("num_experts_per_tok"),
        expert_ffn=cfg.size("moe_intermediate_size"),
        router=RouterSpec(kind="softmax_topk", renormalize=cfg.get("norm_topk_prob", kind=bool, default=False)),
        shared_expert_ffn=shared_ffn,
        shared_expert_gated=shared_ffn > 0,
    )


def _reject_sliding_window(cfg: HFConfig) -> None:
    if cfg.get("use_sliding_window", kind=bool, default=False):
        raise CheckpointError(f"{cfg.source}: use_sliding_window=true is not supported for {cfg.model_type}")


class Qwen2MoeAdapter(LlamaLikeAdapter):
    model_types = ("qwen2_moe",)

    def spec(self, cfg: HFConfig) -> ModelSpec:
        _reject_sliding_window(cfg)
        moe = qwen_moe_spec(cfg, shared_expert=True)
        return build_spec(
            cfg,
            layer_kinds=qwen_layer_kinds(cfg, moe.num_experts),
            moe=moe,
            dense_ffn=cfg.size("intermediate_size"),
            attention_bias=cfg.get("qkv_bias", kind=bool, default=True),
        )


class Qwen3MoeAdapter(LlamaLikeAdapter):
    model_types = ("qwen3_moe",)

    def spec(self, cfg: HFConfig) -> ModelSpec:
        _reject_sliding_window(cfg)
        moe = qwen_moe_spec(cfg, shared_expert=False)
        return build_spec(
            cfg,
            layer_kinds=qwen_layer_kinds(cfg, moe.num_experts),
            moe=moe,
            dense_ffn=cfg.size("intermediate_size", default=0, minimum=0),
            attention_bias=cfg.get("attention_bias", kind=bool, default=False),
            qk_norm="per_head",
        )
