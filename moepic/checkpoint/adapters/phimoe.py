"""PhiMoE (`phimoe`, Phi-3.5-MoE): Mixtral's file layout (block_sparse_moe, w1/w3/w2), LayerNorm
with a bias for every norm, q/k/v/o biases (`attention_bias`), an optional lm_head bias and sliding window, LongRoPE
(`rope_type` "longrope", as HF's PhiMoE applies it: core/rope.py), and SparseMixer routing as HF
computes it at inference (two choices, each weighted by a softmax over the logits near it;
core/routing.py)."""

from __future__ import annotations

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec
from moepic.errors import CheckpointError


class PhimoeAdapter(LlamaLikeAdapter):
    model_types = ("phimoe",)
    names = TensorNames(moe_prefix="model.layers.{l}.block_sparse_moe", expert_projections=("w1", "w3", "w2"))

    def spec(self, cfg: HFConfig) -> ModelSpec:
        top_k = cfg.size("num_experts_per_tok")
        if top_k != 2:
            raise CheckpointError(f"{cfg.source}: num_experts_per_tok {top_k} is not supported for phimoe: "
                                  "SparseMixer routing chooses 2 experts (as HF's PhiMoE does)")
        moe = MoESpec(
            num_experts=cfg.size("num_local_experts"), top_k=2, expert_ffn=cfg.size("intermediate_size"),
            router=RouterSpec(kind="sparsemixer", renormalize=False,
                              jitter_eps=cfg.get("router_jitter_noise", kind=float, default=0.01, positive=True)),
        )
        bias = cfg.get("attention_bias", kind=bool, default=False)
        rope = cfg.rope(1e6)
        if rope.kind == "longrope" and (rope.short_mscale is None or rope.long_mscale is None):
            raise CheckpointError(f"{cfg.source}: phimoe's longrope needs short_mscale and long_mscale (HF's PhiMoE "
                                  "scales by them)")
        return build_spec(
            cfg, rope=rope, layer_kinds=("moe",) * cfg.size("num_hidden_layers", maximum=MAX_LAYERS), moe=moe,
            norm="layer", attention_bias=bias, output_bias=bias,
            lm_head_bias=cfg.get("lm_head_bias", kind=bool, default=False),
            sliding_window=cfg.size("sliding_window", default=None),
        )
