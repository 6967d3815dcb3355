"""The tokenizer a GGUF file carries in its metadata (`tokenizer.ggml.*`), built as a Hugging Face
`tokenizers.Tokenizer`, as the model's tokenizer.json would have been. Side effects: reads the file's header.

Two kinds, by `tokenizer.ggml.model`:
- `gpt2`, byte-level BPE (Qwen, Llama 3, GPT-OSS): the vocabulary is already spelled in the
  byte alphabet and the merges are listed; the text is split first by the regex
  `tokenizer.ggml.pre` names (the model's own, as llama.cpp splits it).
- `llama`, SentencePiece BPE (Mistral, Mixtral): `▁` stands for a space, unknown bytes fall back to
  `<0xNN>` tokens, and the merges, which the file does not list, follow from the vocabulary and its
  scores (every pair of tokens that joins into a token, best score first).

Tokens the file marks as control (`<|im_end|>`, `<s>`) become special tokens, user-defined ones
(`<think>`) added tokens, so neither is cut apart; a BOS is prepended where the file says so
(`tokenizer.ggml.add_bos_token`; SentencePiece files without the flag: yes, as llama.cpp does).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from moepic.checkpoint.gguf_file import GGUFFile
from moepic.errors import CheckpointError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_WHOLE_WORDS_FIRST = ("llama3", "llama-bpe", "llama-v3")
# tokenizer.ggml.pre → the regex text is split by before byte-level BPE (None: GPT-2's own).
SPLITS = {"default": None, "gpt-2": None, "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "llama3": _LLAMA3,
          "llama-bpe": _LLAMA3, "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3}


def gguf_tokenizer(path: Path) -> Tokenizer | None:
    """The file's tokenizer; None where it carries none."""
    with GGUFFile(path) as f:
        kind = f.field("tokenizer.ggml.model", str, None)
        if kind is None:
            return None
        tokens = f.field("tokenizer.ggml.tokens", list)
        types = f.field("tokenizer.ggml.token_type", list, [])
        if kind == "gpt2":
            tokenizer = _byte_level(f, tokens)
        elif kind == "llama":
            tokenizer = _sentencepiece(f, tokens)
        else:
            raise CheckpointError(f"{path}: tokenizer.ggml.model {kind!r} is not read; read: gpt2, llama (or pass --prompt-ids)")
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t, kind_ in zip(tokens, types) if kind_ == CONTROL])
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind_ in zip(tokens, types) if kind_ == USER_DEFINED])
        bos = f.field("tokenizer.ggml.bos_token_id", int, None)
        if f.field("tokenizer.ggml.add_bos_token", bool, kind == "llama") and bos is not None:
            tokenizer.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)])
        return tokenizer


def _byte_level(f: GGUFFile, tokens: list[str]) -> Tokenizer:
    pre = f.field("tokenizer.ggml.pre", str, "default")
    if pre not in SPLITS:
        raise CheckpointError(f"{f.path}: tokenizer.ggml.pre {pre!r} is not read; read: {', '.join(SPLITS)} (or pass --prompt-ids)")
    merges = [tuple(m.split(" ", 1)) for m in f.field("tokenizer.ggml.merges", list)]
    # Llama 3's vocabulary takes a whole word it holds before any merge, as llama.cpp does for it.
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in _WHOLE_WORDS_FIRST))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=SPLITS[pre] is None)
    tokenizer.pre_tokenizer = byte_level if SPLITS[pre] is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(f: GGUFFile, tokens: list[str]) -> Tokenizer:
    scores = f.field("tokenizer.ggml.scores", list)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = f.field("tokenizer.ggml.unknown_token_id", int, 0)
    tokenizer = Tokenizer(models.BPE(vocab, _merges(vocab, dict(zip(tokens, scores))), unk_token=tokens[unk],
                                     fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1)])
    return tokenizer


def _merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece's merges from its vocabulary: every split of a token into two tokens, best
    token score first (then the longer pieces), ties in vocabulary order."""
    found = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        found += [(score, left, right) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable: ties keep that order
    return [(left, right) for _, left, right in found]
