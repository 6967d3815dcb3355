"""Several requests generated together (moepic/runtime/batch_generation.py, core/model.py
`decode_step`): whatever the mix of prompt lengths and token limits, every request's tokens and
logits are what `generate` gives it alone, bit for bit — across the families' attention kinds
(sinks and windows, latent attention, chunked), shared experts and dense layers, in float32 and
bfloat16, with seeded sampling, with EOS, and through the offloading engine at a small budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.checkpoint.load import load_model
from moepic.config import SamplingConfig
from moepic.core.model import KVCache, decode_step
from moepic.policies import POLICIES
from moepic.runtime.scheduler import QueueFull, Request, Scheduler, generate_batch
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts

MODELS = ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "olmoe", "llama4_text", "phimoe")  # phimoe: its LongRoPE rebuild


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    cache = {}

    def get(name: str, dtype: torch.dtype = torch.float32, offload: bool = False):
        if (name, dtype, offload) not in cache:
            cache[name, dtype, offload] = load_model(checkpoint_dir(name), dtype=dtype, offload_experts=offload)
        return cache[name, dtype, offload]

    return get


def assert_as_alone(model, requests, results, experts_alone=None, prefill_chunk=None) -> None:
    for request, got in zip(requests, results, strict=True):
        alone = generate(model, request.prompt_ids, max_new_tokens=request.max_new_tokens, sampling=request.sampling,
                         eos_ids=request.eos_ids, keep_logits=True, experts=experts_alone, prefill_chunk=prefill_chunk)
        assert got.token_ids == alone.token_ids
        assert got.stopped_on_eos == alone.stopped_on_eos
        assert all(torch.equal(a, b) for a, b in zip(got.logits, alone.logits, strict=True))


requests_ = st.lists(
    st.builds(lambda prompt, n: Request(prompt_ids=prompt, max_new_tokens=n, eos_ids=()),
              st.lists(st.integers(1, 90), min_size=1, max_size=12), st.integers(1, 6)),
    min_size=1, max_size=5,
)


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(MODELS), dtype=st.sampled_from([torch.float32, torch.bfloat16]), requests=requests_)
def test_every_request_gets_what_it_would_alone_bit_for_bit(models, name, dtype, requests):
    model = models(name, dtype)
    assert_as_alone(model, requests, generate_batch(model, requests, keep_logits=True))


def test_seeded_sampling_and_eos_are_each_requests_own(models):
    model = models("mixtral")
    first = generate(model, [3, 1, 4], max_new_tokens=8, eos_ids=()).token_ids
    requests = [
        Request(prompt_ids=[3, 1, 4], max_new_tokens=8, eos_ids=(first[2],)),  # stops at its third token
        Request(prompt_ids=[2, 7], max_new_tokens=8, sampling=SamplingConfig(greedy=False, temperature=0.9, seed=11), eos_ids=()),
        Request(prompt_ids=[2, 7], max_new_tokens=8, sampling=SamplingConfig(greedy=False, temperature=0.9, seed=12), eos_ids=()),
    ]
    results = generate_batch(model, requests, keep_logits=True)
    assert len(results[0].token_ids) == 3 and results[0].stopped_on_eos
    assert results[1].token_ids != results[2].token_ids  # two seeds, two samples
    assert_as_alone(model, requests, results)


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_batched_decode_through_the_offloading_engine_changes_no_bit(models, theta):
    """The engine sees each step's batch as one layer step over the union of its experts."""
    model = models("mixtral", offload=True)
    requests = [Request(prompt_ids=p, max_new_tokens=n, eos_ids=()) for p, n in (([1, 2, 3], 6), ([9], 4), ([5, 6, 7, 8, 9], 5))]
    engine = offloaded_experts(model, 0.2, theta, POLICIES["lru"].config())
    results = generate_batch(model, requests, experts=engine, keep_logits=True)
    assert engine.report()["bytes_loaded"] > 0
    assert_as_alone(models("mixtral"), requests, results)


@pytest.mark.parametrize("share", [0.2, 1.0])  # 1.0: every layer fully resident, counted without the planner
def test_the_engine_counts_a_batched_step_as_decode_and_the_prompts_as_prefill(models, share):
    model = models("mixtral", offload=True)
    # Prompts of two tokens and more: a one-token prompt's prefill is a one-token step, counted as decode.
    requests = [Request(prompt_ids=p, max_new_tokens=n, eos_ids=()) for p, n in (([1, 2, 3], 6), ([9, 4], 4), ([5, 6, 7, 8, 9], 5))]
    engine = offloaded_experts(model, share, 0.5, POLICIES["lru"].config())
    results = generate_batch(model, requests, experts=engine)
    decode_tokens = sum(len(r.token_ids) - 1 for r in results)
    assert {s.tokens for s in engine.decode_stats.values()} == {decode_tokens}
    assert {s.tokens for s in engine.prefill_stats.values()} == {sum(len(r.prompt_ids) for r in requests)}


def test_a_decode_step_needs_one_cache_per_token_and_room_in_each(models):
    model = models("mixtral")
    caches = [KVCache.allocate(model, 1), KVCache.allocate(model, 4)]
    with pytest.raises(ValueError, match="2 tokens for 1 sequences' caches"):
        decode_step(model, torch.tensor([1, 2]), caches[:1])
    _, caches = decode_step(model, torch.tensor([1, 2]), caches)
    assert [c.length for c in caches] == [1, 1]
    with pytest.raises(ValueError, match="sequence 0's KV cache holds 1 positions, all used"):
        decode_step(model, torch.tensor([1, 2]), caches)


@pytest.mark.parametrize("bad,message", [({"prompt_ids": []}, "the prompt is empty"),
                                          ({"max_new_tokens": 0}, "max_new_tokens must be >= 1")])
def test_a_bad_request_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Request(**({"prompt_ids": [1], "max_new_tokens": 2} | bad))


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(("mixtral", "gpt_oss", "qwen2_moe")), requests=requests_,
       arrivals=st.lists(st.integers(0, 6), min_size=5, max_size=5), max_batch=st.integers(1, 3))
def test_requests_arriving_at_any_step_into_a_bounded_batch_get_what_they_would_alone(models, name, requests, arrivals, max_batch):
    """Continuous batching: request i is submitted before step arrivals[i]; at most `max_batch` run."""
    model = models(name)
    scheduler = Scheduler(model, max_batch=max_batch, keep_logits=True)
    ids, step, events = {}, 0, []
    while len(ids) < len(requests) or not scheduler.idle:
        for i, request in enumerate(requests):
            if i not in ids and arrivals[i] <= step:
                ids[i] = scheduler.submit(request)
        assert scheduler.batch_size <= max_batch
        events += scheduler.step()
        step += 1
    results = [scheduler.result(ids[i]) for i in range(len(requests))]
    assert_as_alone(model, requests, results)
    for i, result in enumerate(results):  # the events stream each request's tokens, in order, its end last
        mine = [e for e in events if e.request_id == ids[i]]
        assert [e.token for e in mine] == result.token_ids
        assert [e.finished for e in mine] == [None] * (len(mine) - 1) + ["length"]


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(("mixtral", "gpt_oss", "deepseek_v3")), requests=requests_, chunk=st.integers(1, 5),
       max_batch=st.integers(1, 3))
def test_chunked_prefill_gives_what_generate_gives_with_the_same_chunks(models, name, requests, chunk, max_batch):
    model = models(name)
    scheduler = Scheduler(model, max_batch=max_batch, keep_logits=True, prefill_chunk=chunk)
    ids = [scheduler.submit(r) for r in requests]
    while not scheduler.idle:
        scheduler.step()
    assert_as_alone(model, requests, [scheduler.result(i) for i in ids], prefill_chunk=chunk)


def test_a_long_prompt_prefills_over_several_steps_while_the_batch_keeps_decoding(models):
    model = models("mixtral")
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=3)
    running = scheduler.submit(Request(prompt_ids=[1, 2], max_new_tokens=8, eos_ids=()))
    scheduler.step()  # its prompt fits one piece: its first token
    long = scheduler.submit(Request(prompt_ids=list(range(1, 12)), max_new_tokens=2, eos_ids=()))
    steps = [scheduler.step() for _ in range(4)]  # 11 prompt tokens in pieces of 3: the 4th step gives its first token
    assert [[e.request_id for e in events] for events in steps] == [[running], [running], [running], [long, running]]


def test_a_prefill_chunk_must_be_positive_and_a_longrope_model_prefills_whole(models):
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1, got 0"):
        Scheduler(models("mixtral"), prefill_chunk=0)
    with pytest.raises(ValueError, match="LongRoPE.*prefill its prompts whole"):
        generate(models("phimoe"), [1, 2, 3], max_new_tokens=2, prefill_chunk=2)


def test_a_cancelled_request_leaves_and_the_others_go_on(models):
    model = models("mixtral")
    scheduler = Scheduler(model, max_batch=2, keep_logits=True)
    requests = [Request(prompt_ids=[1, 2], max_new_tokens=6, eos_ids=()), Request(prompt_ids=[3], max_new_tokens=6, eos_ids=()),
                Request(prompt_ids=[4, 5, 6], max_new_tokens=3, eos_ids=())]
    first, second, waiting = (scheduler.submit(r) for r in requests)
    scheduler.step()
    scheduler.cancel(first)  # running: its cache is dropped, the waiting one takes its place
    assert scheduler.batch_size == 1 and scheduler.queued == 1
    events = []
    while not scheduler.idle:
        events += scheduler.step()
    assert first not in {e.request_id for e in events} and scheduler.result(first) is None
    assert_as_alone(model, requests[1:], [scheduler.result(second), scheduler.result(waiting)])


def test_a_full_queue_refuses_a_request_by_name_counting_only_what_waits_beyond_the_batch(models):
    scheduler = Scheduler(models("mixtral"), max_batch=2, max_queue=1)
    for _ in range(3):  # two the next step admits, one waiting beyond them
        scheduler.submit(Request(prompt_ids=[1], max_new_tokens=2))
    with pytest.raises(QueueFull, match="1 requests are waiting already beyond the batch"):
        scheduler.submit(Request(prompt_ids=[1], max_new_tokens=2))
    events = scheduler.step()  # two admitted: their first tokens; the third still waits
    assert [e.request_id for e in events] == [0, 1] and scheduler.queued == 1 and scheduler.batch_size == 2
    with pytest.raises(QueueFull):
        scheduler.submit(Request(prompt_ids=[1], max_new_tokens=2))
    scheduler.step()  # both finish (two tokens each): room for the waiting one and one more
    assert scheduler.batch_size == 0 and scheduler.submit(Request(prompt_ids=[1], max_new_tokens=2)) == 3


def test_a_scheduler_needs_room_for_one():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Scheduler(None, max_batch=0)
