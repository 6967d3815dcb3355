"""Tensor-by-tensor reading of a folder of safetensors files (single file or sharded). Side effects: file I/O.

Tensors are read one at a time through `safe_open`, converted and handed over, so loading never
holds a second full copy of the model. Every failure names the file and the tensor.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moepic.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _index_shards(folder: Path) -> dict[str, Path]:
    """tensor name → shard path, from model.safetensors.index.json."""
    index_path = folder / INDEX_FILE
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index_path}: no 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard files")
    for shard in set(weight_map.values()):
        if not (folder / shard).is_file():
            raise CheckpointError(f"{index_path}: lists shard {shard!r}, which is missing from {folder}")
    return {name: folder / shard for name, shard in weight_map.items()}


class SafetensorsCheckpoint:
    """Open handles on every shard; `read` takes one tensor, checks its shape, converts it.

    Use as a context manager so the handles close. `unread()` lists tensors nobody asked for,
    which the loader reports as unexpected.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX_FILE).is_file():
            declared = _index_shards(folder)
            files = sorted(set(declared.values()))
        elif (folder / SINGLE_FILE).is_file():
            declared, files = None, [folder / SINGLE_FILE]
        else:
            raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")
        self._stack = ExitStack()
        self._file_of: dict[str, Path] = {}
        self._handles = {}
        for path in files:
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError) as e:
                self._stack.close()
                raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
            self._handles[path] = handle
            for name in handle.keys():
                self._file_of[name] = path
        if declared is not None:
            for name, path in declared.items():
                if self._file_of.get(name) != path:
                    self._stack.close()
                    raise CheckpointError(f"{path}: the index lists tensor {name!r} here, but the file lacks it")
        self._read: set[str] = set()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> set[str]:
        return set(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            raise CheckpointError(f"{self.folder}: missing tensor {name!r}")
        handle = self._handles[path]
        found = tuple(handle.get_slice(name).get_shape())
        if found != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(found)}, expected {list(shape)}")
        try:
            tensor = handle.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
        if not (tensor.is_floating_point() or tensor.numel() == 0):
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected a float type")
        self._read.add(name)
        return tensor.to(device=device, dtype=dtype)

    def unread(self) -> list[str]:
        return sorted(set(self._file_of) - self._read)

    def file_of(self, name: str) -> Path | None:
        return self._file_of.get(name)
