"""Routing traces: record while generating, save/load round trip, the shared Mixtral JSONL traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given

from moepic.checkpoint.load import load_model
from moepic.cli import main
from moepic.core.routing import route
from moepic.runtime.generation import generate
from moepic.tracing import RoutingTrace, load_trace, save_trace
from moepic.tracing.jsonl import load_jsonl_trace
from moepic.tracing.recorder import RoutingRecorder
from moepic.tracing.trace import TraceError
from tests_support import cli_error, traces

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"
PROMPT = [1, 17, 5, 42, 8]


def assert_same_trace(a: RoutingTrace, b: RoutingTrace) -> None:
    assert a.header() == b.header()
    for field in ("expert_ids_NLK", "weights_NLK", "sequence_N", "position_N", "prefill_N"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert (a.hidden_NLD is None) == (b.hidden_NLD is None)
    if a.hidden_NLD is not None:
        np.testing.assert_array_equal(a.hidden_NLD, b.hidden_NLD)


@given(trace=traces())
def test_save_then_load_gives_back_the_same_trace(tmp_path_factory, trace):
    path = tmp_path_factory.mktemp("trace") / "t.npz"
    save_trace(trace, path)
    assert_same_trace(load_trace(path), trace)


@pytest.fixture(scope="module")
def qwen2(checkpoint_dir):
    return load_model(checkpoint_dir("qwen2_moe"), dtype=torch.float32)


def test_recorded_routing_is_what_the_router_computes_on_the_recorded_inputs(qwen2):
    recorder = RoutingRecorder(qwen2.spec, model_name="qwen2", record_hidden=True)
    plain = generate(qwen2, PROMPT, max_new_tokens=6, eos_ids=())
    traced = generate(qwen2, PROMPT, max_new_tokens=6, eos_ids=(), tap=recorder)
    assert traced.token_ids == plain.token_ids  # observing changes nothing
    trace = recorder.trace()
    N = len(PROMPT) + 6 - 1  # the last new token is never fed back
    assert trace.num_tokens == N and trace.moe_layers == qwen2.spec.moe_layers
    np.testing.assert_array_equal(trace.position_N, np.arange(N))
    np.testing.assert_array_equal(trace.prefill_N, np.arange(N) < len(PROMPT))
    for column, layer in enumerate(trace.moe_layers):
        router = qwen2.weights.layers[layer].ffn.router_ED
        weights, ids = route(torch.from_numpy(trace.hidden_NLD[:, column]), router, qwen2.spec.moe)
        np.testing.assert_array_equal(trace.expert_ids_NLK[:, column], ids.numpy())
        np.testing.assert_allclose(trace.weights_NLK[:, column], weights.numpy(), rtol=1e-6)


def test_several_sequences_in_one_recording_are_numbered(qwen2):
    recorder = RoutingRecorder(qwen2.spec)
    generate(qwen2, PROMPT, max_new_tokens=3, eos_ids=(), tap=recorder)
    recorder.begin_sequence()
    generate(qwen2, PROMPT[:2], max_new_tokens=2, eos_ids=(), tap=recorder)
    trace = recorder.trace()
    np.testing.assert_array_equal(trace.sequence_N, [0] * 7 + [1] * 3)
    np.testing.assert_array_equal(trace.position_N, [*range(7), *range(3)])
    assert trace.hidden_NLD is None


def test_cli_records_a_trace_file(checkpoint_dir, tmp_path, capsys):
    path = tmp_path / "run.npz"
    argv = ["generate", "--model", str(checkpoint_dir("mixtral")), "--prompt-ids", "1,2,3", "--greedy"]
    assert main([*argv, "--max-new-tokens", "4", "--record-trace", str(path), "--json"]) == 0
    trace = load_trace(path)
    assert trace.num_tokens == 3 + 4 - 1 and trace.hidden_NLD is None
    assert cli_error(capsys, [*argv, "--record-trace", str(tmp_path / "no" / "t.npz")]).endswith(
        f"cannot write the trace (folder {tmp_path / 'no'} does not exist)"
    )


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared routing traces not found at {SHARED}")
@pytest.mark.parametrize("name,tokens", [("humaneval_2_routing.jsonl", 333), ("gsm8k_2_routing.jsonl", 244)])
def test_shared_mixtral_jsonl_traces_load_complete_tokens(name, tokens, tmp_path):
    trace = load_jsonl_trace(SHARED / name, model="Mixtral-8x7B-Instruct")
    assert trace.num_tokens == tokens  # the count the traces' README gives
    assert trace.moe_layers == tuple(range(32)) and trace.num_experts == 8 and trace.top_k == 2
    np.testing.assert_allclose(trace.weights_NLK.sum(-1), 1.0, atol=1e-4)  # renormalised top-2
    assert (trace.expert_ids_NLK[..., 0] != trace.expert_ids_NLK[..., 1]).all()
    save_trace(trace, tmp_path / "t.npz")
    assert_same_trace(load_trace(tmp_path / "t.npz"), trace)


GOOD = {"dataset": "d", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 0], "gating_probs": [0.6, 0.4]}


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "experts"}), "missing field 'experts'"),
        (json.dumps(GOOD | {"layer": "0"}), "field 'layer' should be int"),
        (json.dumps(GOOD | {"experts": [1, -2]}), r"expert ids in \[0, 32768\), got \[1, -2\]"),
        (json.dumps(GOOD | {"gating_probs": [1.0]}), "'gating_probs' has 1 values for 2 experts"),
        (json.dumps(GOOD | {"token_idx": 1, "experts": [1, 2, 3], "gating_probs": [0.3, 0.3, 0.4]}), "3 experts, but earlier lines have 2"),
    ],
)
def test_malformed_jsonl_names_the_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(TraceError, match=message) as err:
        load_jsonl_trace(path)
    assert str(err.value).startswith(f"{path}:2: ")


def test_malformed_npz_trace_names_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(TraceError, match=f"{bad}: not a moepic trace"):
        load_trace(bad)
    np.savez(bad.open("wb"), header=np.array(json.dumps({"format": "other", "version": 1})), expert_ids=np.zeros(1))
    with pytest.raises(TraceError, match="missing field 'weights'"):
        load_trace(bad)
    with pytest.raises(TraceError, match="trace file not found"):
        load_trace(tmp_path / "absent.npz")


def test_npz_with_a_foreign_header_or_misshaped_field_is_named(tmp_path, qwen2):
    recorder = RoutingRecorder(qwen2.spec)
    generate(qwen2, PROMPT, max_new_tokens=2, eos_ids=(), tap=recorder)
    good = recorder.trace()
    path = tmp_path / "t.npz"
    save_trace(good, path)
    arrays = dict(np.load(path, allow_pickle=False))
    for change, message in [
        ({"header": np.array(json.dumps(good.header() | {"format": "other"}))}, "does not declare format"),
        ({"weights": arrays["weights"][:, :, :1]}, "'weights' has shape"),
        ({"header": np.array("{oops")}, "'header' is not valid JSON"),
    ]:
        np.savez(path.open("wb"), **(arrays | change))
        with pytest.raises(TraceError, match=message) as err:
            load_trace(path)
        assert str(err.value).startswith(f"{path}: ")
