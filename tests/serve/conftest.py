"""Fixtures of the serve tests: the bundled model's folder with a chat template, a server on it,
and the reference model (tests/serve/serve_support.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moepic.default_model import default_model_dir
from moepic.serve.process import ServerProcess
from serve_support import TEMPLATE, Reference


@pytest.fixture(scope="session")
def chat_folder(tmp_path_factory) -> Path:
    """The bundled model's folder (its files linked) plus a tokenizer_config.json with a chat template."""
    folder = tmp_path_factory.mktemp("kjv-chat")
    for file in default_model_dir().iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def server(chat_folder):
    """Offloaded at a quarter of the experts' bytes (LRU), four requests a batch, two waiting."""
    server = ServerProcess("--model", str(chat_folder), "--model-name", "kjv", "--budget", "0.25", "--policy", "lru",
                           "--max-batch", "4", "--max-queue", "2")
    yield server
    assert server.stop() == 0, server.stderr


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()
