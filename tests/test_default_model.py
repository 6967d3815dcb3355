"""The built-in default model: created once in the cache folder, loadable, deterministic."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from moepic.checkpoint.load import load_model
from moepic.default_model import byte_level_tokenizer, default_model_dir
from moepic.tokenizer import IncrementalDecoder, TextCodec


def test_default_model_is_created_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPIC_CACHE_DIR", str(tmp_path))
    folder = default_model_dir()
    assert folder.parent == tmp_path
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    model = load_model(folder)
    assert model.spec.model_type == "mixtral"
    assert model.spec.moe.num_experts == 8 and model.spec.moe.top_k == 2


def test_two_cache_folders_get_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPIC_CACHE_DIR", str(tmp_path / "a"))
    a = (default_model_dir() / "model.safetensors").read_bytes()
    monkeypatch.setenv("MOEPIC_CACHE_DIR", str(tmp_path / "b"))
    assert (default_model_dir() / "model.safetensors").read_bytes() == a


def test_byte_level_tokenizer_round_trips_any_text(tmp_path):
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    codec = TextCodec.from_folder(tmp_path)
    for text in ["And God said", "  spaces\tand\nlines ", "ünïcödé ✓ 漢字", ""]:
        assert codec.decode(codec.encode(text)) == text
    assert len(codec.encode("abc")) == 3


@given(text=st.text(max_size=40))
def test_streamed_pieces_add_up_to_the_decoded_text(tmp_path_factory, text):
    folder = tmp_path_factory.getbasetemp() / "byte-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(exist_ok=True)
        byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    codec = TextCodec.from_folder(folder)
    decoder = IncrementalDecoder(codec)
    pieces = [decoder.push(token) for token in codec.encode(text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    # Multi-byte characters arrive whole: no piece carries a half character.
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text
