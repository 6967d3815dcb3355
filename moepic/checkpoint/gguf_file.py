"""A GGUF file (llama.cpp's checkpoints) read the way the adapters read a safetensors folder: by
Hugging Face tensor name, checked, converted. Side effects: file I/O (a memory map, through the
`gguf` package's reader).

Tensors are mapped to their GGUF names (checkpoint/gguf_names.py) and read one at a time from the
map: float ones as they are, block-quantized ones dequantised in float32 (quant/ggml.py for the
kinds moepic keeps, the `gguf` package's own reference for the rest). Routed experts can instead
be read as their blocks (`blocks`), which the `gguf` expert format keeps (quant/gguf_format.py).
GPT-OSS's adapter reads its experts fused per layer: those tensors are assembled from the file's
per-projection stacks (checkpoint/gguf_fused.py), MXFP4 ones as blocks (`read_stored`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import gguf

from moepic.checkpoint.files import all_finite, non_finite_reason
from moepic.checkpoint.gguf_fused import FusedExperts, assemble, fused_experts
from moepic.checkpoint.gguf_names import GGUFName, gguf_name, unpermute
from moepic.errors import CheckpointError
from moepic.quant.ggml import BLOCKS, dequantize_ggml

_NUMPY_FLOATS = {"F32", "F16", "F64"}


class GGUFFile:
    """A GGUF file's metadata and tensor table (nothing is read until asked). A context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        except Exception as e:  # the reader raises ValueError, IndexError, … on a malformed file
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.tensors, self.reader = {}, None  # the memory map closes with its last reference

    def field(self, key: str, kind: type, default=...):
        """Metadata value `key`, checked to be of `kind` (an int for a float is accepted)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{self.path}: missing GGUF metadata key {key!r}")
            return default
        value = field.contents()
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif kind is float and isinstance(value, float) and field.types[0] == gguf.GGUFValueType.FLOAT32:
            value = float(str(np.float32(value)))  # the decimal a converter wrote (1e-06), not float32's nearest
        if kind is int and isinstance(value, bool) or not isinstance(value, kind) or (kind is float and not math.isfinite(value)):
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} should be {kind.__name__}, got {value!r}")
        return value

    def has(self, name: str) -> bool:
        return name in self.tensors

    def kind(self, name: str) -> str:
        """Tensor `name`'s block type as GGUF names it: F32, BF16, Q8_0, Q4_K, …"""
        return self.tensors[name].tensor_type.name

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Tensor `name`'s shape in torch's order (GGUF lists dimensions innermost first)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        return tuple(int(n) for n in reversed(self.tensors[name].shape))


class GGUFCheckpoint:
    """The tensors of a GGUF file under the names the adapters ask for (SafetensorsCheckpoint's
    interface). `heads`: query and key heads, to undo the llama architecture's q/k row order."""

    prefix = ""

    def __init__(self, path: Path, *, check_finite: bool = True) -> None:
        self.file = GGUFFile(path)
        self.folder = self.file.path  # what messages name
        self.check_finite = check_finite
        arch = self.file.field("general.architecture", str)
        self.arch, self.llama_rope = arch, arch == "llama"
        heads = self.file.field(f"{arch}.attention.head_count", int)
        self.heads = {"q": heads, "k": self.file.field(f"{arch}.attention.head_count_kv", int, heads)}
        self._read: set[str] = set()
        self.read_order: list[str] = []

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def _locate(self, name: str) -> GGUFName | None:
        where = gguf_name(name, llama_rope=self.llama_rope, arch=self.arch)
        return where if where is not None and self.file.has(where.name) else None

    def _fused(self, name: str) -> FusedExperts | None:
        """GPT-OSS's fused expert tensor `name`, where the file holds its sources (in MXFP4, for blocks)."""
        fused = fused_experts(name) if self.arch == "gpt-oss" else None
        if fused is None or not all(self.file.has(s) for s in fused.sources):
            return None
        return fused if not fused.mxfp4 or all(self.file.kind(s) == "MXFP4" for s in fused.sources) else None

    def has(self, name: str) -> bool:
        return self._locate(name) is not None or self._fused(name) is not None

    def stored_dtype(self, name: str) -> str | None:
        """The block type tensor `name` is stored in (F32, BF16, Q4_K, …), or None if absent."""
        fused = self._fused(name)
        if fused is not None:
            return self.file.kind(fused.sources[0])
        where = self._locate(name)
        return None if where is None else self.file.kind(where.name)

    def read(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu",
        *, index: int | None = None,
    ) -> torch.Tensor:
        """Tensor `name` checked to be `shape`, dequantised, in `dtype` on `device`; `index`: one
        expert of a fused GPT-OSS expert tensor."""
        fused = self._fused(name)
        if fused is not None and not fused.mxfp4:
            values = self._assembled(name, fused, shape, index, raw=False)
            return self.checked(name, values, values.to(device=device, dtype=dtype))
        if index is not None:
            raise CheckpointError(f"{self.folder}: GGUF files stack experts per projection; {name!r} is read by expert")
        where = self._where(name, shape)
        values = self._values(where)
        if where.rope_permuted:
            values = unpermute(values, self.heads["q" if ".attn_q." in where.name else "k"])
        self._mark_read(where.name)
        return self.checked(where.name, values, values.reshape(shape).to(device=device, dtype=dtype))

    def read_stored(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *, index: int | None = None) -> torch.Tensor:
        """A fused GPT-OSS MXFP4 tensor (`…_blocks` / `…_scales`, uint8) as the `mxfp4` format keeps it."""
        fused = self._fused(name)
        if fused is None or not fused.mxfp4:
            raise CheckpointError(f"{self.folder}: no MXFP4 experts {name!r} in this GGUF file (expected shape {list(shape)})")
        if dtype != torch.uint8:
            raise CheckpointError(f"{self.folder}: MXFP4 {name!r} is uint8, {dtype} was asked for")
        return self._assembled(name, fused, shape, index, raw=True)

    def checked(self, name: str, stored: torch.Tensor, converted: torch.Tensor) -> torch.Tensor:
        """`converted` (what tensor `name`, `stored`, became), refused by name if it holds NaN or Inf."""
        if self.check_finite and not all_finite(converted):
            raise CheckpointError(f"{self.folder}: tensor {name!r} {non_finite_reason(stored, converted)}")
        return converted

    def _assembled(self, name: str, fused: FusedExperts, shape: tuple[int, ...], index: int | None, *, raw: bool) -> torch.Tensor:
        """Fused tensor `name` (expert `index` of it, or all), checked against `shape` (the whole tensor's)."""
        experts = self.file.tensor_shape(fused.sources[0])[0]
        if index is not None and not index < experts:
            raise CheckpointError(f"{self.folder}: tensor {fused.sources[0]!r} stacks {experts} experts; expert {index} was asked for")
        parts = []
        for source in fused.sources:
            where = GGUFName(source, index)
            if raw:
                data = self.file.tensors[source].data
                parts.append(torch.from_numpy(np.array(data if index is None else data[index])))
            else:
                parts.append(self._values(where))
            self._mark_read(source)
        values = assemble(fused, parts)
        found = (experts, *values.shape) if index is not None else tuple(values.shape)
        if found != tuple(shape):
            raise CheckpointError(f"{self.folder}: {' and '.join(map(repr, fused.sources))} make {name!r} of shape "
                                  f"{list(found)}, expected {list(shape)}")
        return values

    def blocks(self, name: str, rows: int, cols: int) -> tuple[str, torch.Tensor]:
        """Routed-expert weight `name` ([rows, cols] weights) as its block type and its rows of
        blocks, [rows, cols / weights per block · bytes per block] uint8, on the host."""
        where = self._where(name, (rows, cols))
        kind = self.file.kind(where.name)
        if kind not in BLOCKS:
            raise CheckpointError(f"{self.folder}: tensor {where.name!r} is {kind}; kept as blocks: {', '.join(BLOCKS)}")
        data = self.file.tensors[where.name].data
        self._mark_read(where.name)
        return kind, torch.from_numpy(np.array(data if where.expert is None else data[where.expert]))

    def _where(self, name: str, shape: tuple[int, ...]) -> GGUFName:
        where = gguf_name(name, llama_rope=self.llama_rope, arch=self.arch)
        if where is None or not self.file.has(where.name):
            shown = f"{name!r}" if where is None else f"{where.name!r} ({name})"
            raise CheckpointError(f"{self.folder}: missing tensor {shown} (expected shape {list(shape)})")
        found = self.file.tensor_shape(where.name)
        if where.expert is not None:
            if not where.expert < found[0]:
                raise CheckpointError(f"{self.folder}: tensor {where.name!r} stacks {found[0]} experts; expert {where.expert} was asked for")
            found = found[1:]
        # GGUF stores a [1, D] weight (Qwen2-MoE's shared-expert gate) as [D].
        if found != tuple(shape) and (1, *found) != tuple(shape):
            raise CheckpointError(f"{self.folder}: tensor {where.name!r} ({name}) has shape {list(found)}, expected {list(shape)}")
        return where

    def _values(self, where: GGUFName) -> torch.Tensor:
        """The tensor's (or expert's) weights, as stored for float kinds, else in float32."""
        tensor = self.file.tensors[where.name]
        kind, data = tensor.tensor_type.name, tensor.data
        data = data if where.expert is None else data[where.expert]
        if kind in _NUMPY_FLOATS:
            return torch.from_numpy(np.array(data))
        if kind == "BF16":
            return torch.from_numpy(np.array(data)).view(torch.bfloat16)
        if kind in BLOCKS:
            weights, nbytes = BLOCKS[kind]
            blocks = torch.from_numpy(np.array(data)).reshape(-1, nbytes)
            return dequantize_ggml(blocks, kind).reshape(*data.shape[:-1], -1)
        try:
            return torch.from_numpy(gguf.quants.dequantize(np.array(data), tensor.tensor_type))
        except NotImplementedError:
            raise CheckpointError(f"{self.folder}: tensor {where.name!r} is {kind}, which the gguf package cannot "
                                  "dequantise") from None

    def _mark_read(self, name: str) -> None:
        self._read.add(name)
        self.read_order.append(name)

    def unread(self) -> list[str]:
        return sorted(set(self.file.tensors) - self._read)

    def file_of(self, name: str) -> Path:
        return self.file.path
