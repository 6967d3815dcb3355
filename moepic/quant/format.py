"""How a routed expert is stored: the one seam the host store, the device cache, staging, the
split, the layout and the latency model ask. Pure.

An expert format turns an expert's weights (core/weights.py `SwiGLUWeights`) into the tensors it
is kept as, and back into weights the kernels compute with:

    SwiGLUWeights ─encode─▶ stored expert: parts, each neuron-major ─decode─▶ SwiGLUWeights (compute dtype)
                             └ a segment of neurons is one slice of every part (`neurons`)

Every part's leading dimension counts neuron blocks, so a top or bottom segment of whole blocks
is a contiguous slice of each part and moves as is: the split, the copies and the cache slots see
bytes, never values. Decoding happens where the expert is computed (core/ffn.py asks `dense()`),
right before its matmuls, so only the compressed bytes are kept and moved.

`dense` (quant/dense.py) keeps the weights as they are: `SwiGLUWeights` is its stored form. Other
formats (quant/int8.py, quant/int4.py, …) store a `QuantizedExpert`. A format is chosen by name
(`EXPERT_FORMATS`), like every strategy, and a new one is one file.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable
from math import prod
from typing import ClassVar

import attrs
import torch

from moepic.core.spec import GatedActivation, ModelSpec
from moepic.core.weights import SwiGLUWeights, neuron_block
from moepic.errors import ConfigError
from moepic.registry import Registry, StrategyConfig

EXPERT_FORMATS = Registry("expert format", default="dense")


class FormatConfig(StrategyConfig):
    registry = EXPERT_FORMATS


@attrs.frozen(kw_only=True)
class PartShape:
    """One tensor of a stored expert, per neuron block of `block` neurons: [blocks, *per_block].
    `paired`: per_block is (2, block, …), gate then up rows of the block's neurons (as
    `SwiGLUWeights.gate_up_N2BD` interleaves them); else (block / u, …) for some u ≥ 1 neurons."""

    name: str
    per_block: tuple[int, ...]
    dtype: torch.dtype
    paired: bool = False

    def file_shape(self, ffn_size: int, block: int) -> tuple[int, ...]:
        """Its shape in a checkpoint file, which does not depend on the block a run reads it in:
        paired [2, F, …] (gate rows, then up rows), else [F / u, …]."""
        if self.paired:
            return (2, ffn_size, *self.per_block[2:])
        return (ffn_size // block * self.per_block[0], *self.per_block[1:])

    def to_file(self, t: torch.Tensor) -> torch.Tensor:
        """[blocks, *per_block] → `file_shape` (a contiguous copy)."""
        if self.paired:
            return t.transpose(0, 1).reshape(2, -1, *t.shape[3:]).contiguous()
        return t.reshape(-1, *t.shape[2:]).contiguous()

    def from_file(self, t: torch.Tensor, block: int) -> torch.Tensor:
        """`file_shape` → [blocks, *per_block] for neuron blocks of `block` (contiguous)."""
        if self.paired:
            return t.reshape(2, -1, block, *t.shape[2:]).transpose(0, 1).contiguous()
        return t.reshape(-1, *self.per_block).contiguous()

    def nbytes(self, blocks: int) -> int:
        return blocks * prod(self.per_block) * self.dtype.itemsize


class ExpertFormat(ABC):
    """A way to store routed experts. Subclasses are registered with `EXPERT_FORMATS.register`."""

    config: FormatConfig
    # Segments are cut at multiples of this many neurons (a group spanning neurons is never cut).
    neuron_multiple: ClassVar[int] = 1
    # The host kernel that computes this format as stored, as host profiles name its rate
    # (perfmodel/hardware.py HostProfile.expert_gbps); None: the host decodes before a GEMV, which
    # no profile prices (hybrid auto is refused: perfmodel/host_costs.py check_priceable).
    host_kernel: ClassVar[str | None] = None

    def __init__(self, config: FormatConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def quantized(self) -> bool:
        return self.name != "dense"

    @abstractmethod
    def parts(self, hidden: int, block: int, dtype: torch.dtype, biased: bool) -> tuple[PartShape, ...]:
        """The stored tensors of an expert `hidden` wide, computed in `dtype`, in packing order:
        itemsizes never grow along it, so every part of a packed buffer starts aligned (core/packing.py)."""

    @abstractmethod
    def encode(self, w: SwiGLUWeights) -> SwiGLUWeights | QuantizedExpert:
        """`w` in this format (on `w`'s device)."""

    @abstractmethod
    def decode(self, q: QuantizedExpert, dtype: torch.dtype) -> SwiGLUWeights:
        """The weights `q` stores, in `dtype`, on its device: what the kernels run."""

    def fused_swiglu(self, x_TD: torch.Tensor, q: QuantizedExpert) -> torch.Tensor | None:
        """`q`'s output for `x_TD` computed from its stored bytes by a fused kernel, where the format
        has one for `x_TD`'s device (quant/int4_fused.py on the host); None: decode, then matmul."""
        return None

    def part_to_file(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Part `name` ([blocks, *per_block]) with its bytes as files keep them: the same bytes, but
        for a format whose in-memory layout depends on the machine (quant/int4_fused.py)."""
        return t

    def part_from_file(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The inverse of `part_to_file`."""
        return t

    def assemble(
        self, named: dict[str, torch.Tensor], *, hidden: int, ffn_size: int, block: int, dtype: torch.dtype,
        activation: GatedActivation,
    ) -> QuantizedExpert:
        """An expert from its parts by name (a gate/up bias where there is one), each reshaped to
        [neuron blocks, *per_block] and put in `parts` order."""
        biased = named.get("gate_up_bias") is not None
        parts = self.parts(hidden, block, dtype, biased)
        tensors = tuple(named[p.name].reshape(ffn_size // block, *p.per_block).contiguous() for p in parts)
        return QuantizedExpert(self, tensors, block, hidden, dtype, activation, biased)

    def named_parts(self, q: QuantizedExpert) -> dict[str, torch.Tensor]:
        """`q`'s parts by name, for decoding: the names are looked up once per shape."""
        return dict(zip(self._part_names(q.hidden, q.block, q.dtype, q.biased), q.parts, strict=True))

    @functools.lru_cache(maxsize=64)
    def _part_names(self, hidden: int, block: int, dtype: torch.dtype, biased: bool) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts(hidden, block, dtype, biased))

    def check_shape(self, hidden: int, ffn_size: int, block: int) -> None:
        """Raise ValueError naming what does not fit (a group size that does not divide the width, …)."""
        if block % self.neuron_multiple or ffn_size % block:
            raise ValueError(f"{self.name} experts cut at multiples of {self.neuron_multiple} neurons; "
                             f"neuron block {block} of an FFN {ffn_size} wide does not")

    def spec_neuron_bytes(self, spec: ModelSpec, dtype_bytes: int) -> int:
        """`neuron_bytes` of a model's routed experts."""
        return self.neuron_bytes(spec.hidden_size, spec.moe.expert_bias, dtype_bytes)

    def neuron_bytes(self, hidden: int, biased: bool, dtype_bytes: int) -> int:
        """Bytes one neuron of an expert takes, scales and biases included: what a miss moves per neuron."""
        dtype = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[dtype_bytes]
        block = self.neuron_multiple
        total = sum(p.nbytes(1) for p in self.parts(hidden, block, dtype, biased))
        if total % block:
            raise ValueError(f"{self.name}: {block} neurons take {total} bytes, not a whole number per neuron")
        return total // block

    def weight_bytes(self, dtype_bytes: int) -> float:
        """Stored bytes an expert weight takes, scales included (biases aside): the weights behind
        a number of bytes, for pricing their flops. Every format's bytes grow with the hidden size in
        proportion, so one wide enough for every format's groups and tiles gives it."""
        hidden = 4096
        return self.neuron_bytes(hidden, False, dtype_bytes) / (3 * hidden)

    def kernel_bytes(self, hidden: int, biased: bool, dtype_bytes: int) -> int:
        """Bytes the computation of one neuron of an expert moves through memory, for the latency
        model. A quantized format decodes into a dense buffer before the matmuls (core/ffn.py): it
        reads its own bytes, writes the dense ones and reads them back."""
        dense = build_format("dense").neuron_bytes(hidden, biased, dtype_bytes)
        return dense if not self.quantized else self.neuron_bytes(hidden, biased, dtype_bytes) + 2 * dense

    def quantization_config(self) -> dict[str, object]:
        """What a checkpoint's config.json records for experts stored in this format (`moepic quantize`)."""
        return {"quant_method": "moepic", "expert_format": self.config.as_dict()}

    def __repr__(self) -> str:
        return f"ExpertFormat({self.config!r})"


@attrs.frozen(eq=False)
class QuantizedExpert:
    """A routed expert stored in a quantized format: `parts` as `format.parts` lists them, each
    [neuron blocks, …], so a segment of whole blocks is a slice of each (`neurons`)."""

    format: ExpertFormat
    parts: tuple[torch.Tensor, ...]
    block: int
    hidden: int
    dtype: torch.dtype  # what it computes in
    activation: GatedActivation
    biased: bool = False  # whether it has gate/up biases (a part of their own, in `dtype`)

    @property
    def ffn_size(self) -> int:
        return self.parts[0].shape[0] * self.block

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.parts

    def with_tensors(self, tensors: tuple[torch.Tensor, ...]) -> QuantizedExpert:
        return attrs.evolve(self, parts=tuple(tensors))

    def neurons(self, start: int, stop: int) -> QuantizedExpert:
        """Neurons [start, stop), both multiples of the block: views, no copy."""
        B = self.block
        if start % B or stop % B or not 0 <= start <= stop <= self.ffn_size:
            raise ValueError(
                f"segment [{start}, {stop}) must lie in [0, {self.ffn_size}] on neuron-block boundaries (block {B})"
            )
        return self.with_tensors(tuple(p[start // B : stop // B] for p in self.parts))

    def to(self, device: torch.device | str) -> QuantizedExpert:
        return self.with_tensors(tuple(p.to(device) for p in self.parts))

    @property
    def kernel_dtype(self) -> torch.dtype:
        """What its decoded weights and matmuls use: float32 on the CPU, where the decode computes in
        float32 anyway and float32 matmuls beat bfloat16 ones (2.2× for a decode step of the bundled
        model's expert, experiments/bench_quant_speed.py); the compute dtype on an accelerator."""
        return torch.float32 if self.parts[0].device.type == "cpu" else self.dtype

    def dense(self) -> SwiGLUWeights:
        return self.format.decode(self, self.kernel_dtype)

    def fused_swiglu(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        return self.format.fused_swiglu(x_TD, self)


def format_of(expert: SwiGLUWeights | QuantizedExpert) -> ExpertFormat:
    """The format an expert is stored in."""
    if isinstance(expert, QuantizedExpert):
        return expert.format
    return build_format("dense")


def expert_shape(spec: ModelSpec) -> tuple[int, int, int]:
    """(hidden size, FFN width, neuron block) of a model's routed experts: what `check_shape` takes."""
    return spec.hidden_size, spec.moe.expert_ffn, neuron_block(spec.moe.expert_ffn)


def check_miss_format(
    miss: ExpertFormat, cached: Iterable[ExpertFormat], hybrid: str = "off", *, shape: tuple[int, int, int] | None = None
) -> None:
    """A miss format (`cache.miss_format`) serves misses of dense experts from a low-bit copy on the
    device: it must be quantized, fit the experts' `shape` (hidden, FFN width, neuron block), the
    experts be dense, and no load be computed on the host (the engine's, the simulator's and the
    configurator's rule); else a ConfigError."""
    if hybrid != "off":
        raise ConfigError(f"cache.miss_format serves misses from a low-bit copy on the device; hybrid {hybrid!r} "
                          "computes them on the host instead: use one or the other")
    quantized = [f for f in cached if f.quantized]
    if quantized:
        raise ConfigError(f"cache.miss_format serves misses of dense experts from a low-bit copy; these experts are "
                          f"already {quantized[0].name}")
    if not miss.quantized:
        raise ConfigError("cache.miss_format: dense is the experts themselves; name a low-bit format (int4, int8, …)")
    if shape is not None:
        try:
            miss.check_shape(*shape)
        except ValueError as e:
            raise ConfigError(f"cache.miss_format: {e}") from None


def build_format(config: FormatConfig | str | dict) -> ExpertFormat:
    """A format from its config, its name, or its YAML node ({name: int4, group_size: 64})."""
    if not isinstance(config, FormatConfig):
        config = EXPERT_FORMATS.structure_node(config, "experts.format")
    return EXPERT_FORMATS.build(config)
