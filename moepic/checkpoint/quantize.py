"""Writing a checkpoint whose routed experts are stored in an expert format (`moepic quantize`).
Side effects: file I/O, a progress bar.

    source folder ─read (adapter, as load_model does)─▶ each routed expert ─encode─▶ its parts
                 └─every tensor not read for a routed expert──────────────────────┐   │
    out folder: model*.safetensors = untouched tensors + the experts' parts (checkpoint/stored_experts.py)
                config.json        = the source's, with quantization_config {quant_method: moepic, …}
                every other file (tokenizer, generation config) copied

The output is written into a temporary folder beside `out` and renamed on success
(outputs.atomic_folder), so a failure leaves no partial folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import attrs
from safetensors.torch import save_file

from moepic.checkpoint.adapters.reader import TensorReader
from moepic.checkpoint.files import INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint
from moepic.checkpoint.load import read_spec_and_adapter
from moepic.checkpoint.stored_experts import checked_format, expert_file_tensors
from moepic.core.weights import WIDEST_NEURON_BLOCK, neuron_block
from moepic.errors import CheckpointError
from moepic.outputs import atomic_folder
from moepic.progress import bar
from moepic.quant import ExpertFormat, QuantizedExpert

SHARD_BYTES = 5 * 10**9  # as Hugging Face shards its checkpoints


@attrs.frozen
class QuantizeReport:
    source: str
    out: str
    expert_format: dict
    experts: int
    expert_bytes_before: int  # the routed experts' tensors as the source stores them
    expert_bytes_after: int  # their parts in the new format, scales included
    files: int


def quantize_checkpoint(folder: str | Path, out: str | Path, fmt: ExpertFormat, *, progress: bool = True) -> QuantizeReport:
    folder, out = Path(folder), Path(out)
    if out.resolve() == folder.resolve():
        raise CheckpointError(f"{out}: the output folder is the source checkpoint; choose another one")
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new folder (quantize never overwrites one)")
    spec, cfg, adapter = read_spec_and_adapter(folder)
    q = cfg.data.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "moepic":
        raise CheckpointError(f"{cfg.source}: its experts are already stored as {q.get('expert_format')}; "
                              "quantize the unquantized source checkpoint")
    if spec.moe is None or not spec.moe_layers:
        raise CheckpointError(f"{cfg.source}: a {spec.model_type} model has no routed experts to quantize")
    if not fmt.quantized:
        raise CheckpointError(f"expert format {fmt.name!r} stores experts as they are; choose a quantized one")
    checked_format(fmt, spec, neuron_block(spec.moe.expert_ffn, WIDEST_NEURON_BLOCK), cfg.source)
    experts: dict[str, QuantizedExpert] = {}
    reads: dict[str, list[str]] = {}
    with SafetensorsCheckpoint(folder) as ckpt:

        def keep(expert, key):
            experts[key] = expert
            return expert

        reader = TensorReader(ckpt, cfg.checkpoint_dtype(), "cpu", place_routed_expert=keep, spec=spec,
                              expert_format=fmt, expert_reads=reads)
        adapter.load_weights(reader, spec, progress)
        consumed = {name for names in reads.values() for name in names}
        kept = sorted(ckpt.names() - consumed)
        before = sum(ckpt.stored_nbytes(name) for name in consumed)
        tensors = {name: (lambda name=name: ckpt.raw(name), ckpt.stored_nbytes(name)) for name in kept}
        for key, expert in experts.items():
            for name, t in expert_file_tensors(key, expert).items():
                if name in tensors:
                    raise CheckpointError(f"{cfg.source}: tensor {name!r} exists already; cannot store expert {key!r}'s part there")
                tensors[name] = (lambda t=t: t, t.numel() * t.element_size())
        after = sum(nbytes for name, (_, nbytes) in tensors.items() if name not in kept)
        with atomic_folder(out, "quantized checkpoint") as tmp:
            files = _write_shards(tmp, tensors, progress)
            _copy_other_files(folder, tmp, fmt)
    return QuantizeReport(str(folder), str(out), fmt.config.as_dict(), len(experts), before, after, files)


def _write_shards(folder: Path, tensors: dict, progress: bool) -> int:
    """Tensors ({name: (read, nbytes)}) into shards of at most SHARD_BYTES, with an index if several."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (_, nbytes) in tensors.items():
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(bar(names, desc="writing", unit="file", wanted=progress), shards):
        save_file({name: tensors[name][0]().contiguous() for name in shard}, str(folder / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in tensors.values())},
                 "weight_map": {name: file for file, shard in zip(names, shards) for name in shard}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def _copy_other_files(source: Path, folder: Path, fmt: ExpertFormat) -> None:
    """config.json with the experts' format recorded; every other file but the weights, copied."""
    for path in source.iterdir():
        if path.name == "config.json" or path.name == INDEX_FILE or path.suffix == ".safetensors":
            continue
        if path.is_file():
            shutil.copy2(path, folder / path.name)
        elif path.is_dir():
            shutil.copytree(path, folder / path.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = fmt.quantization_config()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
