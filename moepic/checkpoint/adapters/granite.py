"""Granite-MoE (`granitemoe`) and Granite-MoE with a shared expert (`granitemoeshared`): Mixtral's
routing (top-k of the logits, softmax over them: the renormalised softmax top-k), experts fused on
disk per layer (`block_sparse_moe.input_linear` [E, 2F, D], gate rows then up rows;
`output_linear` [E, D, F]), an ungated shared expert (`shared_mlp`, fused the same way), and
Granite's four scalings: embeddings × `embedding_multiplier`, each sublayer's output ×
`residual_multiplier`, attention logits × `attention_multiplier` (in place of 1/√d), output logits
÷ `logits_scaling`."""

from __future__ import annotations

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, build_spec
from moepic.checkpoint.adapters.reader import TensorReader
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec
from moepic.core.weights import MoEWeights


class GraniteMoeAdapter(LlamaLikeAdapter):
    model_types = ("granitemoe", "granitemoeshared")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        shared = cfg.size("shared_intermediate_size", default=0, minimum=0) if cfg.model_type == "granitemoeshared" else 0
        moe = MoESpec(
            num_experts=cfg.size("num_local_experts"), top_k=cfg.size("num_experts_per_tok"),
            expert_ffn=cfg.size("intermediate_size"), router=RouterSpec(kind="softmax_topk", renormalize=True),
            shared_expert_ffn=shared,
        )
        return build_spec(
            cfg, layer_kinds=("moe",) * cfg.size("num_hidden_layers", maximum=MAX_LAYERS), moe=moe,
            attention_bias=cfg.get("attention_bias", kind=bool, default=False),
            embedding_multiplier=cfg.get("embedding_multiplier", kind=float, default=1.0, positive=True),
            residual_multiplier=cfg.get("residual_multiplier", kind=float, default=1.0, positive=True),
            attention_scale=cfg.get("attention_multiplier", kind=float, default=1.0, positive=True),
            logits_scaling=cfg.get("logits_scaling", kind=float, default=1.0, positive=True),
        )

    def _moe(self, read: TensorReader, spec: ModelSpec, l: int) -> MoEWeights:
        moe, D, E, F = spec.moe, spec.hidden_size, spec.moe.num_experts, spec.moe.expert_ffn
        p = f"model.layers.{l}.block_sparse_moe"
        experts = tuple(read.fused_expert(f"{p}.input_linear.weight", f"{p}.output_linear.weight", e, E, D, F, key=f"{p}.experts.{e}") for e in range(E))
        shared = None
        if moe.shared_expert_ffn:
            s = f"model.layers.{l}.shared_mlp"
            shared = read.fused_swiglu(f"{s}.input_linear.weight", f"{s}.output_linear.weight", D, moe.shared_expert_ffn)
        return MoEWeights(read.router(f"{p}.router.layer.weight", E, D, spec=spec), experts, shared)
