"""Mixtral: every layer MoE, softmax → top-k → renormalise, experts named w1 (gate) / w3 (up) / w2 (down)."""

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec


class MixtralAdapter(LlamaLikeAdapter):
    model_types = ("mixtral",)
    names = TensorNames(moe_prefix="model.layers.{l}.block_sparse_moe", expert_projections=("w1", "w3", "w2"))

    def spec(self, cfg: HFConfig) -> ModelSpec:
        moe = MoESpec(
            num_experts=cfg.size("num_local_experts", "num_experts", "n_routed_experts"),
            top_k=cfg.size("num_experts_per_tok"),
            expert_ffn=cfg.size("intermediate_size"),
            router=RouterSpec(kind="softmax_topk", renormalize=True),
        )
        return build_spec(
            cfg,
            layer_kinds=("moe",) * cfg.size("num_hidden_layers", maximum=MAX_LAYERS),
            moe=moe,
            default_rope_theta=1e6,
            sliding_window=cfg.size("sliding_window", default=None),
        )
