"""Routed experts stored in a checkpoint in a moepic expert format (moepic/quant/format.py), as
`moepic quantize` writes them. Side effects: file I/O (through the checkpoint reader).

config.json says so with `quantization_config: {quant_method: moepic, expert_format: {name: int4,
group_size: 64, …}}`. Each routed expert is then its format's parts, one tensor each, named after
the expert (`<layer prefix>.experts.<e>`) and the part:

    model.layers.0.block_sparse_moe.experts.3.gate_up         [2, F, D/2] uint8  (int4 codes)
    model.layers.0.block_sparse_moe.experts.3.gate_up_scales  [2, F, D/g] float16
    model.layers.0.block_sparse_moe.experts.3.down            [F, D/2]    uint8  (neuron-major)
    …

in a layout that does not depend on the neuron block a run reads them in (`PartShape.file_shape`);
every other tensor is the source checkpoint's, untouched.
"""

from __future__ import annotations

import torch

from moepic.checkpoint.gguf_config import QUANT_METHOD as GGUF_METHOD
from moepic.checkpoint.hf_config import HFConfig
from moepic.core.spec import ModelSpec
from moepic.errors import CheckpointError, ConfigError
from moepic.quant import ExpertFormat, QuantizedExpert, build_format

QUANT_METHOD = "moepic"


def stored_format(cfg: HFConfig) -> ExpertFormat | None:
    """The format a checkpoint stores its routed experts in (None: the source's own tensors)."""
    q = cfg.data.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        return None
    node = q.get("expert_format")
    if not isinstance(node, dict):
        raise CheckpointError(f"{cfg.source}: quantization_config.expert_format should be an object "
                              f"such as {{'name': 'int4', 'group_size': 64}}, got {node!r}")
    try:
        return build_format(node)
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"{cfg.source}: quantization_config.expert_format: {e}") from None


# Formats checkpoints ship their experts in, by quantization_config.quant_method (kept as they are).
NATIVE_FORMATS = {"mxfp4": "mxfp4", "fp8": "fp8"}


def checkpoint_formats(cfg: HFConfig, moe_layers: int) -> tuple[ExpertFormat, ...]:
    """The format each of the `moe_layers` MoE layers' routed experts load in by default: what
    `moepic quantize` wrote, the release's own (GPT-OSS's MXFP4, block-scaled FP8), a GGUF file's
    blocks (whose kinds may vary by layer), or dense."""
    return gguf_formats(cfg) or (checkpoint_format(cfg),) * moe_layers


def checkpoint_format(cfg: HFConfig) -> ExpertFormat:
    """`checkpoint_formats` of a checkpoint that stores every layer's experts alike (not a GGUF file)."""
    stored = stored_format(cfg)
    if stored is not None:
        return stored
    q = cfg.data.get("quantization_config")
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method == GGUF_METHOD:
        raise ValueError("a GGUF file's formats are per layer: ask checkpoint_formats")
    return build_format(NATIVE_FORMATS.get(method, "dense"))


def gguf_formats(cfg: HFConfig) -> tuple[ExpertFormat, ...] | None:
    """The `gguf` format each MoE layer's routed experts stay in as blocks (checkpoint/gguf_config.py);
    None where the checkpoint is not a GGUF file with quantized experts. Experts that cannot stay
    blocks (a kind moepic does not keep) are refused, naming the way out."""
    q = cfg.data.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != GGUF_METHOD:
        return None
    if "unkept" in q:
        raise CheckpointError(f"{cfg.source}: {q['unkept']}; load it with --expert-format dense (dequantised) "
                              "or int4 (re-encoded)")
    return tuple(build_format(node) for node in q["expert_formats"])


def checked_format(fmt: ExpertFormat, spec: ModelSpec, block: int, source: object) -> None:
    """`fmt` can store this model's experts (a group size that divides the width, …), or a CheckpointError."""
    try:
        fmt.check_shape(spec.hidden_size, spec.moe.expert_ffn, block)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def read_stored_expert(
    ckpt, key: str, fmt: ExpertFormat, spec: ModelSpec, dtype: torch.dtype, block: int, device: str
) -> QuantizedExpert:
    """Routed expert `key` as stored in `fmt`, on `device`, to compute in `dtype`. Codes (integer or
    e4m3) are read as stored, their dtype checked; scales and biases are converted to the part's dtype."""
    D, F, moe = spec.hidden_size, spec.moe.expert_ffn, spec.moe
    tensors = []
    for part in fmt.parts(D, block, dtype, moe.expert_bias):
        name, shape = f"{key}.{part.name}", part.file_shape(F, block)
        if part.dtype.is_floating_point and part.dtype.itemsize > 1:  # scales, biases (not e4m3 codes)
            stored = ckpt.read(name, shape, part.dtype)
        else:
            stored = ckpt.read_stored(name, shape, part.dtype)
        tensors.append(fmt.part_from_file(part.name, part.from_file(stored, block)).to(device))
    return QuantizedExpert(fmt, tuple(tensors), block, D, dtype, moe.activation, moe.expert_bias)


def expert_file_tensors(key: str, expert: QuantizedExpert) -> dict[str, torch.Tensor]:
    """What a checkpoint file holds for routed expert `key` (`read_stored_expert` reads it back)."""
    parts = expert.format.parts(expert.hidden, expert.block, expert.dtype, expert.biased)
    fmt = expert.format
    return {f"{key}.{p.name}": p.to_file(fmt.part_to_file(p.name, t)) for p, t in zip(parts, expert.parts, strict=True)}
