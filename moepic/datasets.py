"""Texts shipped with moepic (moepic/data/), by name: what `--dataset NAME` reads. Pure.

kjv-heldout: the last 5 % of the KJV Bible, the part the bundled model never trained on
(experiments/train_tiny_moe.py's split).
"""

from __future__ import annotations

from pathlib import Path

from moepic.errors import ConfigError

DATASETS = {"kjv-heldout": Path(__file__).resolve().parent / "data" / "kjv-heldout.txt"}


def known_datasets() -> str:
    return ", ".join(sorted(DATASETS))


def dataset_path(name: str) -> Path:
    """The file of a shipped text; an unknown name lists the known ones."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {known_datasets()}")
    return DATASETS[name]
