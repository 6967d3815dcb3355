"""Writing a checkpoint whose routed experts are stored in an expert format (`moepic quantize`).
Side effects: file I/O, a progress bar.

    source folder ─read (adapter, as load_model does)─▶ each routed expert ─encode─▶ its parts
                 └─every tensor not read for a routed expert──────────────────────┐   │
    out folder: model*.safetensors = untouched tensors + the experts' parts (checkpoint/stored_experts.py)
                config.json        = the source's, with quantization_config {quant_method: moepic, …}
                every other file (tokenizer, generation config) copied

Each expert's parts are written as it is encoded (`ShardWriter`: one shard in memory at a time, not
every expert), into a temporary folder beside `out` renamed on success (outputs.atomic_folder), so a
failure leaves no partial folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import attrs
import torch
from safetensors.torch import save_file

from moepic.checkpoint.adapters.reader import TensorReader
from moepic.checkpoint.files import INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint
from moepic.checkpoint.gguf_names import is_gguf
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
    if is_gguf(folder):
        raise CheckpointError(f"{folder}: a GGUF file keeps its experts quantized already and loads as it is "
                              "(--model FILE.gguf); `moepic quantize` rewrites safetensors folders")
    spec, cfg, adapter = read_spec_and_adapter(folder)
    q = cfg.data.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "moepic":
        raise CheckpointError(f"{cfg.source}: its experts are already stored as {q.get('expert_format')}; "
                              "quantize the unquantized source checkpoint")
    if spec.moe is None or not spec.moe_layers:
        raise CheckpointError(f"{cfg.source}: a {spec.model_type} model has no routed experts to quantize")
    if not fmt.quantized:
        raise CheckpointError(f"expert format {fmt.name!r} stores experts as they are; choose a quantized one")
    checked_format(fmt, spec, neuron_block(spec.moe.expert_ffn, max(WIDEST_NEURON_BLOCK, fmt.neuron_multiple)), cfg.source)
    reads: dict[str, list[str]] = {}
    with SafetensorsCheckpoint(folder) as ckpt, atomic_folder(out, "quantized checkpoint") as tmp:
        writer = ShardWriter(tmp, source=cfg.source)
        experts = 0

        def write(expert: QuantizedExpert, key: str) -> QuantizedExpert:
            """Each expert's parts go to the shards as it is encoded; the model keeps an empty stand-in,
            so memory holds one shard, not every expert."""
            nonlocal experts
            experts += 1
            for name, t in expert_file_tensors(key, expert).items():
                writer.add(name, t)
            return expert.with_tensors(tuple(t.new_empty((0, *t.shape[1:])) for t in expert.tensors))

        reader = TensorReader(ckpt, cfg.checkpoint_dtype(), "cpu", place_routed_expert=write, spec=spec,
                              expert_format=fmt, expert_reads=reads)
        adapter.load_weights(reader, spec, progress)
        after = writer.written_bytes
        consumed = {name for names in reads.values() for name in names}
        for name in bar(sorted(ckpt.names() - consumed), desc="copying", unit="tensor", wanted=progress, leave=False):
            writer.add(name, ckpt.raw(name))
        files = writer.close()
        _copy_other_files(folder, tmp, fmt)
        before = sum(ckpt.stored_nbytes(name) for name in consumed)
    return QuantizeReport(str(folder), str(out), fmt.config.as_dict(), experts, before, after, files)


class ShardWriter:
    """Tensors written as they come, into shards of at most SHARD_BYTES; named as Hugging Face names
    them (`model.safetensors`, or `model-0000i-of-0000n.safetensors` and an index) once all are in."""

    def __init__(self, folder: Path, *, source: object) -> None:
        self.folder, self.source = folder, source
        self.names: set[str] = set()
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:  # an expert's part named like a tensor of the source
            raise CheckpointError(f"{self.source}: tensor {name!r} would be written twice")
        self.names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > SHARD_BYTES:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.written_bytes += nbytes

    def _flush(self) -> None:
        save_file(self.pending, str(self.folder / f"shard-{len(self.shards):05d}.part"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Flush, name the shards and write the index where there are several; how many files."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f"shard-{i:05d}.part").rename(self.folder / name)
        if n > 1:
            index = {"metadata": {"total_size": self.written_bytes},
                     "weight_map": {t: file for file, shard in zip(names, self.shards) for t in shard}}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return n


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
