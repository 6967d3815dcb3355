"""OLMoE: every layer MoE, RMSNorm over the full q and k width, optional clip_qkv, `norm_topk_prob`.
FlexOlmo (`flex_olmo`): OLMoE with its norms after each sublayer (`post_attention_layernorm` on the
attention's output, `post_feedforward_layernorm` on the FFN's), so its router reads the residual."""

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec


class OlmoeAdapter(LlamaLikeAdapter):
    model_types = ("olmoe",)

    def spec(self, cfg: HFConfig, **fields) -> ModelSpec:
        moe = MoESpec(
            num_experts=cfg.size("num_experts", "num_local_experts", "n_routed_experts"),
            top_k=cfg.size("num_experts_per_tok"),
            expert_ffn=cfg.size("intermediate_size"),
            router=RouterSpec(kind="softmax_topk", renormalize=cfg.get("norm_topk_prob", kind=bool, default=False)),
        )
        return build_spec(
            cfg,
            layer_kinds=("moe",) * cfg.size("num_hidden_layers", maximum=MAX_LAYERS),
            moe=moe,
            attention_bias=cfg.get("attention_bias", kind=bool, default=False),
            qk_norm="full",
            clip_qkv=cfg.get("clip_qkv", kind=float, default=None, positive=True),
            **fields,
        )


class FlexOlmoAdapter(OlmoeAdapter):
    model_types = ("flex_olmo",)
    names = TensorNames(first_norm="post_attention_layernorm", second_norm="post_feedforward_layernorm")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        return super().spec(cfg, norm_placement="post", default_rope_theta=500_000.0)
