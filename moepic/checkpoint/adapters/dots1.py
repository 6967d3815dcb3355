"""dots.llm1 (`dots1`): Qwen3-MoE's attention (per-head q/k norm) with DeepSeek-V3's MoE (sigmoid
router with a selection bias, shared experts, `first_k_dense_replace` dense layers). Layers may
attend through a sliding window: `layer_types` says which, or, where the file does not say, HF's
rule (layers from `max_window_layers` on, when `sliding_window` is set)."""

from __future__ import annotations

from moepic.checkpoint.adapters.deepseek import deepseek_moe
from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec
from moepic.checkpoint.hf_config import HFConfig
from moepic.core.spec import ModelSpec
from moepic.errors import CheckpointError

LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(cfg: HFConfig, layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), as HF's Dots1Config lays them out."""
    # HF's default window where the key is absent; an explicit null means no sliding window.
    window = None if "sliding_window" in cfg.data and cfg.data["sliding_window"] is None else cfg.size(
        "sliding_window", default=4096)
    types = cfg.data.get("layer_types")
    if types is None:
        first = cfg.size("max_window_layers", default=62, minimum=0)
        return tuple(window if window is not None and l >= first else None for l in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise CheckpointError(f"{cfg.source}: layer_types should list {layers} of {', '.join(LAYER_TYPES)}, got {types!r}")
    if window is None and "sliding_attention" in types:
        raise CheckpointError(f"{cfg.source}: layer_types names sliding_attention layers but sliding_window is null")
    return tuple(window if t == "sliding_attention" else None for t in types)


class Dots1Adapter(LlamaLikeAdapter):
    model_types = ("dots1",)
    names = TensorNames(shared_expert="shared_experts")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        layer_kinds, moe = deepseek_moe(cfg)
        return build_spec(
            cfg, layer_kinds=layer_kinds, moe=moe, dense_ffn=cfg.size("intermediate_size"),
            attention_bias=cfg.get("attention_bias", kind=bool, default=False), qk_norm="per_head",
            layer_windows=layer_windows(cfg, len(layer_kinds)),
        )
