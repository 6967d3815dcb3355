"""Hugging Face config.json RoPE keys → RopeSpec. Pure (reads a dict; the caller opened the file).

config.json files carry RoPE settings in three layouts, all read here with transformers 5's
precedence so the frequencies match what `transformers` would compute for the same file:
  * transformers 5:  "rope_parameters": {"rope_type": "yarn", "rope_theta": ..., "factor": ...}
  * legacy:          "rope_scaling": {"type" | "rope_type": ..., "factor": ...} + top-level "rope_theta"
  * plain:           top-level "rope_theta" (or nothing: `default_theta`)
A truthy `rope_scaling` wins over `rope_parameters`; keys inside the dict win over top-level ones,
except a top-level `original_max_position_embeddings`, which HF lets override the dict's (Phi-3).
"""

from __future__ import annotations

import math
from typing import Any

from moepic.core.rope import ROPE_KINDS
from moepic.core.spec import RopeSpec
from moepic.errors import CheckpointError


def _number(value: Any, key: str, source: str) -> float:
    # bool is an int subclass; `true` as a factor is a broken file, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{source}: {key} must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, key: str, source: str) -> int:
    number = _number(value, key, source)
    if number != int(number) or number <= 0:
        raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    return int(number)


def _rope_dict(config: dict, source: str) -> tuple[str, dict]:
    """(name of the key it came from, the RoPE dict); an empty dict when the file has none."""
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value:
            if not isinstance(value, dict):
                raise CheckpointError(f"{source}: {key} must be an object, got {value!r}")
            if any(isinstance(v, dict) for v in value.values()):
                raise CheckpointError(
                    f"{source}: {key} is nested per layer type ({', '.join(value)}); "
                    "moepic needs one RoPE for all layers"
                )
            return key, value
    return "rope_parameters", {}


def rope_spec_from_hf_config(config: dict, *, source: str, default_theta: float = 10000.0) -> RopeSpec:
    """RopeSpec for a parsed config.json. `source` (the file's path) starts every error message.

    `default_theta` is used when no rope_theta is given anywhere; transformers uses a per-model
    default here (Mixtral 1e6, Llama 1e4, ...), so an adapter that knows its model may pass it.
    """
    where, rope = _rope_dict(config, source)

    def get(name: str, default: Any = None) -> tuple[str, Any]:
        """(key path for messages, value) from the RoPE dict, else top level, else `default`."""
        if rope.get(name) is not None:
            return f"{where}.{name}", rope[name]
        if config.get(name) is not None:
            return name, config[name]
        return name, default

    kind_key = "rope_type" if rope.get("rope_type") is not None else "type"
    kind = rope.get(kind_key) or "default"
    if kind not in ROPE_KINDS:
        raise CheckpointError(
            f"{source}: unsupported RoPE type {where}.{kind_key}={kind!r}; moepic supports {', '.join(ROPE_KINDS)}"
        )

    key, value = get("rope_theta", default_theta)
    theta = _number(value, key, source)
    if theta <= 0:
        raise CheckpointError(f"{source}: {key} must be > 0, got {value!r}")
    key, value = get("partial_rotary_factor", 1.0)
    partial = _number(value, key, source)
    if not 0 < partial <= 1:
        raise CheckpointError(f"{source}: {key} must be in (0, 1], got {value!r}")
    if kind == "default":
        return RopeSpec(theta=theta, partial_rotary_factor=partial)

    def scaling(name: str, default: float | None = None, *, required: bool = False) -> float | None:
        """A number from the RoPE dict only: scaling knobs never live at the top level."""
        value = rope.get(name)
        if value is None:
            if required:
                raise CheckpointError(f"{source}: {where}.{name} is required for RoPE type {kind!r}")
            return default
        return _number(value, f"{where}.{name}", source)

    # Only llama3 and yarn read the pretraining length; HF falls back to max_position_embeddings.
    original = None
    if kind in ("llama3", "yarn"):
        if config.get("original_max_position_embeddings") is not None:
            key, value = "original_max_position_embeddings", config["original_max_position_embeddings"]
        elif rope.get("original_max_position_embeddings") is not None:
            key, value = f"{where}.original_max_position_embeddings", rope["original_max_position_embeddings"]
        else:
            key, value = "max_position_embeddings", config.get("max_position_embeddings")
            if value is None:
                raise CheckpointError(f"{source}: RoPE type {kind!r} needs original_max_position_embeddings")
        original = _integer(value, key, source)

    factor = scaling("factor", required=kind != "yarn")
    if factor is None:
        # YaRN with "factor": null: HF takes the context extension ratio (DeepSeek-V3 style).
        factor = _integer(config.get("max_position_embeddings"), "max_position_embeddings", source) / original

    truncate = rope.get("truncate", True)
    if truncate is not None and not isinstance(truncate, bool):
        raise CheckpointError(f"{source}: {where}.truncate must be true or false, got {truncate!r}")
    return RopeSpec(
        theta=theta,
        kind=kind,
        factor=factor,
        original_max_position=original,
        low_freq_factor=scaling("low_freq_factor", 1.0, required=kind == "llama3"),
        high_freq_factor=scaling("high_freq_factor", 4.0, required=kind == "llama3"),
        beta_fast=scaling("beta_fast", 32.0),
        beta_slow=scaling("beta_slow", 1.0),
        mscale=scaling("mscale"),
        mscale_all_dim=scaling("mscale_all_dim"),
        attention_factor=scaling("attention_factor"),
        # HF reads `.get("truncate", True)` and tests truthiness, so an explicit null disables it.
        truncate=bool(truncate),
        partial_rotary_factor=partial,
    )
