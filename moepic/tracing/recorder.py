"""RoutingRecorder: a RoutingTap that collects what every MoE layer routed, token by token.

Side effects: copies routing tensors to host memory (a device sync per MoE layer, which the
routing decision already pays). Pass it as `tap=` to `forward` / `generate`; call
`begin_sequence()` before each new prompt when recording several into one trace.
"""

from __future__ import annotations

import numpy as np
import torch

from moepic.core.spec import ModelSpec
from moepic.tracing.trace import RoutingTrace


class RoutingRecorder:
    def __init__(self, spec: ModelSpec, *, model_name: str = "", record_hidden: bool = False):
        if spec.moe is None:
            raise ValueError("the model has no MoE layers to trace")
        self.spec, self.model_name, self.record_hidden = spec, model_name, record_hidden
        self._column = {layer: i for i, layer in enumerate(spec.moe_layers)}
        self._ids: list[list[np.ndarray]] = [[] for _ in spec.moe_layers]
        self._weights: list[list[np.ndarray]] = [[] for _ in spec.moe_layers]
        self._hidden: list[list[np.ndarray]] = [[] for _ in spec.moe_layers]
        self._sequence: list[np.ndarray] = []
        self._position: list[np.ndarray] = []
        self._prefill: list[np.ndarray] = []
        self._seq, self._next_position = -1, 0
        self.begin_sequence()

    def begin_sequence(self) -> None:
        self._seq += 1
        self._next_position = 0

    def routed(self, layer: int, router_input_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> None:
        column = self._column[layer]
        T = ids_TK.shape[0]
        if column == 0:  # the first MoE layer of a forward pass: new tokens
            start = self._next_position
            self._sequence.append(np.full(T, self._seq, dtype=np.int32))
            self._position.append(np.arange(start, start + T, dtype=np.int32))
            # The first forward of a sequence is its prefill (the prompt), later ones decode.
            self._prefill.append(np.full(T, start == 0, dtype=bool))
            self._next_position = start + T
        self._ids[column].append(ids_TK.to("cpu", torch.int16).numpy())
        self._weights[column].append(weights_TK.to("cpu", torch.float32).numpy())
        if self.record_hidden:
            self._hidden[column].append(router_input_TD.to("cpu", torch.float32).numpy())

    def layer_output(self, layer: int, x_TD: torch.Tensor) -> None:
        pass

    def trace(self, source: str = "moepic generate") -> RoutingTrace:
        def stack(per_layer: list[list[np.ndarray]], dtype) -> np.ndarray:
            return np.stack([np.concatenate(chunks) for chunks in per_layer], axis=1).astype(dtype)

        def concat(parts: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        K, L, empty = self.spec.moe.top_k, len(self.spec.moe_layers), not self._sequence
        return RoutingTrace(
            model=self.model_name,
            moe_layers=self.spec.moe_layers,
            num_experts=self.spec.moe.num_experts,
            top_k=K,
            expert_ids_NLK=np.zeros((0, L, K), np.int64) if empty else stack(self._ids, np.int64),
            weights_NLK=np.zeros((0, L, K), np.float32) if empty else stack(self._weights, np.float32),
            sequence_N=concat(self._sequence, np.int32),
            position_N=concat(self._position, np.int32),
            prefill_N=concat(self._prefill, bool),
            hidden_NLD=stack(self._hidden, np.float32) if self.record_hidden and not empty else None,
            source=source,
        )
