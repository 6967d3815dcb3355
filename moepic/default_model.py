"""The bundled default model: a small Mixtral-architecture MoE trained on the KJV Bible.

A normal Hugging Face folder shipped inside the package (config.json, bf16 model.safetensors,
tokenizer.json, generation_config.json, training.json), read through the normal loader. It was
trained by `experiments/train_tiny_moe.py` (seed, steps and losses are in training.json) so that
routing behaves like a real MoE's: skewed but live experts, and a predictable next layer.
"""

from __future__ import annotations

import os
from pathlib import Path

from moepic.errors import CheckpointError

NAME = "kjv-moe-tiny"


def default_model_dir() -> Path:
    return Path(__file__).resolve().parent / "models" / NAME


def model_folder(path: str | None) -> str:
    """The folder (or GGUF file) a command runs on: `path`, or the bundled model; a missing folder is named first
    (before a tokenizer lookup could blame tokenizer.json instead)."""
    folder = path or str(default_model_dir())
    from moepic.checkpoint.gguf_names import is_gguf

    if not Path(folder).is_dir() and not is_gguf(folder):
        raise CheckpointError(f"{folder}: model folder not found")
    return folder


def cache_root() -> Path:
    """Where moepic keeps things it builds once (benchmark checkpoints); MOEPIC_CACHE_DIR moves it."""
    return Path(os.environ.get("MOEPIC_CACHE_DIR") or Path.home() / ".cache" / "moepic")
