"""dots.llm1 (`dots1`): Qwen3-MoE's attention (per-head q/k norm) with DeepSeek-V3's MoE (sigmoid
router with a selection bias, shared experts, `first_k_dense_replace` dense layers). Sliding-window
layers (`layer_types`, or `use_sliding_window`) are refused rather than run as full attention
(the spec's window is one for all layers; the released checkpoints have none)."""

from __future__ import annotations

from moepic.checkpoint.adapters.deepseek import deepseek_moe, with_selection_bias
from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec
from moepic.checkpoint.adapters.reader import TensorReader
from moepic.checkpoint.hf_config import HFConfig
from moepic.core.spec import ModelSpec
from moepic.core.weights import MoEWeights
from moepic.errors import CheckpointError


class Dots1Adapter(LlamaLikeAdapter):
    model_types = ("dots1",)
    names = TensorNames(shared_expert="shared_experts")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        kinds = cfg.data.get("layer_types") or []
        sliding = [i for i, kind in enumerate(kinds) if kind != "full_attention"]
        if sliding or cfg.get("use_sliding_window", kind=bool, default=False):
            where = f"layer_types[{sliding[0]}] is {kinds[sliding[0]]!r}" if sliding else "use_sliding_window is true"
            raise CheckpointError(f"{cfg.source}: {where}: sliding-window layers are not supported for dots1")
        layer_kinds, moe = deepseek_moe(cfg)
        return build_spec(
            cfg, layer_kinds=layer_kinds, moe=moe, dense_ffn=cfg.size("intermediate_size"),
            attention_bias=cfg.get("attention_bias", kind=bool, default=False), qk_norm="per_head",
        )

    def _moe(self, read: TensorReader, spec: ModelSpec, l: int) -> MoEWeights:
        return with_selection_bias(super()._moe(read, spec, l), read, spec, self.names.moe_prefix.format(l=l))
