"""Text ↔ token ids through the model folder's tokenizer.json (Hugging Face `tokenizers`). Side effects: reads a file."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from moepic.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


class TextCodec:
    def __init__(self, tokenizer: Tokenizer, source: str):
        self._tokenizer = tokenizer
        self.source = source

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextCodec | None:
        """The folder's tokenizer, or None when it has no tokenizer.json."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            return None
        try:
            return cls(Tokenizer.from_file(str(path)), str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{path}: cannot read tokenizer ({str(e).splitlines()[0]})") from None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

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
