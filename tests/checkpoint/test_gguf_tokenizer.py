"""The tokenizer a GGUF file carries: a byte-level vocabulary written into a file encodes exactly as
its tokenizer.json does, under GPT-2's split or Qwen2's; a SentencePiece one (no merges in the
file) as transformers' own reading of the file does; control tokens stay whole, a BOS is added where
the file says so, and `generate --prompt` runs on a GGUF file."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gguf_writing import tokenizer_gguf, write_gguf
from moepic.checkpoint.gguf_tokenizer import gguf_tokenizer
from moepic.datasets import dataset_path
from moepic.default_model import default_model_dir
from moepic.errors import CheckpointError

TRICKY = ["And God said, Let there be light: and there was light.", "  leading spaces\tand tabs\n\nnew lines",
          "numbers 1234567 and 3.14159", "unicode: naïve café — 東京 🙂", "<s>special</s> inside text", "it's they're I'll",
          "trailing space "]


@pytest.fixture(scope="module")
def bundled() -> Tokenizer:
    return Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))


def dataset_text(name: str) -> str:
    return dataset_path(name).read_text(encoding="utf-8")


def samples() -> list[str]:
    text = dataset_text("kjv-heldout")
    return TRICKY + [text[i : i + 300] for i in range(0, 6000, 600)]


def reference(path):
    """transformers' own reading of the file's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_a_byte_level_vocabulary_encodes_as_its_tokenizer_json_does(bundled, tmp_path):
    path = tokenizer_gguf(tmp_path / "bpe.gguf", bundled, kind="gpt2", pre="gpt-2")
    ours = gguf_tokenizer(path)
    for text in samples():
        ids = ours.encode(text).ids
        assert ids == bundled.encode(text).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == bundled.decode(ids, skip_special_tokens=False)
    assert ours.encode("<s>x</s>").ids[0] == bundled.token_to_id("<s>")  # a control token stays whole


def test_qwen2s_split_encodes_as_transformers_reads_the_file(bundled, tmp_path):
    path = tokenizer_gguf(tmp_path / "qwen2.gguf", bundled, kind="gpt2", pre="qwen2")
    ours, theirs = gguf_tokenizer(path), reference(path)
    for text in samples():
        assert ours.encode(text).ids == theirs.encode(text, add_special_tokens=False), text


def test_a_sentencepiece_vocabulary_encodes_as_transformers_reads_the_file(tmp_path):
    """A small SentencePiece-style BPE trained here (▁ for spaces, byte fallback), written as
    llama.cpp writes one: tokens and scores, no merges, so both sides rebuild the merges."""
    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False)
    spm.train_from_iterator([dataset_text("kjv-heldout")[:200_000]], trainer)
    path = tokenizer_gguf(tmp_path / "spm.gguf", spm, kind="llama")
    ours, theirs = gguf_tokenizer(path), reference(path)
    for text in samples():
        expected = theirs.encode(text)  # with the BOS both add (llama.cpp's default for SentencePiece)
        assert ours.encode(text).ids == expected, text
        assert expected[0] == spm.token_to_id("<s>")
        assert ours.decode(expected, skip_special_tokens=True) == theirs.decode(expected, skip_special_tokens=True)


def test_the_bundled_model_as_a_gguf_file_generates_from_a_prompt_exactly_as_its_folder_does(capsys, bundled, tmp_path):
    """Its weights (bf16, written as float32: exact) and its tokenizer in one file, as llama.cpp's
    converter would write them: the same prompt ids, the same tokens, the same text."""
    from moepic.cli import main

    path = write_gguf(default_model_dir(), tmp_path / "kjv.gguf", tokenizer={"tokenizer": bundled, "kind": "gpt2", "pre": "gpt-2"})
    runs = []
    for model in (path, default_model_dir()):
        assert main(["generate", "--model", str(model), "--prompt", "And God said", "--max-new-tokens", "6", "--dtype", "float32",
                     "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["prompt_ids"] == runs[1]["prompt_ids"] == bundled.encode("And God said").ids
    assert runs[0]["token_ids"] == runs[1]["token_ids"] and runs[0]["text"] == runs[1]["text"]


def test_a_gguf_file_without_a_tokenizer_asks_for_prompt_ids(capsys, checkpoint_dir, tmp_path):
    from tests_support import cli_error

    path = write_gguf(checkpoint_dir("qwen3_moe"), tmp_path / "bare.gguf")
    assert cli_error(capsys, ["generate", "--model", str(path), "--prompt", "hi"]) == (
        f"{path} carries no tokenizer: give the prompt as --prompt-ids 1,2,3")


def test_an_unread_tokenizer_kind_or_split_is_named(bundled, tmp_path):
    path = tokenizer_gguf(tmp_path / "odd.gguf", bundled, kind="gpt2", pre="chatglm-bpe")
    with pytest.raises(CheckpointError, match="tokenizer.ggml.pre 'chatglm-bpe' is not read; read: default, gpt-2, qwen2"):
        gguf_tokenizer(path)
