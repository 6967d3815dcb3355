"""MiniMax-M2 (`minimax_m2`): Mixtral's file layout (block_sparse_moe, w1/w3/w2), RMSNorm over the
full q and k width, part of each head rotated (`partial_rotary_factor`, or the released
checkpoints' `rotary_dim`), and a sigmoid router whose selection-only bias lives beside the gate
(`block_sparse_moe.e_score_correction_bias`): top-k of sigmoid + bias, weighted by the sigmoid
alone, renormalised. Its multi-token-prediction modules are not loaded (HF does not either)."""

from __future__ import annotations


from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec, head_dim_of
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec
from moepic.errors import CheckpointError


class MiniMaxM2Adapter(LlamaLikeAdapter):
    model_types = ("minimax_m2",)
    names = TensorNames(moe_prefix="model.layers.{l}.block_sparse_moe", expert_projections=("w1", "w3", "w2"),
                        router_bias="e_score_correction_bias")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        scoring = cfg.get("scoring_func", kind=str, default="sigmoid")
        if scoring != "sigmoid":
            raise CheckpointError(f"{cfg.source}: scoring_func {scoring!r} is not supported for minimax_m2; supported: 'sigmoid'")
        norm = cfg.get("qk_norm_type", kind=str, default="per_layer")
        if norm != "per_layer" or not cfg.get("use_qk_norm", kind=bool, default=True):
            raise CheckpointError(f"{cfg.source}: minimax_m2 with qk_norm_type {norm!r} / use_qk_norm false is not "
                                  "supported (HF normalises the full q and k width in every layer)")
        if cfg.data.get("sliding_window") is not None or any(k != "full_attention" for k in cfg.data.get("layer_types") or []):
            raise CheckpointError(f"{cfg.source}: sliding-window layers are not supported for minimax_m2")
        moe = MoESpec(
            num_experts=cfg.size("num_local_experts"), top_k=cfg.size("num_experts_per_tok"),
            expert_ffn=cfg.size("intermediate_size"),
            router=RouterSpec(kind="sigmoid_group_topk", renormalize=True),
        )
        head_dim = head_dim_of(cfg)
        rotary_dim = cfg.size("rotary_dim", default=head_dim)
        if rotary_dim > head_dim:
            raise CheckpointError(f"{cfg.source}: rotary_dim {rotary_dim} is wider than head_dim {head_dim}")
        return build_spec(
            cfg, rope=cfg.rope(10_000.0, default_partial=rotary_dim / head_dim),
            layer_kinds=("moe",) * cfg.size("num_hidden_layers", maximum=MAX_LAYERS), moe=moe, qk_norm="full",
        )
