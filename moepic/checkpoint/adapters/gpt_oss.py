"""GPT-OSS (`gpt_oss`): grouped-query attention with q/k/v/o biases and a learned sink per head
(core/attention.py `sink_attention`), sliding-window and full layers alternating (`layer_types`, or
HF's default: even layers slide), YaRN; a router with a bias on its logits (top-k of the logits,
softmax over them: the renormalised softmax top-k); experts with biases and the clamped SwiGLU
(spec.GatedActivation: alpha 1.702, limit 7, up + 1).

Experts are fused on disk, one tensor per layer and projection, gate and up interleaved by neuron
(gate = even rows, up = odd rows of the [2F, D] matrix), either as stored by HF transformers
(`experts.gate_up_proj` [E, D, 2F], `experts.down_proj` [E, F, D]) or as the released checkpoints
ship them, MXFP4 (`quantization_config.quant_method` "mxfp4": `experts.gate_up_proj_blocks` /
`_scales` for the [E, 2F, D] matrices, `experts.down_proj_blocks` / `_scales` for [E, D, F]),
kept as blocks (the `mxfp4` expert format, quant/mxfp4.py), or with `expert_format` dense
dequantised on load in the run's dtype exactly as HF does. The per-neuron gate/up biases travel
with their neurons; each expert's down bias is added once to its output (core/moe.py).
"""

from __future__ import annotations

import torch

from moepic.checkpoint.adapters.llama_like import LlamaLikeAdapter, build_spec, layer_windows
from moepic.checkpoint.adapters.reader import Native, TensorReader
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.limits import MAX_LAYERS
from moepic.core.spec import GatedActivation, ModelSpec, MoESpec, RouterSpec
from moepic.core.weights import MoEWeights, SwiGLUWeights
from moepic.quant import QuantizedExpert, build_format
from moepic.quant.mx import BLOCK_BYTES, VALUES_PER_BLOCK

MXFP4 = build_format("mxfp4")


class GptOssAdapter(LlamaLikeAdapter):
    model_types = ("gpt_oss",)
    quantizations = ("mxfp4",)

    def spec(self, cfg: HFConfig) -> ModelSpec:
        layers = cfg.size("num_hidden_layers", maximum=MAX_LAYERS)
        moe = MoESpec(
            num_experts=cfg.size("num_local_experts"), top_k=cfg.size("num_experts_per_tok"),
            expert_ffn=cfg.size("intermediate_size"),
            router=RouterSpec(kind="softmax_topk", renormalize=True, logit_bias=True),
            activation=GatedActivation(
                alpha=cfg.get("swiglu_alpha", kind=float, default=1.702, positive=True),
                limit=cfg.get("swiglu_limit", kind=float, default=7.0, positive=True), up_offset=1.0,
            ),
            expert_bias=True,
        )
        bias = cfg.get("attention_bias", kind=bool, default=True)
        return build_spec(
            cfg, default_rope_theta=150_000.0, layer_kinds=("moe",) * layers, moe=moe, attention_bias=bias,
            output_bias=bias, attention_sinks=True,
            layer_windows=layer_windows(cfg, layers, default_window=128, untyped_sliding=lambda l: l % 2 == 0),
        )

    def _moe(self, read: TensorReader, spec: ModelSpec, l: int) -> MoEWeights:
        moe, D, E, F = spec.moe, spec.hidden_size, spec.moe.num_experts, spec.moe.expert_ffn
        p = f"model.layers.{l}.mlp"
        mxfp4 = read.ckpt.has(f"{p}.experts.gate_up_proj_blocks")

        def expert(e: int, device: str | None) -> SwiGLUWeights:
            if mxfp4:
                gate_up_2FD = read.mxfp4(f"{p}.experts.gate_up_proj", 2 * F, D, expert=(e, E), device=device)
                down_DF = read.mxfp4(f"{p}.experts.down_proj", D, F, expert=(e, E), device=device)
            else:
                gate_up_2FD = read(f"{p}.experts.gate_up_proj", E, D, 2 * F, index=e, device=device).t()
                down_DF = read(f"{p}.experts.down_proj", E, F, D, index=e, device=device).t()
            # Read per expert, with its matrices: the bias is its neurons', and goes where they go.
            bias_2F = read(f"{p}.experts.gate_up_proj_bias", E, 2 * F, index=e, device=device)
            return SwiGLUWeights.from_projections(
                gate_up_2FD[0::2].contiguous(), gate_up_2FD[1::2].contiguous(), down_DF, block=read.block_for(F),
                gate_bias_F=bias_2F[0::2].contiguous(), up_bias_F=bias_2F[1::2].contiguous(), activation=moe.activation,
            )

        def blocks(e: int, device: str) -> QuantizedExpert:
            """Expert e's MXFP4 blocks as stored, kept so (quant/mxfp4.py): gate rows are the even rows
            of gate_up, up rows the odd ones; down's blocks run along F."""
            B, G = read.block_for(F, VALUES_PER_BLOCK), D // VALUES_PER_BLOCK
            gate_up = read.ckpt.read_stored(f"{p}.experts.gate_up_proj_blocks", (E, 2 * F, G, BLOCK_BYTES), torch.uint8, index=e)
            gate_up_scales = read.ckpt.read_stored(f"{p}.experts.gate_up_proj_scales", (E, 2 * F, G), torch.uint8, index=e)
            down = read.ckpt.read_stored(f"{p}.experts.down_proj_blocks", (E, D, F // VALUES_PER_BLOCK, BLOCK_BYTES),
                                         torch.uint8, index=e)
            down_scales = read.ckpt.read_stored(f"{p}.experts.down_proj_scales", (E, D, F // VALUES_PER_BLOCK), torch.uint8, index=e)
            bias_2F = read(f"{p}.experts.gate_up_proj_bias", E, 2 * F, index=e, device="cpu")

            def paired(rows_2F: torch.Tensor) -> torch.Tensor:  # interleaved gate/up rows → [N, 2, B, …]
                return torch.stack((rows_2F[0::2].reshape(F // B, B, -1), rows_2F[1::2].reshape(F // B, B, -1)), dim=1)

            expert = MXFP4.from_blocks(
                paired(gate_up.reshape(2 * F, -1)), paired(gate_up_scales), down, down_scales,
                paired(bias_2F[:, None]).reshape(F // B, 2, B), dtype=read.dtype, activation=moe.activation,
            )
            return expert.to(device)

        experts = tuple(
            read.placed(lambda device, e=e: expert(e, device), key=f"{p}.experts.{e}",
                        native=Native(MXFP4, lambda device, e=e: blocks(e, device)) if mxfp4 else None)
            for e in range(E)
        )
        return MoEWeights(
            read.router(f"{p}.router.weight", E, D, spec=spec), experts,
            router_logit_bias_E=read.router(f"{p}.router.bias", E, spec=spec),
            expert_down_bias_ED=read(f"{p}.experts.down_proj_bias", E, D),
        )

