"""dots.llm1 (`dots1`): Qwen3-MoE's attention (per-head q/k norm) with DeepSeek-V3's MoE (sigmoid
router with a selection bias, shared experts, `first_k_dense_replace` dense layers). Layers may
attend through a sliding window: `layer_types` says which, or, where the file does not say, HF's
rule (layers from `max_window_layers` on, when `sliding_window` is set)."""

from __future__ import annotations

from moepic.checkpoint.adapters.deepseek import deepseek_moe
from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec, layer_windows
from moepic.checkpoint.hf_config import HFConfig
from moepic.core.spec import ModelSpec


class Dots1Adapter(LlamaLikeAdapter):
    model_types = ("dots1",)
    names = TensorNames(shared_expert="shared_experts")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        layer_kinds, moe = deepseek_moe(cfg)
        return build_spec(
            cfg, layer_kinds=layer_kinds, moe=moe, dense_ffn=cfg.size("intermediate_size"),
            attention_bias=cfg.get("attention_bias", kind=bool, default=False), qk_norm="per_head",
            layer_windows=layer_windows(cfg, len(layer_kinds), default_window=4096,
                                        untyped_sliding=lambda l: l >= cfg.size("max_window_layers", default=62, minimum=0)),
        )
