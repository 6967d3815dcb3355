"""A sharded index may only name files inside the model folder; shards that are symlinks (the HF cache) still load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.checkpoint.files import INDEX_FILE, _shard_path
from moepic.checkpoint.load import load_model
from moepic.errors import CheckpointError
from tests_support import cli_error

ARGS = ["generate", "--json", "--greedy", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]


def _sharded_copy(checkpoint_dir, tmp_path) -> Path:
    folder = tmp_path / "models" / "mixtral_sharded"
    shutil.copytree(checkpoint_dir("mixtral_sharded"), folder)
    return folder


def _point_index_at(folder: Path, name: str) -> str:
    """Rewrite the index so every tensor of the first shard is looked up at `name`; the first shard's name."""
    index_path = folder / INDEX_FILE
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {t: (name if s == first else s) for t, s in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return first


def test_index_naming_a_shard_outside_the_folder_is_refused(checkpoint_dir, capsys, tmp_path):
    folder = _sharded_copy(checkpoint_dir, tmp_path)
    # The file it points to exists and is a valid shard, so only the path rule can stop it.
    first = _point_index_at(folder, "../../elsewhere.safetensors")
    shutil.copy(folder / first, tmp_path / "elsewhere.safetensors")
    assert cli_error(capsys, [*ARGS, "--model", str(folder)]) == (
        f"{folder / INDEX_FILE}: shard '../../elsewhere.safetensors' is outside the model folder "
        "(shard names must be relative, without '..')"
    )


def test_index_naming_an_absolute_shard_path_is_refused(checkpoint_dir, tmp_path):
    folder = _sharded_copy(checkpoint_dir, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    first = _point_index_at(folder, str(outside))
    shutil.copy(folder / first, outside)
    with pytest.raises(CheckpointError, match=f"shard '{outside}' is outside the model folder"):
        load_model(folder)


def test_index_naming_a_subfolder_inside_the_model_folder_loads(checkpoint_dir, tmp_path):
    folder = _sharded_copy(checkpoint_dir, tmp_path)
    first = _point_index_at(folder, "shards/first.safetensors")
    (folder / "shards").mkdir()
    (folder / first).rename(folder / "shards" / "first.safetensors")
    assert load_model(folder).spec.num_layers == 3


def test_shards_that_are_symlinks_out_of_the_folder_load_like_the_hf_cache(checkpoint_dir, tmp_path):
    # HF's cache: snapshots/REV/model-….safetensors -> ../../blobs/SHA. The names stay inside the folder.
    snapshot = tmp_path / "snapshots" / "rev"
    blobs = tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in checkpoint_dir("mixtral_sharded").iterdir():
        shutil.copy(file, blobs / file.name)
        os.symlink(Path("..") / ".." / "blobs" / file.name, snapshot / file.name)
    assert load_model(snapshot).spec.num_layers == 3


_SEGMENT = st.sampled_from(["..", ".", "", "a", "b.safetensors", "..a", "a..", "~"])


@given(segments=st.lists(_SEGMENT, min_size=1, max_size=6), absolute=st.booleans())
def test_an_accepted_shard_name_always_stays_inside_the_folder(segments, absolute):
    folder = Path("/models/m")
    name = ("/" if absolute else "") + "/".join(segments)
    try:
        path = _shard_path(folder, name, folder / INDEX_FILE)
    except CheckpointError as e:
        assert str(e).startswith(f"{folder / INDEX_FILE}: shard {name!r} is outside the model folder")
        return
    # Lexically, with every '.' and '..' resolved, the path is the folder or below it.
    assert Path(os.path.normpath(path)).is_relative_to(folder)
