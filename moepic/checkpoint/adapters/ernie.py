"""ERNIE-4.5-MoE (`ernie4_5_moe`): MoE layers where (l + 1) is a multiple of `moe_layer_interval`
between `moe_layer_start_index` and `moe_layer_end_index` (-1: the last), dense elsewhere; a
softmax router whose selection-only bias sits in `mlp.moe_statics` (top-k of probability + bias,
weighted by the probability, renormalised), computed in float32; ungated shared experts
(`moe_num_shared_experts` × `moe_intermediate_size`); rotary dims paired (2i, 2i + 1)
(ModelSpec.rope_layout "interleaved"). Linear biases (`use_bias`) are refused:
the split experts have none to carry."""

from __future__ import annotations


from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec
from moepic.checkpoint.adapters.reader import TensorReader
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec
from moepic.errors import CheckpointError


class ErnieMoeAdapter(LlamaLikeAdapter):
    model_types = ("ernie4_5_moe",)
    names = TensorNames(shared_expert="shared_experts", router_bias="moe_statics.e_score_correction_bias")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        if cfg.get("use_bias", kind=bool, default=False):
            raise CheckpointError(f"{cfg.source}: use_bias true is not supported for ernie4_5_moe (biased expert projections)")
        layers = cfg.size("num_hidden_layers", maximum=MAX_LAYERS)
        start = cfg.size("moe_layer_start_index", default=1, minimum=0)
        end = cfg.get("moe_layer_end_index", kind=int, default=-1, minimum=-1)
        end = layers - 1 if end == -1 else end
        interval = cfg.size("moe_layer_interval", default=1)
        expert_ffn = cfg.size("moe_intermediate_size")
        moe = MoESpec(
            num_experts=cfg.size("moe_num_experts", "num_experts"), top_k=cfg.size("moe_k", "num_experts_per_tok"),
            expert_ffn=expert_ffn, router=RouterSpec(kind="softmax_biased_topk", renormalize=True, fp32_logits=True),
            shared_expert_ffn=cfg.size("moe_num_shared_experts", default=0, minimum=0) * expert_ffn,
        )
        kinds = tuple("moe" if (l + 1) % interval == 0 and start <= l <= end else "dense" for l in range(layers))
        return build_spec(
            cfg, layer_kinds=kinds, moe=moe, dense_ffn=cfg.size("intermediate_size"), default_rope_theta=500_000.0,
            rope_layout="interleaved",
        )

    def _router_bias(self, read: TensorReader, spec: ModelSpec, prefix: str):
        """Stored [1, E] (one group of experts)."""
        return read.router(f"{prefix}.{self.names.router_bias}", 1, spec.moe.num_experts, spec=spec)[0]
