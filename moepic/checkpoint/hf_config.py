"""config.json → typed values, with key aliases and errors that name the file and the key. Side effects: reads one file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moepic.checkpoint.hf_rope import rope_spec_from_hf_config
from moepic.errors import CheckpointError

_MISSING = object()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return data


class HFConfig:
    """A parsed config.json. `get` accepts aliases (`num_experts | num_local_experts | …`) and checks the type."""

    def __init__(self, data: dict[str, Any], source: str, generation: HFConfig | None = None):
        self.data = data
        self.source = source
        # generation_config.json, when the folder has one: it may name more stop tokens.
        self.generation = generation

    @classmethod
    def read(cls, folder: Path) -> HFConfig:
        path = folder / "config.json"
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: model folder not found")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a Hugging Face model folder needs config.json)")
        generation_path = folder / "generation_config.json"
        generation = cls(_read_json_object(generation_path), str(generation_path)) if generation_path.is_file() else None
        return cls(_read_json_object(path), str(path), generation)

    def get(self, *keys: str, kind: type = int, default: Any = _MISSING) -> Any:
        for key in keys:
            value = self.data.get(key)
            if value is None:
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CheckpointError(
                    f"{self.source}: key {key!r} should be {kind.__name__}, got {value!r}"
                )
            return value
        if default is _MISSING:
            raise CheckpointError(f"{self.source}: missing key {' | '.join(repr(k) for k in keys)}")
        return default

    @property
    def model_type(self) -> str:
        return self.get("model_type", kind=str)

    def rope(self, default_theta: float):
        return rope_spec_from_hf_config(self.data, source=self.source, default_theta=default_theta)

    def checkpoint_dtype(self) -> torch.dtype:
        """The dtype the weights were saved in (`dtype`, or transformers 4's `torch_dtype`); float32 if unstated."""
        name = self.get("dtype", "torch_dtype", kind=str, default="float32")
        try:
            return DTYPES[name.removeprefix("torch.")]
        except KeyError:
            raise CheckpointError(f"{self.source}: unsupported dtype {name!r}; supported: {', '.join(DTYPES)}") from None

    def eos_token_ids(self) -> tuple[int, ...]:
        """Stop tokens: generation_config.json's `eos_token_id` when it sets one (as HF generate does)."""
        from_generation = self.generation.token_ids("eos_token_id") if self.generation else ()
        return from_generation or self.token_ids("eos_token_id")

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self.data.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"{self.source}: key {key!r} should be a token id or a list of them, got {value!r}")
        return tuple(values)
