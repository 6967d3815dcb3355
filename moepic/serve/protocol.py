"""The OpenAI API's bodies: requests as pydantic models (FastAPI validates them), responses and
stream chunks as plain dicts, and errors in OpenAI's shape. Pure.

A field the API defines but moepic does not implement (n > 1, logprobs, penalties, tools, …) is
refused with a 400 naming it when set to anything but its neutral value, never ignored: a client
that asked for it would otherwise get something else without knowing. Unknown fields are refused
too (a typo in a parameter name is a mistake to name, not to drop).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moepic.ranges import SEED


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


# Knobs both endpoints share; a value outside its range is a 400 naming the field.
Temperature = Annotated[float, Field(ge=0, le=100)]  # 0: greedy, as OpenAI's servers treat it
TopP = Annotated[float, Field(gt=0, le=1)]
Seed = Annotated[int, Field(ge=SEED.low, le=SEED.high)]
MaxTokens = Annotated[int, Field(ge=1)]


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the operator's logs: changes nothing
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    # Fields set to these values mean "not asked for"; anything else is refused (see the docstring).
    NEUTRAL: ClassVar[dict[str, object]] = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None}

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        for field, neutral in self.NEUTRAL.items():
            value = getattr(self, field)
            if value != neutral and not (neutral is None and value in ({}, [], False)):
                raise ValueError(f"{field}={value!r} is not supported by moepic serve (leave it out)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common):
    # A text, or token ids; a list of several prompts is a batch the API allows and moepic refuses.
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: MaxTokens | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    NEUTRAL: ClassVar[dict[str, object]] = _Common.NEUTRAL | {"echo": False, "suffix": None, "logprobs": None, "best_of": None}

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise ValueError(f"prompt: {len(self.prompt)} prompts in one request are not supported; send one per request")
            self.prompt = self.prompt[0]
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Templates may read more of a message than role and content (name, …): kept as given.
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):  # text parts joined: the only kind of part a text model reads
            content = "".join(part.text for part in content)
        return self.model_dump(exclude_none=True) | {"content": content if content is not None else ""}


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    NEUTRAL: ClassVar[dict[str, object]] = _Common.NEUTRAL | {"logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": None,
                                   "response_format": None}

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """One response's identity (id, created, model) and its bodies, whole or streamed."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = _id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish_reason: str, counts: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice]) | {"usage": counts}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice]) | {"usage": counts}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        """A streamed piece; a chat stream's first chunk carries the role, its last the finish reason."""
        if self.chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                             "finish_reason": finish_reason}])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                                   "finish_reason": finish_reason}])

    def usage_chunk(self, counts: dict) -> dict:
        """`stream_options.include_usage`: a last chunk with no choices and the request's counts."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(kind, []) | {"usage": counts}


def finish_reason(ended: str) -> str:
    """OpenAI's finish reason for how a request ended: an EOS token or a stop string is "stop"."""
    return "length" if ended == "length" else "stop"
