"""An API request made into a scheduler request (moepic/serve/requests.py, protocol.py): limits,
sampling, refusals, without a server."""

from __future__ import annotations

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.default_model import default_model_dir
from moepic.serve.chat import ChatTemplate
from moepic.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from moepic.serve.requests import ServedModel
from moepic.tokenizer import TextCodec

CODEC = TextCodec.from_folder(default_model_dir())
TEMPLATE = ChatTemplate("test", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}", {})


def served(context: int = 64, default_max_tokens: int = 2048, template: ChatTemplate | None = TEMPLATE) -> ServedModel:
    return ServedModel(name="kjv", codec=CODEC, template=template, context=context, vocab_size=4096,
                       default_max_tokens=default_max_tokens)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="kjv", messages=[{"role": "user", "content": "And God said"}], **fields)


@given(context=st.integers(8, 200), default=st.integers(1, 300))
def test_chat_without_a_limit_gets_the_context_left_within_the_server_default(context, default):
    prompt = len(CODEC.encode("And God said\n", add_special_tokens=False))
    request = served(context, default).chat(chat()).request
    assert request.max_new_tokens == min(context - prompt, default)
    assert len(request.prompt_ids) + request.max_new_tokens <= context


@given(max_tokens=st.integers(1, 100))
def test_a_limit_beyond_the_context_is_refused_naming_the_field_it_came_from(max_tokens):
    model, prompt = served(context=20), len(CODEC.encode("And God said\n", add_special_tokens=False))
    for body, field in ((chat(max_tokens=max_tokens), "max_tokens"), (chat(max_completion_tokens=max_tokens), "max_completion_tokens")):
        if prompt + max_tokens <= 20:
            assert model.chat(body).request.max_new_tokens == max_tokens
        else:
            with pytest.raises(ApiError) as refused:
                model.chat(body)
            assert (refused.value.status, refused.value.param, refused.value.code) == (400, field, "context_length_exceeded")


def test_temperature_0_is_greedy_and_a_missing_seed_is_drawn_afresh():
    model = served()
    greedy = model.completion(CompletionRequest(model="kjv", prompt="a", temperature=0)).request.sampling
    assert greedy.greedy
    seeded = model.completion(CompletionRequest(model="kjv", prompt="a", temperature=0.7, top_p=0.9, seed=11)).request.sampling
    assert (seeded.greedy, seeded.temperature, seeded.top_p, seeded.seed) == (False, 0.7, 0.9, 11)
    seeds = {model.completion(CompletionRequest(model="kjv", prompt="a")).request.sampling.seed for _ in range(5)}
    assert len(seeds) == 5  # 63 random bits each


def test_one_prompt_in_a_list_is_taken_and_several_are_refused():
    model = served()
    assert model.completion(CompletionRequest(model="kjv", prompt=["And God said"])).request.prompt_ids == tuple(CODEC.encode("And God said"))
    assert model.completion(CompletionRequest(model="kjv", prompt=[[5, 6]])).request.prompt_ids == (5, 6)
    with pytest.raises(pydantic.ValidationError, match="2 prompts in one request are not supported"):
        CompletionRequest(model="kjv", prompt=["a", "b"])


@pytest.mark.parametrize("field, value", [("n", 3), ("logprobs", True), ("presence_penalty", 0.5), ("tools", [{"type": "function"}]),
                                          ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 1.0})])
def test_fields_moepic_does_not_implement_are_refused_by_name_unless_neutral(field, value):
    with pytest.raises(pydantic.ValidationError, match=f"{field}=.* is not supported by moepic serve"):
        chat(**{field: value})
    neutral = ChatCompletionRequest.NEUTRAL[field]
    chat(**{field: neutral})  # the neutral value is what a client that did not ask for it sends


def test_chat_without_a_template_and_another_model_name_are_refused():
    with pytest.raises(ApiError) as refused:
        served(template=None).chat(chat())
    assert (refused.value.status, refused.value.code) == (400, "no_chat_template")
    with pytest.raises(ApiError) as refused:
        served().completion(CompletionRequest(model="gpt-4", prompt="a"))
    assert (refused.value.status, refused.value.code, refused.value.param) == (404, "model_not_found", "model")


def test_stop_takes_one_string_or_up_to_four():
    assert CompletionRequest(model="kjv", prompt="a", stop="\n").stops == ("\n",)
    assert CompletionRequest(model="kjv", prompt="a", stop=["x", "y"]).stops == ("x", "y")
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(model="kjv", prompt="a", stop=["1", "2", "3", "4", "5"])
