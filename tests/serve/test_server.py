"""`moepic serve` as a user meets it: its own process, the official `openai` client, offloading on at
a quarter of the experts' bytes. Every answer is checked against the request's solo run in this
process (all experts resident): batching and offloading change speed, never tokens."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

from serve_support import wait_for


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _health(server) -> dict:
    return httpx.get(f"{server.url}/health").json()


def _idle(server) -> bool:
    health = _health(server)
    return health["batch_size"] == 0 and health["queued"] == 0


def test_completions_whole_and_streamed_are_the_solo_run(client, reference):
    expected = reference.text("And God said", 24)
    whole = client.completions.create(model="kjv", prompt="And God said", max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(reference.codec.encode("And God said")), 24)
    chunks = list(client.completions.create(model="kjv", prompt="And God said", max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices


def test_a_prompt_given_as_token_ids_is_taken_as_is(client, reference):
    ids = reference.codec.encode("In the beginning")
    answer = client.completions.create(model="kjv", prompt=ids, max_tokens=8, temperature=0)
    assert answer.choices[0].text == reference.codec.decode(reference.tokens(ids, 8))


def test_a_stop_string_ends_the_text_before_it_streamed_or_not(client, reference):
    full = reference.text("And God said", 40)
    stop = " have"
    assert stop in full  # the test's premise: the greedy text says it
    for stream in (False, True):
        answer = client.completions.create(model="kjv", prompt="And God said", max_tokens=40, temperature=0, stop=[stop, "zzz"],
                                           stream=stream)
        chunks = list(answer) if stream else [answer]
        assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_completion_and_equals_the_solo_run_with_that_seed(client, reference):
    def sampled(seed):
        return client.completions.create(model="kjv", prompt="And the LORD", max_tokens=16, temperature=0.9, seed=seed).choices[0].text

    assert sampled(7) == sampled(7) == reference.text("And the LORD", 16, temperature=0.9, seed=7)
    assert sampled(8) == reference.text("And the LORD", 16, temperature=0.9, seed=8) != sampled(7)


def test_chat_whole_and_streamed_renders_the_template_and_continues_it(client, reference):
    messages = [{"role": "system", "content": "Speak as the scribes."}, {"role": "user", "content": "Who was Enoch?"}]
    expected = reference.chat(messages, 20)
    whole = client.chat.completions.create(model="kjv", messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="kjv", messages=messages, max_completion_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_requests_each_get_their_solo_tokens(client, reference, server):
    prompts = ["And God said", "In the beginning", "Blessed are", "And it came to pass", "The LORD is my", "Thou shalt"]
    lengths = [5, 17, 9, 24, 3, 12]  # six: the batch's four and the queue's two, none refused

    def ask(i):
        return client.completions.create(model="kjv", prompt=prompts[i], max_tokens=lengths[i], temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, range(len(prompts))))
    assert answers == [reference.text(p, n) for p, n in zip(prompts, lengths)]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "moepic_expert_hit_rate " in metrics and "moepic_exposed_copy_seconds_total " in metrics
    generated = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("moepic_generated_tokens_total")))
    assert generated >= sum(lengths)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["kjv"]
    assert _health(server)["status"] == "ok"
    assert httpx.get(f"{server.url}/v1/models/nope").status_code == 404


@pytest.mark.parametrize("body, status, says", [
    ("{\"model\": \"kjv\", \"prompt\": ", 400, "not valid JSON"),
    (json.dumps({"model": "kjv", "prompt": "a", "max_tokens": 5000}), 400, "maximum context length is 1024"),
    (json.dumps({"model": "kjv", "prompt": [5] * 1100}), 400, "the prompt has 1100"),
    (json.dumps({"model": "kjv", "prompt": [99999]}), 400, "outside the vocabulary"),
    (json.dumps({"model": "kjv", "prompt": "a", "n": 2}), 400, "n=2 is not supported"),
    (json.dumps({"model": "kjv", "prompt": "a", "temperature": -1}), 400, "temperature"),
    (json.dumps({"model": "kjv", "prompt": "a", "max_tokens": 4, "best_of": 3}), 400, "best_of=3"),
    (json.dumps({"model": "other", "prompt": "a"}), 404, "does not exist"),
    (json.dumps({"model": "kjv", "messages": []}), 400, "messages"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, client, reference, body, status, says):
    response = httpx.post(f"{server.url}/v1/{'chat/' if 'messages' in body else ''}completions", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert says in error["message"] and error["type"]
    answer = client.completions.create(model="kjv", prompt="And God said", max_tokens=4, temperature=0)
    assert answer.choices[0].text == reference.text("And God said", 4)


def test_the_client_library_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|maximum context length"):
        client.chat.completions.create(model="kjv", messages=[{"role": "user", "content": "a"}], max_tokens=2000)


def _open_stream(server, http: httpx.Client, max_tokens: int = 900) -> httpx.Response:
    request = http.build_request("POST", f"{server.url}/v1/completions",
                                 json={"model": "kjv", "prompt": "And God said", "max_tokens": max_tokens, "stream": True})
    response = http.send(request, stream=True)
    assert response.status_code == 200
    return response


def test_a_client_that_leaves_mid_stream_frees_its_place_and_the_others_go_on(server, client, reference):
    with httpx.Client(timeout=60) as http:
        response = _open_stream(server, http)
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it is generating
        assert _health(server)["batch_size"] == 1
        response.close()
    wait_for(lambda: _idle(server), what="the request leaving the batch after its client left")
    assert _cancelled(server) >= 1
    answer = client.completions.create(model="kjv", prompt="And God said", max_tokens=6, temperature=0)
    assert answer.choices[0].text == reference.text("And God said", 6)


def test_a_full_queue_answers_429_and_the_server_serves_again_once_it_drains(server, client, reference):
    with httpx.Client(timeout=60) as http:
        streams = [_open_stream(server, http) for _ in range(4)]
        wait_for(lambda: _health(server)["batch_size"] == 4, what="four requests in the batch")
        streams += [_open_stream(server, http) for _ in range(2)]  # their status line comes once they are queued
        wait_for(lambda: _health(server)["queued"] == 2, what="two requests waiting")
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="kjv", prompt="And God said", max_tokens=4)
        assert refused.value.status_code == 429 and refused.value.body["code"] == "queue_full"
        for stream in streams:
            stream.close()
    wait_for(lambda: _idle(server), what="the batch and the queue emptying after their clients left")
    answer = client.completions.create(model="kjv", prompt="And God said", max_tokens=5, temperature=0)
    assert answer.choices[0].text == reference.text("And God said", 5)


def _cancelled(server) -> float:
    """Requests cancelled so far (their clients left), as /metrics counts them."""
    prefix = 'moepic_requests_total{endpoint="completions",outcome="cancelled"}'
    return sum(float(line.split()[-1]) for line in httpx.get(f"{server.url}/metrics").text.splitlines() if line.startswith(prefix))


def test_a_client_that_leaves_while_waiting_for_a_whole_answer_frees_its_place(server):
    before = _cancelled(server)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: its connection closes
        httpx.post(f"{server.url}/v1/completions", json={"model": "kjv", "prompt": "And God said", "max_tokens": 900},
                   timeout=httpx.Timeout(60, read=0.5))
    wait_for(lambda: _cancelled(server) == before + 1, what="the request being cancelled after its client left")
    wait_for(lambda: _idle(server), what="the request leaving the batch")
