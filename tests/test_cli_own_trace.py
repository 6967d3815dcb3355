"""`moepic generate` with belady or the oracle: the trace they read must be the run's own.

A trace of this very run (recorded with --record-trace) gives the dense tokens; one of another
prompt, or one that ends before the run does, is one line naming what differs."""

from __future__ import annotations

import json

import pytest

from moepic.cli import main
from tests_support import cli_error

PROMPT = ["--prompt-ids", "1,2,3,4,5,6"]
RUN = ["generate", "--json", "--greedy", "--max-new-tokens", "8"]
FUTURE = {
    "belady": ["--policy", "belady", "cache.policy.trace={trace}"],
    "oracle": ["--predictor", "oracle", "cache.predictor.trace={trace}"],
    "noisy_oracle": ["--predictor", "noisy_oracle", "cache.predictor.trace={trace}"],
}


@pytest.fixture(scope="module")
def recorded(checkpoint_dir, tmp_path_factory):
    """(model folder, the dense run's report, its trace file)."""
    model = str(checkpoint_dir("mixtral"))
    trace = tmp_path_factory.mktemp("own-trace") / "run.npz"
    assert main([*RUN, *PROMPT, "--model", model, "--record-trace", str(trace)]) == 0
    return model, trace


def _run(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _reading(name: str, trace) -> list[str]:
    return ["--budget", "0.5", "--theta", "1", *(a.format(trace=trace) for a in FUTURE[name])]


def test_belady_and_the_oracle_on_the_runs_own_trace_give_the_dense_tokens(capsys, recorded):
    model, trace = recorded
    dense = _run(capsys, [*RUN, *PROMPT, "--model", model])
    both = ["--budget", "0.5", "--theta", "1", "--policy", "belady", "--predictor", "oracle",
            f"cache.policy.trace={trace}", f"cache.predictor.trace={trace}"]
    report = _run(capsys, [*RUN, *PROMPT, "--model", model, *both])
    assert report["token_ids"] == dense["token_ids"]
    assert report["stats"]["prediction_recall"] == 1.0  # the oracle named every routed expert


@pytest.mark.parametrize("name", sorted(FUTURE))
def test_a_trace_of_a_prompt_of_another_length_is_named_before_the_run(capsys, recorded, name):
    model, trace = recorded
    message = cli_error(capsys, [*RUN, "--prompt-ids", "1,2,3,4", "--model", model, *_reading(name, trace)])
    assert message.startswith(f"{trace}: the {name} ")
    assert "needs the trace of this run, but the trace's prompt has 6 tokens and this run's 4" in message


@pytest.mark.parametrize("name", sorted(FUTURE))
def test_a_trace_of_another_prompt_of_the_same_length_is_named_at_the_first_step_that_differs(capsys, recorded, name):
    model, trace = recorded
    message = cli_error(capsys, [*RUN, "--prompt-ids", "7,8,9,10,11,12", "--model", model, *_reading(name, trace)])
    assert message.startswith(f"{trace}: the {name} ")
    assert "needs the trace of this run, but at layer " in message and " the trace routes " in message


@pytest.mark.parametrize("name", sorted(FUTURE))
def test_a_run_longer_than_its_trace_is_named(capsys, recorded, tmp_path, name):
    model, _ = recorded
    short = tmp_path / "short.npz"  # 6 prompt tokens + 2 decode steps (the run stops on EOS after 5 new tokens)
    assert main(["generate", "--json", "--greedy", "--max-new-tokens", "3", *PROMPT, "--model", model, "--record-trace", str(short)]) == 0
    message = cli_error(capsys, [*RUN, *PROMPT, "--model", model, *_reading(name, short)])
    assert "needs the trace of this run, but the run goes past its end (layer 0 routes token 8; the trace has 8 tokens)" in message
