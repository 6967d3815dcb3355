"""How adapters read a checkpoint's tensors: in the target dtype and device, experts in neuron
blocks, routed experts placed where the run keeps them (host memory when offloading)."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from moepic.checkpoint.files import SafetensorsCheckpoint
from moepic.core.spec import ModelSpec
from moepic.core.weights import WIDEST_NEURON_BLOCK, SwiGLUWeights, neuron_block


@attrs.frozen
class TensorReader:
    """Reads checkpoint tensors in the target dtype/device; builds SwiGLU weights in neuron blocks."""

    ckpt: SafetensorsCheckpoint
    dtype: torch.dtype
    device: str
    widest_neuron_block: int = WIDEST_NEURON_BLOCK
    # Where routed experts go instead: a function that stores one (e.g. packs it into pinned host
    # memory for offloading), called as each is read, so no second full copy is ever held.
    place_routed_expert: Callable[[SwiGLUWeights], SwiGLUWeights] | None = None

    def __call__(
        self, name: str, *shape: int, device: str | None = None, dtype: torch.dtype | None = None, index: int | None = None
    ) -> torch.Tensor:
        return self.ckpt.read(name, shape, self.dtype if dtype is None else dtype, self.device if device is None else device,
                              index=index)

    def router(self, name: str, *shape: int, spec: ModelSpec) -> torch.Tensor:
        """A router's weight (or bias): kept in float32 where the router computes in it (DeepSeek's
        and GLM's do, in a bf16 model too, as HF keeps them), else in the model's dtype."""
        return self(name, *shape, dtype=torch.float32 if spec.moe.router.fp32_logits else None)

    def swiglu(
        self, prefix: str, projections: tuple[str, str, str], D: int, F: int, *, device: str | None = None
    ) -> SwiGLUWeights:
        gate, up, down = projections
        return SwiGLUWeights.from_projections(
            self(f"{prefix}.{gate}.weight", F, D, device=device),
            self(f"{prefix}.{up}.weight", F, D, device=device),
            self(f"{prefix}.{down}.weight", D, F, device=device),
            block=neuron_block(F, self.widest_neuron_block),
        )

    def routed_expert(self, prefix: str, projections: tuple[str, str, str], D: int, F: int) -> SwiGLUWeights:
        return self._placed(lambda device: self.swiglu(prefix, projections, D, F, device=device))

    def fused_swiglu(
        self, gate_up: str, down: str, D: int, F: int, *, expert: tuple[int, int] | None = None, device: str | None = None
    ) -> SwiGLUWeights:
        """A SwiGLU whose gate and up are one tensor on disk, `gate_up` [2F, D] (gate rows, then up
        rows), beside `down` [D, F]; `expert` (e, E): expert e of experts fused per layer, the
        tensors [E, 2F, D] and [E, D, F], of which only its slices are read."""
        lead, index = ((), None) if expert is None else ((expert[1],), expert[0])
        gate_up_2FD = self(gate_up, *lead, 2 * F, D, device=device, index=index)
        return SwiGLUWeights.from_projections(gate_up_2FD[:F], gate_up_2FD[F:], self(down, *lead, D, F, device=device, index=index),
                                              block=neuron_block(F, self.widest_neuron_block))

    def fused_expert(self, gate_up: str, down: str, e: int, E: int, D: int, F: int) -> SwiGLUWeights:
        """Routed expert `e` of experts fused on disk (`fused_swiglu`), placed as `routed_expert` places one."""
        return self._placed(lambda device: self.fused_swiglu(gate_up, down, D, F, expert=(e, E), device=device))

    def _placed(self, read_expert: Callable[[str | None], SwiGLUWeights]) -> SwiGLUWeights:
        """A routed expert where the run keeps them: read onto the model's device, or onto the host
        and handed to `place_routed_expert` (so no second full copy is ever held)."""
        if self.place_routed_expert is None:
            return read_expert(None)
        return self.place_routed_expert(read_expert("cpu"))
