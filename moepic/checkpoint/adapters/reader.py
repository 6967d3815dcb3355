"""How adapters read a checkpoint's tensors: in the target dtype and device, experts in neuron
blocks, routed experts placed where the run keeps them (host memory when offloading)."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from moepic.checkpoint.files import PrefixedCheckpoint, SafetensorsCheckpoint
from moepic.quant.e4m3 import BLOCK as E4M3_BLOCK
from moepic.quant.ggml import BLOCKS
from moepic.quant.gguf_format import GGUFFormat
from moepic.quant.mx import BLOCK_BYTES, VALUES_PER_BLOCK, dequantize_mxfp4
from moepic.checkpoint.stored_experts import read_stored_expert
from moepic.errors import CheckpointError
from moepic.core.spec import SILU, ModelSpec
from moepic.core.weights import WIDEST_NEURON_BLOCK, SwiGLUWeights, neuron_block
from moepic.quant import ExpertFormat, QuantizedExpert, build_format

# A routed expert as the run keeps it: dense, or in an expert format (moepic/quant/format.py).
Expert = SwiGLUWeights | QuantizedExpert
FP8 = build_format("fp8")


@attrs.frozen
class Native:
    """A routed expert as its checkpoint's own format stores it: `read(device)` reads it so."""

    format: ExpertFormat
    read: Callable[[str], QuantizedExpert]


@attrs.frozen
class TensorReader:
    """Reads checkpoint tensors in the target dtype/device; builds SwiGLU weights in neuron blocks."""

    ckpt: SafetensorsCheckpoint | PrefixedCheckpoint
    dtype: torch.dtype
    device: str
    widest_neuron_block: int = WIDEST_NEURON_BLOCK
    # Where routed experts go instead: a function that stores one (e.g. packs it into pinned host
    # memory for offloading), called as each is read with its key (`placed`), so no second full
    # copy is ever held.
    place_routed_expert: Callable[[Expert, str], Expert] | None = None
    # The model being read: what reading experts stored in a format needs (their width, biases, activation).
    spec: ModelSpec | None = None
    # Routed experts are stored in this format in the checkpoint (`moepic quantize` wrote it) …
    stored_format: ExpertFormat | None = None
    # … or read as the source stores them and encoded in this one as they are read.
    expert_format: ExpertFormat | None = None
    # The formats a checkpoint's own quantized experts are kept in, one per MoE layer, where they
    # stay as stored (a GGUF file's blocks: the `gguf` format of each layer's kinds).
    native_formats: tuple[ExpertFormat, ...] = ()
    # Where given, each routed expert's key ↦ the checkpoint's tensor names read for it (`moepic
    # quantize` leaves those out of what it writes).
    expert_reads: dict[str, list[str]] | None = None

    def __call__(
        self, name: str, *shape: int, device: str | None = None, dtype: torch.dtype | None = None, index: int | None = None
    ) -> torch.Tensor:
        return self.ckpt.read(name, shape, self.dtype if dtype is None else dtype, self.device if device is None else device,
                              index=index)

    def mxfp4(self, name: str, rows: int, cols: int, *, expert: tuple[int, int], device: str | None = None) -> torch.Tensor:
        """Expert e's [rows, cols] matrix of MXFP4 experts fused per layer (`expert` = (e, E)):
        `{name}_blocks` [E, rows, cols/32, 16] and `{name}_scales` [E, rows, cols/32], both uint8,
        dequantised in the target dtype (quant/mx.py) and checked to be finite."""
        if cols % VALUES_PER_BLOCK:
            raise CheckpointError(f"{self.ckpt.folder}: MXFP4 tensor {name!r} needs rows of whole {VALUES_PER_BLOCK}-value "
                                  f"blocks; its rows are {cols} wide")
        e, E = expert
        groups = cols // VALUES_PER_BLOCK
        blocks = self.ckpt.read_stored(f"{name}_blocks", (E, rows, groups, BLOCK_BYTES), torch.uint8, index=e)
        scales = self.ckpt.read_stored(f"{name}_scales", (E, rows, groups), torch.uint8, index=e)
        target = self.device if device is None else device
        values = dequantize_mxfp4(blocks.to(target), scales.to(target), self.dtype)
        return self.ckpt.checked(f"{name}_blocks", blocks, values)

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
            block=self.block_for(F),
        )

    def block_for(self, F: int, multiple: int = 1) -> int:
        """The neuron block of an F-wide FFN read here: a multiple of `multiple` neurons and of what
        the experts' format cuts at (mxfp4: 32)."""
        formats = (self.stored_format, self.expert_format, *self.native_formats)
        multiple = max((multiple, *(f.neuron_multiple for f in formats if f is not None)))
        block = neuron_block(F, max(self.widest_neuron_block, multiple))
        if block % multiple:
            raise CheckpointError(f"{self.ckpt.folder}: an FFN {F} wide cannot be cut into blocks of {multiple} neurons")
        return block

    def routed_expert(self, prefix: str, projections: tuple[str, str, str], D: int, F: int) -> Expert:
        """Routed expert `prefix` (`….experts.<e>`), as `placed` places one; a block-scaled FP8
        checkpoint's kept as its e4m3 blocks (the `fp8` expert format)."""
        native = None
        stored = self.ckpt.stored_dtype(f"{prefix}.{projections[0]}.weight")
        if stored == "F8_E4M3":
            native = Native(FP8, lambda device: self._fp8_expert(prefix, projections, D, F, device))
        elif stored in BLOCKS and self.native_formats:  # a GGUF file's blocks
            gate_up, down = stored, self.ckpt.stored_dtype(f"{prefix}.{projections[2]}.weight")
            native = Native(GGUFFormat.of(gate_up, down), lambda device: self._gguf_expert(prefix, projections, D, F, device))
        return self.placed(lambda device: self.swiglu(prefix, projections, D, F, device=device), key=prefix, native=native)

    def _fp8_expert(self, prefix: str, projections: tuple[str, str, str], D: int, F: int, device: str) -> QuantizedExpert:
        def blocks(name: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
            weight = self.ckpt.read_stored(f"{prefix}.{name}.weight", (rows, cols), torch.float8_e4m3fn)
            scale = self(f"{prefix}.{name}.weight_scale_inv", -(-rows // E4M3_BLOCK[0]), -(-cols // E4M3_BLOCK[1]),
                         dtype=torch.float32, device="cpu")
            return weight, scale

        gate, up, down = projections
        expert = FP8.from_blocks(*blocks(gate, F, D), *blocks(up, F, D), *blocks(down, D, F), block=self.block_for(F),
                                 dtype=self.dtype, activation=self.spec.moe.activation if self.spec else SILU)
        return expert.to(device)

    def _gguf_expert(self, prefix: str, projections: tuple[str, str, str], D: int, F: int, device: str) -> QuantizedExpert:
        (gate_kind, gate), (up_kind, up), (down_kind, down_DX) = (
            self.ckpt.blocks(f"{prefix}.{name}.weight", *shape) for name, shape in zip(projections, ((F, D), (F, D), (D, F)))
        )
        if gate_kind != up_kind:  # gguf_config refuses such a file first; a check, not a path
            raise CheckpointError(f"{self.ckpt.folder}: expert {prefix}'s gate is {gate_kind}, its up {up_kind}")
        fmt = GGUFFormat.of(gate_kind, down_kind)
        B = self.block_for(F)
        gate_up_N2BX = torch.stack([gate, up]).view(2, F // B, B, -1).transpose(0, 1)
        expert = fmt.from_rows(gate_up_N2BX, down_DX, block=B, dtype=self.dtype,
                               activation=self.spec.moe.activation if self.spec else SILU)
        return expert.to(device)

    def fused_swiglu(
        self, gate_up: str, down: str, D: int, F: int, *, expert: tuple[int, int] | None = None, device: str | None = None
    ) -> SwiGLUWeights:
        """A SwiGLU whose gate and up are one tensor on disk, `gate_up` [2F, D] (gate rows, then up
        rows), beside `down` [D, F]; `expert` (e, E): expert e of experts fused per layer, the
        tensors [E, 2F, D] and [E, D, F], of which only its slices are read."""
        lead, index = ((), None) if expert is None else ((expert[1],), expert[0])
        gate_up_2FD = self(gate_up, *lead, 2 * F, D, device=device, index=index)
        return SwiGLUWeights.from_projections(gate_up_2FD[:F], gate_up_2FD[F:], self(down, *lead, D, F, device=device, index=index),
                                              block=self.block_for(F))

    def fused_expert(self, gate_up: str, down: str, e: int, E: int, D: int, F: int, *, key: str) -> Expert:
        """Routed expert `e` of experts fused on disk (`fused_swiglu`), placed as `placed` places one."""
        return self.placed(lambda device: self.fused_swiglu(gate_up, down, D, F, expert=(e, E), device=device), key=key)

    def placed(self, read_expert: Callable[[str | None], SwiGLUWeights], *, key: str, native: Native | None = None) -> Expert:
        """A routed expert where the run keeps them: read onto the model's device, or onto the host
        and handed to `place_routed_expert` (so no second full copy is ever held). `key` names the
        expert (`<layer prefix>.experts.<e>`): a checkpoint storing experts in a format holds its
        parts under it (checkpoint/stored_experts.py), read instead of calling `read_expert`.
        `native`: the expert as the checkpoint's own format stores it (GPT-OSS's MXFP4), kept so
        unless `expert_format` asks for another (dense: dequantised on load)."""
        device = "cpu" if self.place_routed_expert is not None else None
        want = self.expert_format
        if native is not None and (want is None or want.config == native.format.config):
            expert = native.read(device or self.device)
        elif self.stored_format is not None:
            block = self.block_for(self.spec.moe.expert_ffn)
            expert = read_stored_expert(self.ckpt, key, self.stored_format, self.spec, self.dtype, block, device or self.device)
        else:
            mark = len(self.ckpt.read_order)
            # Encoded on the host, whatever the device: a format's bytes must not depend on where
            # they were made (quantizing on load equals the file `moepic quantize` writes).
            expert = read_expert("cpu" if want is not None and want.quantized else device)
            if self.expert_reads is not None:
                self.expert_reads[self.ckpt.prefix + key] = self.ckpt.read_order[mark:]
            if want is not None and want.quantized:
                expert = want.encode(expert).to(device or self.device)
        # The hook sees the key as the file names it (a multimodal file's text model: under its prefix).
        return expert if self.place_routed_expert is None else self.place_routed_expert(expert, self.ckpt.prefix + key)
