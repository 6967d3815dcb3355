"""Hugging Face config.json RoPE keys → RopeSpec. Pure (reads a dict; the caller opened the file).

config.json files carry RoPE settings in three layouts, all read here with transformers 5's
precedence so the frequencies match what `transformers` would compute for the same file:
  * transformers 5:  "rope_parameters": {"rope_type": "yarn", "rope_theta": ..., "factor": ...}
  * legacy:          "rope_scaling": {"type" | "rope_type": ..., "factor": ...} + top-level "rope_theta"
  * plain:           top-level "rope_theta" (or nothing: `default_theta`)
A truthy `rope_scaling` wins over `rope_parameters`; keys inside the dict win over top-level ones,
except a top-level `original_max_position_embeddings`, which HF lets override the dict's (Phi-3).
Each key is range-checked as it is read; `check_rope_angles` then checks the whole, as computed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moepic.checkpoint.limits import MAX_SIZE, as_float
from moepic.core.rope import ROPE_KINDS, rope_inv_freq
from moepic.core.spec import RopeSpec
from moepic.errors import CheckpointError


def _number(value: Any, key: str, source: str, *, above: float | None = None, minimum: float | None = None) -> float:
    """`value` as a finite float, > `above` and >= `minimum` when given; else one error naming `key`."""
    # bool is an int subclass; `true` as a factor is a broken file, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{source}: {key} must be a number, got {value!r}")
    number = as_float(value)
    if not math.isfinite(number):
        raise CheckpointError(f"{source}: {key} must be a finite number, got {value!r}")
    if above is not None and not number > above:
        raise CheckpointError(f"{source}: {key} must be > {above:g}, got {value!r}")
    if minimum is not None and number < minimum:
        raise CheckpointError(f"{source}: {key} must be >= {minimum:g}, got {value!r}")
    return number


def _integer(value: Any, key: str, source: str) -> int:
    number = _number(value, key, source)
    if number != int(number) or not 0 < number <= MAX_SIZE:
        raise CheckpointError(f"{source}: {key} must be an integer in [1, {MAX_SIZE}], got {value!r}")
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


def rope_spec_from_hf_config(
    config: dict, *, source: str, default_theta: float = 10000.0, default_partial: float = 1.0
) -> RopeSpec:
    """RopeSpec for a parsed config.json. `source` (the file's path) starts every error message.

    `default_theta` is used when no rope_theta is given anywhere; transformers uses a per-model
    default here (Mixtral 1e6, Llama 1e4, ...), so an adapter that knows its model may pass it;
    likewise `default_partial`, the rotating share of each head when none is given (GLM-4.5: 0.5).
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
    kind = rope.get(kind_key)
    if kind in (None, ""):  # as transformers reads it; any other non-string is a broken file, not "default"
        kind = "default"
    if not isinstance(kind, str) or kind not in ROPE_KINDS:
        raise CheckpointError(
            f"{source}: unsupported RoPE type {where}.{kind_key}={kind!r}; moepic supports {', '.join(ROPE_KINDS)}"
        )

    # Wavelengths are theta ** (2i / r): at 1 or below they do not grow with i (and YaRN divides by log theta).
    key, value = get("rope_theta", default_theta)
    theta = _number(value, key, source, above=1)
    key, value = get("partial_rotary_factor", default_partial)
    partial = _number(value, key, source)
    if not 0 < partial <= 1:
        raise CheckpointError(f"{source}: {key} must be in (0, 1], got {value!r}")
    if kind == "default":
        return RopeSpec(theta=theta, partial_rotary_factor=partial)

    def scaling(name: str, default: float | None = None, *, required: bool = False, **bounds) -> float | None:
        """A number from the RoPE dict only (scaling knobs never live at the top level), within `bounds`."""
        value = rope.get(name)
        if value is None:
            if required:
                raise CheckpointError(f"{source}: {where}.{name} is required for RoPE type {kind!r}")
            return default
        return _number(value, f"{where}.{name}", source, **bounds)

    # Only llama3, yarn and longrope read the pretraining length; HF falls back to max_position_embeddings.
    original = None
    if kind in ("llama3", "yarn", "longrope"):
        if config.get("original_max_position_embeddings") is not None:
            key, value = "original_max_position_embeddings", config["original_max_position_embeddings"]
        elif rope.get("original_max_position_embeddings") is not None:
            key, value = f"{where}.original_max_position_embeddings", rope["original_max_position_embeddings"]
        else:
            key, value = "max_position_embeddings", config.get("max_position_embeddings")
            if value is None:
                raise CheckpointError(f"{source}: RoPE type {kind!r} needs original_max_position_embeddings")
        original = _integer(value, key, source)

    if kind == "longrope":
        return _longrope(rope, where, source, theta, partial, original, config)
    # Every kind divides frequencies by the factor; YaRN also takes its log.
    factor = scaling("factor", required=kind != "yarn", above=0)
    if factor is None:
        # YaRN with "factor": null: HF takes the context extension ratio (DeepSeek-V3 style).
        factor = _integer(config.get("max_position_embeddings"), "max_position_embeddings", source) / original

    truncate = rope.get("truncate", True)
    if truncate is not None and not isinstance(truncate, bool):
        raise CheckpointError(f"{source}: {where}.truncate must be true or false, got {truncate!r}")
    # llama3 divides the original length by both factors and its blend by their difference.
    low_freq = scaling("low_freq_factor", 1.0, required=kind == "llama3", above=0)
    high_freq = scaling("high_freq_factor", 4.0, required=kind == "llama3", above=0)
    # Equal factors leave no band to blend (Llama-4 Scout ships 1 and 1); a lower high one is nonsense.
    if kind == "llama3" and high_freq < low_freq:
        raise CheckpointError(
            f"{source}: {where}.high_freq_factor ({high_freq:g}) must be ≥ {where}.low_freq_factor ({low_freq:g})"
        )
    return RopeSpec(
        theta=theta,
        kind=kind,
        factor=factor,
        original_max_position=original,
        low_freq_factor=low_freq,
        high_freq_factor=high_freq,
        # YaRN takes logs of both betas (0 means the default, as in transformers) and divides by
        # 0.1 * mscale_all_dim * ln(factor) + 1, which a negative mscale could make zero.
        beta_fast=scaling("beta_fast", 32.0, minimum=0),
        beta_slow=scaling("beta_slow", 1.0, minimum=0),
        mscale=scaling("mscale", minimum=0),
        mscale_all_dim=scaling("mscale_all_dim", minimum=0),
        attention_factor=scaling("attention_factor", above=0),
        # HF reads `.get("truncate", True)` and tests truthiness, so an explicit null disables it.
        truncate=bool(truncate),
        partial_rotary_factor=partial,
    )


def _longrope(rope: dict, where: str, source: str, theta: float, partial: float, original: int, config: dict) -> RopeSpec:
    """LongRoPE's per-frequency factors and mscales (core/rope.py says how HF's PhiMoE applies them)."""

    def factors(name: str) -> tuple[float, ...]:
        values = rope.get(name)
        if not isinstance(values, list) or not values:
            raise CheckpointError(f"{source}: {where}.{name} should be a list of numbers, got {values!r}")
        return tuple(_number(v, f"{where}.{name}", source, above=0) for v in values)

    def mscale(name: str) -> float | None:
        value = rope.get(name)
        return None if value is None else _number(value, f"{where}.{name}", source, above=0)

    # As HF: without a factor, the context extension ratio (only the default mscale reads it).
    factor = rope.get("factor")
    if factor is None:
        factor = _integer(config.get("max_position_embeddings"), "max_position_embeddings", source) / original
    return RopeSpec(
        theta=theta, kind="longrope", original_max_position=original, partial_rotary_factor=partial,
        factor=_number(factor, f"{where}.factor", source, above=0),
        short_factor=factors("short_factor"), long_factor=factors("long_factor"),
        short_mscale=mscale("short_mscale"), long_mscale=mscale("long_mscale"),
    )


def check_rope_angles(rope: RopeSpec, head_dim: int, max_positions: int, *, source: str) -> None:
    """Refuse RoPE settings that pass every per-key check yet give NaN/Inf angles (a factor of 1e-40).

    The frequencies are computed as the model will compute them, and the largest angle (the last
    position times each frequency) must be finite, as must the attention scaling.
    """
    try:
        inv_freq, scaling = rope_inv_freq(rope, head_dim, max_position_embeddings=max_positions)
    except (ArithmeticError, ValueError) as e:
        raise CheckpointError(f"{source}: unusable RoPE settings ({e})") from None
    if not (bool(torch.isfinite(inv_freq * float(max_positions)).all()) and math.isfinite(scaling) and scaling > 0):
        raise CheckpointError(
            f"{source}: RoPE settings (theta {rope.theta:g}, {rope.kind}, factor {rope.factor:g}) "
            f"give non-finite rotation angles within max_position_embeddings {max_positions}"
        )
