"""A Mixtral-shaped model with random weights, built straight into moepic's weight tree: no
checkpoint on disk, weights drawn on the device (fast on a GPU). For benchmarks and GPU tests that
need experts large enough for copies and kernels to take real time (the bundled model's take
microseconds). Side effects: device memory, pinned host memory on CUDA."""

from __future__ import annotations

import attrs
import torch
from tqdm.auto import tqdm

from moepic.core.model import Model
from moepic.core.packing import pack_expert
from moepic.core.spec import ModelSpec, MoESpec, RopeSpec, RouterSpec
from moepic.core.weights import AttentionWeights, LayerWeights, ModelWeights, MoEWeights, SwiGLUWeights


@attrs.frozen
class MixtralShape:
    layers: int = 8
    hidden: int = 4096
    ffn: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    experts: int = 8
    top_k: int = 2

    def spec(self) -> ModelSpec:
        D, H = self.hidden, self.heads
        return ModelSpec(
            model_type="mixtral", vocab_size=self.vocab, hidden_size=D, num_heads=H, num_kv_heads=self.kv_heads,
            head_dim=D // H, norm_eps=1e-5, rope=RopeSpec(theta=1e6), layer_kinds=("moe",) * self.layers,
            max_position_embeddings=4096,
            moe=MoESpec(num_experts=self.experts, top_k=self.top_k, expert_ffn=self.ffn,
                        router=RouterSpec(kind="softmax_topk", renormalize=True)),
        )


def random_models(
    shape: MixtralShape, device: torch.device, *, dense: bool, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> tuple[Model | None, Model]:
    """Random weights (std 0.02): the dense all-resident model (if asked) and the offloaded one,
    whose routed experts are packed on the host (pinned on CUDA); the two share every other tensor."""
    spec = shape.spec()
    D, F, E, H, Hkv, d = shape.hidden, shape.ffn, shape.experts, shape.heads, shape.kv_heads, spec.head_dim
    g = torch.Generator(device).manual_seed(seed)

    def rand(*size):
        return (torch.randn(*size, generator=g, device=device) * 0.02).to(dtype)

    pin = device.type == "cuda"
    dense_layers, offload_layers = [], []
    for _ in tqdm(range(shape.layers), desc="building layers", leave=False):
        on_device = [SwiGLUWeights.from_projections(rand(F, D), rand(F, D), rand(D, F)) for _ in range(E)]
        packed = tuple(pack_expert(w, pin_memory=pin) for w in on_device)
        attention = AttentionWeights(rand(H * d, D), rand(Hkv * d, D), rand(Hkv * d, D), rand(D, H * d))
        ones_D = torch.ones(D, dtype=dtype, device=device)
        router_ED = rand(E, D)
        if dense:
            dense_layers.append(LayerWeights(ones_D, attention, ones_D, MoEWeights(router_ED, tuple(on_device))))
        offload_layers.append(LayerWeights(ones_D, attention, ones_D, MoEWeights(router_ED, packed)))
        del on_device  # the dense model keeps them, or they go now: never both models' experts on the device
    embed_VD, final_norm_D, head_VD = rand(shape.vocab, D), torch.ones(D, dtype=dtype, device=device), rand(shape.vocab, D)

    def build(layers):
        return Model.build(spec, ModelWeights(embed_VD, tuple(layers), final_norm_D, head_VD))

    return (build(dense_layers) if dense else None), build(offload_layers)
