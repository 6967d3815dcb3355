"""load_model: a Hugging Face model folder → a ready `Model`. Side effects: file I/O, progress bar."""

from __future__ import annotations

from pathlib import Path

import torch

from moepic.checkpoint.adapters import adapter_for
from moepic.checkpoint.adapters.reader import TensorReader
from moepic.checkpoint.files import SafetensorsCheckpoint
from moepic.checkpoint.gguf_config import QUANT_METHOD as GGUF_METHOD
from moepic.checkpoint.gguf_config import gguf_config
from moepic.checkpoint.gguf_file import GGUFCheckpoint
from moepic.checkpoint.gguf_names import is_gguf
from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.hf_rope import check_rope_angles
from moepic.checkpoint.stored_experts import (QUANT_METHOD, checked_format, checkpoint_formats, gguf_formats,
                                              stored_format)
from moepic.core.model import Model
from moepic.core.packing import pack_expert
from moepic.core.spec import ModelSpec
from moepic.core.weights import WIDEST_NEURON_BLOCK, neuron_block
from moepic.errors import CheckpointError
from moepic.quant import ExpertFormat
from moepic.quant.e4m3 import BLOCK as E4M3_BLOCK
from moepic.quant.e4m3 import fp8_available

# Buffers some exporters save that carry no information moepic needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_spec(folder: str | Path) -> tuple[ModelSpec, HFConfig]:
    spec, cfg, _ = read_spec_and_adapter(folder)
    return spec, cfg


def read_spec_and_adapter(folder: str | Path):
    """`folder`'s spec, config and adapter: a Hugging Face model folder, or a GGUF file."""
    cfg = gguf_config(Path(folder)) if is_gguf(folder) else HFConfig.read(Path(folder))
    adapter = adapter_for(cfg.model_type, cfg.source)
    _check_quantization(cfg, adapter.quantizations)
    try:
        spec = adapter.spec(cfg)
    except (ValueError, TypeError) as e:  # MoESpec/RouterSpec validation inside an adapter
        raise CheckpointError(f"{cfg.source}: inconsistent model config ({e})") from None
    check_rope_angles(spec.rope, spec.head_dim, spec.max_position_embeddings, source=cfg.source)
    return spec, cfg, adapter


def _check_quantization(cfg: HFConfig, supported: tuple[str, ...]) -> None:
    """A quantized checkpoint loads only where its adapter reads that format: refused by name, not
    left to fail on a missing weight (or, worse, to load what it does not understand)."""
    q = cfg.data.get("quantization_config")
    if q is None:
        return
    if not isinstance(q, dict):
        raise CheckpointError(f"{cfg.source}: quantization_config should be an object, got {q!r}")
    method = q.get("quant_method")
    if method in (QUANT_METHOD, GGUF_METHOD):  # experts in a moepic expert format: every family reads them
        return
    if method == "fp8":  # block-scaled FP8 (DeepSeek-V3, Qwen3-FP8): every weight reads through files.py
        _check_fp8(cfg, q)
        return
    if method not in supported:
        read = ", ".join(map(repr, supported)) + ", " if supported else ""
        raise CheckpointError(f"{cfg.source}: quantization_config.quant_method {method!r} is not supported for "
                              f"{cfg.model_type}; supported: {read}{QUANT_METHOD!r} (`moepic quantize` writes it) "
                              "or an unquantized checkpoint")


def _check_fp8(cfg: HFConfig, q: dict) -> None:
    if not fp8_available():
        raise CheckpointError(f"{cfg.source}: an FP8 checkpoint needs a torch with float8 dtypes; this torch is {torch.__version__}")
    block = q.get("weight_block_size")
    if block is not None and list(block) != list(E4M3_BLOCK):
        raise CheckpointError(f"{cfg.source}: quantization_config.weight_block_size {block!r} is not supported; "
                              f"FP8 weights are read in {list(E4M3_BLOCK)} blocks")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{cfg.source}: quantization_config.fmt {q.get('fmt')!r} is not supported; FP8 weights are read as e4m3")


def _kept_blocks(cfg: HFConfig) -> tuple[ExpertFormat, ...]:
    """The formats a GGUF file's experts stay in as blocks, one per MoE layer; () where they cannot
    (read dequantised, or encoded, as the run asks: `load_model` refused them if it asked nothing)."""
    try:
        return gguf_formats(cfg) or ()
    except CheckpointError:
        return ()


def load_model(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    progress: bool = False,
    widest_neuron_block: int = WIDEST_NEURON_BLOCK,
    offload_experts: bool = False,
    check_weights: bool = True,
    expert_format: ExpertFormat | None = None,
) -> Model:
    """Read config.json and the safetensors weights (or a GGUF file: `folder` names the file);
    `dtype=None` keeps the checkpoint's dtype (a GGUF file's: float32).

    Experts are laid out in neuron blocks of up to `widest_neuron_block` neurons: the granularity
    at which they can be split (core/weights.py). With `offload_experts`, routed experts stay in
    host memory, each packed in one flat buffer (pinned when `device` is CUDA) as it is read:
    what the offloading engine (moepic/runtime/offload.py) copies from. `check_weights` refuses a
    tensor with NaN or Inf values (in the target dtype), naming it; turning it off saves one pass
    over the weights (see files.py).

    Routed experts are kept in the format the checkpoint stores them in (`moepic quantize`:
    checkpoint/stored_experts.py; GPT-OSS's MXFP4; a GGUF file's blocks), or read as `expert_format` says: `dense`
    dequantises a checkpoint's own format on load, a quantized one encodes experts as they are read
    (a checkpoint `moepic quantize` wrote is not re-encoded: asking for another format is an error).
    """
    folder = Path(folder)
    spec, cfg, adapter = read_spec_and_adapter(folder)
    dtype = cfg.checkpoint_dtype() if dtype is None else dtype
    stored = stored_format(cfg)
    if stored is not None and expert_format is not None and expert_format.config != stored.config:
        raise CheckpointError(f"{cfg.source}: its experts are stored as {stored.config.as_dict()}; "
                              f"re-encoding them as {expert_format.config.as_dict()} is not supported (quantize the source checkpoint)")
    gguf = is_gguf(folder)
    layers = len(spec.moe_layers) if spec.moe is not None else 0
    # A GGUF file's blocks that cannot stay so are refused here, unless a format is asked for.
    own = checkpoint_formats(cfg, layers) if expert_format is None else ()
    kept = _kept_blocks(cfg) if gguf else ()
    wanted = [f for f in (stored, expert_format, *own) if f is not None and f.quantized]
    if wanted and spec.moe is not None:
        block = neuron_block(spec.moe.expert_ffn, max(widest_neuron_block, *(f.neuron_multiple for f in wanted)))
        for fmt in {f.config: f for f in wanted}.values():
            checked_format(fmt, spec, block, cfg.source)
    opened = GGUFCheckpoint if gguf else SafetensorsCheckpoint
    with opened(folder, check_finite=check_weights) as ckpt:
        place = None
        if offload_experts:
            pin = torch.device(device).type == "cuda"

            def place(expert, key):
                return pack_expert(expert, pin_memory=pin)
        reader = TensorReader(ckpt, dtype, device, widest_neuron_block, place_routed_expert=place, spec=spec,
                              stored_format=stored, expert_format=None if stored is not None else expert_format,
                              native_formats=kept)
        weights = adapter.load_weights(reader, spec, progress)
        unexpected = [n for n in ckpt.unread() if not n.endswith(_IGNORED_SUFFIXES)
                      and not n.startswith(adapter.ignored_prefixes)]
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:3]) + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")
        raise CheckpointError(
            f"{ckpt.file_of(unexpected[0])}: unexpected tensor(s) {shown} for a {spec.model_type} model with this config"
        )
    return Model.build(spec, weights)
