"""config.json → typed values, with key aliases and errors that name the file and the key. Side effects: reads one file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from moepic.checkpoint.hf_rope import rope_spec_from_hf_config
from moepic.checkpoint.limits import MAX_SIZE, as_float
from moepic.errors import CheckpointError

_MISSING = object()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file whose top level is an object; anything else is one CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    # ValueError covers bad syntax, bad UTF-8 and integers longer than Python's digit limit.
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise CheckpointError(f"{path}: not valid JSON ({reason})") from None
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

    def section(self, key: str) -> HFConfig:
        """A nested config (a multimodal checkpoint's `text_config`), its errors naming it."""
        data = self.data.get(key)
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.source}: {key} should be an object, got {data!r}")
        return HFConfig(data, f"{self.source}: {key}", self.generation)

    @classmethod
    def read(cls, folder: Path) -> HFConfig:
        path = folder / "config.json"
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: model folder not found")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a Hugging Face model folder needs config.json)")
        generation_path = folder / "generation_config.json"
        generation = cls(read_json_object(generation_path), str(generation_path)) if generation_path.is_file() else None
        return cls(read_json_object(path), str(path), generation)

    def get(
        self,
        *keys: str,
        kind: type = int,
        default: Any = _MISSING,
        minimum: float | None = None,
        maximum: float | None = None,
        positive: bool = False,
    ) -> Any:
        """The first of `keys` that is set, checked: of type `kind`; a float finite; within
        [minimum, maximum] and > 0 if `positive`, when asked. `default` (unchecked) when none is set."""
        for key in keys:
            raw = value = self.data.get(key)
            if value is None:
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = as_float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CheckpointError(f"{self.source}: key {key!r} should be {kind.__name__}, got {raw!r}")
            # Python's json reads NaN and Infinity; no config value means either.
            if kind is float and not math.isfinite(value):
                raise CheckpointError(f"{self.source}: key {key!r} must be a finite number, got {raw!r}")
            if positive and not value > 0:
                raise CheckpointError(f"{self.source}: key {key!r} must be > 0, got {raw!r}")
            if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
                bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
                raise CheckpointError(f"{self.source}: key {key!r} must be {bounds}, got {raw!r}")
            return value
        if default is _MISSING:
            raise CheckpointError(f"{self.source}: missing key {' | '.join(repr(k) for k in keys)}")
        return default

    def size(self, *keys: str, default: Any = _MISSING, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
        """A width or count: an integer in [minimum, maximum] (by default 1 to 2**31 - 1)."""
        return self.get(*keys, kind=int, default=default, minimum=minimum, maximum=maximum)

    @property
    def model_type(self) -> str:
        return self.get("model_type", kind=str)

    def rope(self, default_theta: float, default_partial: float = 1.0):
        return rope_spec_from_hf_config(self.data, source=self.source, default_theta=default_theta,
                                        default_partial=default_partial)

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
