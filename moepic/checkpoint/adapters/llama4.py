"""Llama-4 (`llama4_text`, and the text model of a multimodal `llama4` checkpoint, as Llama-4
Scout and Maverick ship: `text_config`, tensors under `language_model.`, the vision tower unread): MoE layers interleaved with dense ones (`moe_layers`, or every
`interleave_moe_layer_step`-th), a top-1 router whose sigmoid weight scales the expert's *input*
(core/moe.py), an ungated shared expert, experts fused on disk per layer (`experts.gate_up_proj`
[E, D, 2F]: gate columns, then up columns; `experts.down_proj` [E, F, D]); attention with NoPE
layers (`no_rope_layers`: 1 where a layer rotates), rotary dims paired (2i, 2i + 1), a weightless
per-head q/k norm after the rotation on rotating layers (`use_qk_norm`), chunked attention on
rotating layers (`attention_chunk_size`, or `layer_types`), and the attention temperature on NoPE
layers (`attn_temperature_tuning`: `attn_scale`, `floor_scale`)."""

from __future__ import annotations

import attrs

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, TensorNames, build_spec
from moepic.checkpoint.adapters.reader import TensorReader
from moepic.checkpoint.files import PrefixedCheckpoint
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import ModelSpec, MoESpec, RouterSpec
from moepic.core.weights import ModelWeights, MoEWeights, SwiGLUWeights
from moepic.errors import CheckpointError

LAYER_TYPES = ("full_attention", "chunked_attention")


def _int_list(cfg: HFConfig, key: str, length: int | None, allowed: range | tuple) -> list[int] | None:
    values = cfg.data.get(key)
    if values is None:
        return None
    if (not isinstance(values, list) or (length is not None and len(values) != length)
            or any(not isinstance(v, int) or isinstance(v, bool) or v not in allowed for v in values)):
        wanted = f"{length} " if length is not None else ""
        raise CheckpointError(f"{cfg.source}: {key} should list {wanted}integers in [{min(allowed)}, {max(allowed)}], got {values!r}")
    return values


class Llama4TextAdapter(LlamaLikeAdapter):
    model_types = ("llama4_text",)
    names = TensorNames(moe_prefix="model.layers.{l}.feed_forward", dense_prefix="model.layers.{l}.feed_forward")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        layers = cfg.size("num_hidden_layers", maximum=MAX_LAYERS)
        top_k = cfg.size("num_experts_per_tok", default=1)
        if top_k != 1:
            raise CheckpointError(f"{cfg.source}: num_experts_per_tok {top_k} is not supported for llama4: its router "
                                  "scales each expert's input, which moepic runs for one expert per token (as Llama-4 ships)")
        moe_layers = _int_list(cfg, "moe_layers", None, range(layers))
        if moe_layers is None:
            step = cfg.size("interleave_moe_layer_step", default=1)
            moe_layers = list(range(step - 1, layers, step))
        # HF: empty or absent means the default layout, a NoPE layer every interval (1 = rotates).
        rotating = None if cfg.data.get("no_rope_layers") == [] else _int_list(cfg, "no_rope_layers", layers, (0, 1))
        if rotating is None:
            interval = cfg.size("no_rope_layer_interval", default=4)
            rotating = [int((l + 1) % interval != 0) for l in range(layers)]
        # HF's 8192 where the key is absent; an explicit null: no chunked layers.
        chunk = None if "attention_chunk_size" in cfg.data and cfg.data["attention_chunk_size"] is None else cfg.size(
            "attention_chunk_size", default=8192)
        types = cfg.data.get("layer_types")
        if types is None:
            types = ["chunked_attention" if r and chunk is not None else "full_attention" for r in rotating]
        if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
            raise CheckpointError(f"{cfg.source}: layer_types should list {layers} of {', '.join(LAYER_TYPES)}, got {types!r}")
        if chunk is None and "chunked_attention" in types:
            raise CheckpointError(f"{cfg.source}: layer_types names chunked_attention layers but attention_chunk_size is null")
        F = cfg.size("intermediate_size")
        moe = MoESpec(
            num_experts=cfg.size("num_local_experts"), top_k=1, expert_ffn=F, shared_expert_ffn=F,
            router=RouterSpec(kind="sigmoid_topk", renormalize=False, weighs_input=True),
        )
        bias = cfg.get("attention_bias", kind=bool, default=False)
        # A bool in HF's config class; some released files give a number, which HF tests for truth.
        tuning = cfg.data.get("attn_temperature_tuning", True)
        if not isinstance(tuning, (bool, int, float)) or tuning != tuning:
            raise CheckpointError(f"{cfg.source}: attn_temperature_tuning should be true, false or a number, got {tuning!r}")
        return build_spec(
            cfg, default_rope_theta=500_000.0, moe=moe, dense_ffn=cfg.size("intermediate_size_mlp", default=16384),
            layer_kinds=tuple("moe" if l in set(moe_layers) else "dense" for l in range(layers)),
            attention_bias=bias, output_bias=bias, rope_layout="interleaved",
            qk_norm="weightless_after_rope" if cfg.get("use_qk_norm", kind=bool, default=True) else "none",
            layer_rope=tuple(bool(r) for r in rotating),
            layer_chunks=tuple(chunk if t == "chunked_attention" else None for t in types),
            nope_temperature=(cfg.get("attn_scale", kind=float, default=0.1, positive=True),
                              float(cfg.size("floor_scale", default=8192))) if tuning else None,
        )

    def _moe(self, read: TensorReader, spec: ModelSpec, l: int) -> MoEWeights:
        moe, D, E, F = spec.moe, spec.hidden_size, spec.moe.num_experts, spec.moe.expert_ffn
        p = self.names.moe_prefix.format(l=l)

        def expert(e: int, device: str | None) -> SwiGLUWeights:
            gate_up_D2F = read(f"{p}.experts.gate_up_proj", E, D, 2 * F, index=e, device=device)
            down_FD = read(f"{p}.experts.down_proj", E, F, D, index=e, device=device)
            return SwiGLUWeights.from_projections(gate_up_D2F[:, :F].t().contiguous(), gate_up_D2F[:, F:].t().contiguous(),
                                                  down_FD.t(), block=read.block_for(F))

        experts = tuple(read.placed(lambda device, e=e: expert(e, device), key=f"{p}.experts.{e}") for e in range(E))
        shared = read.swiglu(f"{p}.shared_expert", ("gate_proj", "up_proj", "down_proj"), D, moe.shared_expert_ffn)
        return MoEWeights(read.router(f"{p}.router.weight", E, D, spec=spec), experts, shared)


class Llama4Adapter(Llama4TextAdapter):
    """A multimodal Llama-4 checkpoint's text model: its `text_config`, its `language_model.` tensors."""

    model_types = ("llama4",)
    ignored_prefixes = ("vision_model.", "multi_modal_projector.")

    def spec(self, cfg: HFConfig) -> ModelSpec:
        return super().spec(cfg.section("text_config"))

    def load_weights(self, read: TensorReader, spec: ModelSpec, progress: bool) -> ModelWeights:
        return super().load_weights(attrs.evolve(read, ckpt=PrefixedCheckpoint(read.ckpt, "language_model.")), spec, progress)
