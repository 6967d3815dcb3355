"""The bundled default model: a real HF folder, HF-identical logits, a round-tripping tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.checkpoint.load import load_model
from moepic.core.model import KVCache, forward
from moepic.default_model import default_model_dir
from moepic.runtime.generation import generate
from moepic.tokenizer import IncrementalDecoder, TextCodec

FOLDER = default_model_dir()
CODEC = TextCodec.from_folder(FOLDER)


def test_bundled_folder_is_a_small_complete_hf_checkpoint():
    names = {p.name for p in FOLDER.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "training.json"} <= names
    assert sum(p.stat().st_size for p in FOLDER.iterdir()) <= 30 * 2**20
    spec = load_model(FOLDER).spec
    assert spec.model_type == "mixtral" and spec.num_layers >= 6
    assert spec.moe.num_experts >= 16 and spec.moe.top_k == 2
    training = json.loads((FOLDER / "training.json").read_text())
    assert training["shape"]["experts"] == spec.moe.num_experts and training["validation_loss_bf16"] > 0


def test_bundled_model_logits_equal_transformers(tmp_path):
    import transformers

    tokens = torch.tensor(CODEC.encode("And God said, Let there be light: and there was light."))
    ours = load_model(FOLDER, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    with torch.inference_mode():
        ours_TV, _ = forward(ours, tokens, KVCache.allocate(ours, len(tokens)))
        ref_TV = hf(tokens[None]).logits[0]
    torch.testing.assert_close(ours_TV, ref_TV, atol=1e-4, rtol=0)


def test_bundled_model_writes_bible_like_words():
    result = generate(load_model(FOLDER), CODEC.encode("And God said"), max_new_tokens=30)
    words = CODEC.decode(result.token_ids).lower().split()
    assert len(words) >= 5
    assert {"the", "and", "of", "unto", "lord", "god", "he", "that", "thou", "them"} & set(words)


@given(text=st.text(max_size=60))
def test_bundled_tokenizer_round_trips_text(text):
    assert CODEC.decode(CODEC.encode(text)) == text


@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_streamed_pieces_add_up_to_the_decoded_text(text):
    decoder = IncrementalDecoder(CODEC)
    pieces = [decoder.push(token) for token in CODEC.encode(text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == CODEC.decode(CODEC.encode(text))
    # Multi-byte characters arrive whole: no piece carries a half character.
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


@pytest.mark.parametrize("text", ["In the beginning", "  spaces\tand\nlines ", "ünïcödé ✓ 漢字"])
def test_bundled_tokenizer_round_trips_examples(text):
    assert CODEC.decode(CODEC.encode(text)) == text
