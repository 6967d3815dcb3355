"""Mixtral: every layer MoE, softmax → top-k → renormalise, experts named w1 (gate) / w3 (up) / w2 (down)."""

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec
from moepic.checkpoint.hf_config import HFConfig
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec
from moepic.errors import CheckpointError


class MixtralAdapter(LlamaLikeAdapter):
    model_types = ("mixtral",)
    names = TensorNames(moe_prefix="model.layers.{l}.block_sparse_moe", expert_projections=("w1", "w3", "w2"))

    def spec(self, cfg: HFConfig) -> ModelSpec:
        moe = MoESpec(
            num_experts=cfg.get("num_local_experts", "num_experts", "n_routed_experts"),
            top_k=cfg.get("num_experts_per_tok"),
            expert_ffn=cfg.get("intermediate_size"),
            router=RouterSpec(kind="softmax_topk", renormalize=True),
        )
        window = cfg.get("sliding_window", default=None)
        if window is not None and window < 1:
            raise CheckpointError(f"{cfg.source}: sliding_window must be >= 1 or null, got {window}")
        return build_spec(
            cfg,
            layer_kinds=("moe",) * cfg.get("num_hidden_layers"),
            moe=moe,
            default_rope_theta=1e6,
            sliding_window=window,
        )
