"""Text ↔ token ids through the model folder's tokenizer.json (Hugging Face `tokenizers`), or the
one a GGUF file carries (checkpoint/gguf_tokenizer.py). Side effects: reads a file."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from moepic.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


def no_tokenizer(folder: str | Path) -> str:
    """What is missing where `TextCodec.from_folder` found no tokenizer, for an error message."""
    from moepic.checkpoint.gguf_names import is_gguf

    return f"{folder} carries no tokenizer" if is_gguf(folder) else f"{folder} has no {TOKENIZER_FILE}"


class TextCodec:
    def __init__(self, tokenizer: Tokenizer, source: str):
        self._tokenizer = tokenizer
        self.source = source

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextCodec | None:
        """The folder's tokenizer (a GGUF file's own), or None when it has none."""
        from moepic.checkpoint.gguf_names import is_gguf

        if is_gguf(folder):
            from moepic.checkpoint.gguf_tokenizer import gguf_tokenizer

            tokenizer = gguf_tokenizer(Path(folder))
            return None if tokenizer is None else cls(tokenizer, str(folder))
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            return None
        try:
            return cls(Tokenizer.from_file(str(path)), str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{path}: cannot read tokenizer ({str(e).splitlines()[0]})") from None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens`: the tokenizer's own (a BOS); off for text that spells them itself,
        as a rendered chat template does."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDecoder:
    """Text for a growing list of token ids, handed out piece by piece for streaming.

    Decodes the whole list each time (tokenizers may merge pieces across tokens) and holds back
    text that ends in U+FFFD, a character whose UTF-8 bytes have not all arrived yet.
    """

    def __init__(self, codec: TextCodec):
        self._codec = codec
        self._ids: list[int] = []
        self._shown = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._codec.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._codec.decode(self._ids))

    def _take(self, text: str) -> str:
        piece, self._shown = text[self._shown :], len(text)
        return piece
