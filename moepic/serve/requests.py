"""An API request made into what the scheduler runs: the prompt's token ids (text encoded, or a chat
rendered through the model's template), the token limit within the model's context, the sampling.
Pure apart from drawing a seed where the client gave none. Every refusal is an ApiError naming
the field, as OpenAI's servers answer it.
"""

from __future__ import annotations

import secrets

import attrs

from moepic.config import SamplingConfig, ServeConfig
from moepic.runtime.scheduler import Request
from moepic.serve.chat import ChatTemplate, ChatTemplateError
from moepic.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from moepic.tokenizer import TextCodec


@attrs.frozen
class Prepared:
    request: Request
    stops: tuple[str, ...]


@attrs.frozen
class ServedModel:
    """What a request is checked against: the name clients use, the tokenizer, the chat template,
    the context and the vocabulary."""

    name: str
    codec: TextCodec
    template: ChatTemplate | None
    context: int  # max_position_embeddings: prompt + completion must fit
    vocab_size: int
    # A chat request's limit when it sets none (and the context allows): serve.default_max_tokens.
    default_max_tokens: int = attrs.fields(ServeConfig).default_max_tokens.default

    def completion(self, body: CompletionRequest) -> Prepared:
        self._check_name(body.model)
        if isinstance(body.prompt, str):
            ids = self.codec.encode(body.prompt)
        else:
            bad = [i for i in body.prompt if not 0 <= i < self.vocab_size]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param="prompt")
            ids = list(body.prompt)
        return self._prepared(body, ids, body.max_tokens, "prompt", "max_tokens")

    def chat(self, body: ChatCompletionRequest) -> Prepared:
        self._check_name(body.model)
        if self.template is None:
            raise ApiError(400, f"the model {self.name!r} has no chat template (its folder has no chat_template.jinja, "
                           "no chat_template in tokenizer_config.json, no tokenizer.chat_template in its GGUF file): "
                           "use /v1/completions with a prompt", param="messages", code="no_chat_template")
        try:
            text = self.template.render([m.as_template_input() for m in body.messages])
        except ChatTemplateError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        ids = self.codec.encode(text, add_special_tokens=False)  # the template spells its special tokens
        limit_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return self._prepared(body, ids, body.token_limit, "messages", limit_field)

    def _check_name(self, model: str) -> None:
        if model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r}", param="model",
                           code="model_not_found")

    def _prepared(self, body, ids: list[int], max_tokens: int | None, prompt_field: str, limit_field: str) -> Prepared:
        if not ids:
            raise ApiError(400, f"{prompt_field}: the prompt is empty", param=prompt_field)
        if len(ids) >= self.context:
            raise ApiError(400, f"this model's maximum context length is {self.context} tokens; the prompt has "
                           f"{len(ids)}, leaving none for the completion", param=prompt_field, code="context_length_exceeded")
        if max_tokens is None:  # chat's default: what the context has left, within the server's default
            max_tokens = min(self.context - len(ids), self.default_max_tokens)
        if len(ids) + max_tokens > self.context:
            raise ApiError(400, f"this model's maximum context length is {self.context} tokens; you asked for "
                           f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the completion)",
                           param=limit_field, code="context_length_exceeded")
        request = Request(prompt_ids=ids, max_new_tokens=max_tokens, sampling=sampling(body))
        return Prepared(request, body.stops)


def sampling(body) -> SamplingConfig:
    """OpenAI's knobs as moepic's: temperature 0 is greedy; defaults 1 and 1 (the full distribution);
    no seed: a fresh one, so that two such requests differ, as they do on OpenAI's servers."""
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if temperature == 0:
        return SamplingConfig(greedy=True, seed=seed)
    return SamplingConfig(greedy=False, temperature=temperature, top_p=top_p, seed=seed)
