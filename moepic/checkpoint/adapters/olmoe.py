"""OLMoE: every layer MoE, RMSNorm over the full q and k width, optional clip_qkv, `norm_topk_prob`."""

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, build_spec
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec


class OlmoeAdapter(LlamaLikeAdapter):
    model_types = ("olmoe",)

    def spec(self, cfg: HFConfig) -> ModelSpec:
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
        )
