"""Routed experts in host memory, each packed in one flat buffer (moepic/core/packing.py: the layout
and why). Side effects: allocation, pinning. On a CUDA machine the buffers are pinned, which is what
lets host→device copies run asynchronously at full bandwidth.
"""

from __future__ import annotations

import torch

from moepic.core.packing import flat_buffer, pack_expert
from moepic.core.weights import ModelWeights, MoEWeights, SwiGLUWeights
from moepic.quant import ExpertFormat, QuantizedExpert


class HostExpertStore:
    """Every routed expert of a model as a flat host buffer, addressed by (layer, expert)."""

    def __init__(self, weights: ModelWeights, *, pin_memory: bool = False, miss_format: ExpertFormat | None = None) -> None:
        """Adopts experts that are already packed (see `pack_expert`; no copy); packs the others.
        `miss_format`: also keep each expert's low-bit copy in it (`miss_experts`, `miss_flat`),
        encoded here, on the host, so its bytes never depend on the device."""
        self.experts: dict[int, tuple[SwiGLUWeights, ...]] = {}
        self.flat: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer, lw in enumerate(weights.layers):
            if not isinstance(lw.ffn, MoEWeights):
                continue
            packed = []
            for w in lw.ffn.experts:
                flat = flat_buffer(w)
                if flat is None or flat.device.type != "cpu" or (pin_memory and not flat.is_pinned()):
                    w = pack_expert(w.to("cpu"), pin_memory=pin_memory)
                    flat = flat_buffer(w)
                packed.append((w, flat))
            self.experts[layer] = tuple(w for w, _ in packed)
            self.flat[layer] = tuple(f for _, f in packed)
        self.miss_experts: dict[int, tuple[QuantizedExpert, ...]] = {}
        self.miss_flat: dict[int, tuple[torch.Tensor, ...]] = {}
        if miss_format is not None:
            for layer, experts in self.experts.items():
                low = [pack_expert(miss_format.encode(w), pin_memory=pin_memory) for w in experts]
                self.miss_experts[layer] = tuple(low)
                self.miss_flat[layer] = tuple(flat_buffer(w) for w in low)

    @property
    def pinned(self) -> bool:
        return all(f.is_pinned() for layer in self.flat.values() for f in layer)

