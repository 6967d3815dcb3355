"""A model's chat template: read from its folder, rendered in a sandbox. Side effects: reads files.

Where a template lives, in the order looked for: `chat_template.jinja` (what transformers writes
now), `tokenizer_config.json`'s `chat_template` (a string, or a list of named ones: "default"), or a
GGUF file's `tokenizer.chat_template`. It is Jinja, as Hugging Face renders it: blocks trimmed,
`loopcontrols`, `raise_exception(...)`, `strftime_now(...)`, and a `tojson` that keeps non-ASCII
text as it is. The template is untrusted text from a downloaded folder, so it runs in Jinja's
immutable sandbox: it can read what it is given, never call into Python beyond that.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

import attrs

from moepic.errors import CheckpointError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The template refused the messages (its `raise_exception`), or failed rendering them."""


@attrs.frozen
class ChatTemplate:
    source: str  # the file it came from, for messages
    text: str
    special_tokens: dict[str, str]  # bos_token, eos_token, … as the template's variables

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text for `messages`, ending where the assistant's reply begins."""
        import jinja2

        try:
            return _compiled(self.source, self.text).render(messages=list(messages), add_generation_prompt=True,
                                                            **self.special_tokens)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template ({self.source}) failed on these messages: {e}") from None


def read_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The template of a model folder (or GGUF file); None where it has none."""
    from moepic.checkpoint.gguf_names import is_gguf

    folder = Path(folder)
    if is_gguf(folder):
        return _gguf_template(folder)
    config_path = folder / TOKENIZER_CONFIG
    config = _json(config_path) if config_path.is_file() else {}
    special = {key: _token_text(config[key]) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
               if isinstance(config.get(key), (str, dict))}
    file = folder / TEMPLATE_FILE
    if file.is_file():
        return _checked(ChatTemplate(str(file), file.read_text(encoding="utf-8"), special))
    text = config.get("chat_template")
    if isinstance(text, list):  # named templates: the default one
        text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    if text is None:
        return None
    if not isinstance(text, str):
        raise CheckpointError(f"{config_path}: chat_template must be a string or a list of named templates")
    return _checked(ChatTemplate(f"{config_path} chat_template", text, special))


def _gguf_template(path: Path) -> ChatTemplate | None:
    from moepic.checkpoint.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        text = f.field("tokenizer.chat_template", str, None)
        if text is None:
            return None
        tokens = f.field("tokenizer.ggml.tokens", list, [])
        special = {}
        for name in ("bos", "eos"):
            index = f.field(f"tokenizer.ggml.{name}_token_id", int, None)
            if index is not None and 0 <= index < len(tokens):
                special[f"{name}_token"] = tokens[index]
    return _checked(ChatTemplate(f"{path} tokenizer.chat_template", text, special))


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(token: str | dict) -> str:
    return token if isinstance(token, str) else str(token.get("content", ""))


def _checked(template: ChatTemplate) -> ChatTemplate:
    """A template that does not even parse is the folder's fault: said when the model loads."""
    import jinja2

    try:
        _compiled(template.source, template.text)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"{template.source}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    return template


def _raise_exception(message: str):
    raise ChatTemplateError(str(message))


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


_CACHE: dict[tuple[str, str], object] = {}


def _compiled(source: str, text: str):
    """The compiled template (kept: a server renders it per request)."""
    key = (source, text)
    if key not in _CACHE:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        _CACHE[key] = env.from_string(text)
    return _CACHE[key]
