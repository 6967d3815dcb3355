"""Perplexity (analysis/perplexity.py) and `moepic eval-ppl`: the score equals the log-likelihood
computed straight from the model's logits, windows count every predicted token once, and the
command reports quantized experts against their dense selves."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.analysis.perplexity import score
from moepic.checkpoint.load import load_model
from moepic.cli import main
from moepic.core.model import KVCache, forward
from tests_support import cli_error


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_model(checkpoint_dir("mixtral"), dtype=torch.float32)


def direct_nll(model, ids: list[int]) -> tuple[float, torch.Tensor]:
    """One forward over `ids`: the summed NLL of tokens 1… and each position's argmax."""
    logits_TV, _ = forward(model, torch.tensor(ids), KVCache.allocate(model, len(ids)))
    log_probs = torch.log_softmax(logits_TV[:-1].double(), dim=-1)
    return -float(log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()), logits_TV[:-1].argmax(-1)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(2, 40), window=st.integers(2, 16), seed=st.integers(0, 1000))
def test_windows_score_each_token_once_from_its_own_windows_context(model, length, window, seed):
    ids = torch.randint(0, model.spec.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    scored = score(model, ids, window, progress=False)
    starts = [s for s in range(0, length, window) if length - s >= 2]
    assert scored.tokens == sum(min(window, length - s) - 1 for s in starts)
    nll = 0.0
    predictions = []
    for s in starts:
        part, argmax = direct_nll(model, ids[s : s + window])
        nll += part
        predictions.append(argmax)
    assert math.isclose(scored.nll, nll, rel_tol=1e-5)
    assert torch.equal(scored.predictions, torch.cat(predictions))
    assert math.isclose(scored.perplexity, math.exp(nll / scored.tokens), rel_tol=1e-5)
    assert scored.agreement(scored) == 1.0


def test_too_little_to_score_is_refused(model):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        score(model, [5], 8, progress=False)
    with pytest.raises(ValueError, match="window holds at least 2"):
        score(model, [5, 6, 7], 1, progress=False)


def test_eval_ppl_reports_quantized_experts_against_their_dense_selves(capsys):
    assert main(["eval-ppl", "--max-tokens", "600", "--window", "256", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert dense["tokens"] == 600 - 3  # three windows: 256, 256, 88 tokens
    assert dense["expert_format"] == {"name": "dense"} and "top1_agreement" not in dense
    assert main(["eval-ppl", "--max-tokens", "600", "--window", "256", "--json", "--expert-format", "int4"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["expert_format"] == {"name": "int4", "group_size": 64, "symmetric": True}
    assert q["reference_perplexity"] == dense["perplexity"] != q["perplexity"]
    assert 0.5 < q["top1_agreement"] < 1.0  # 4-bit experts change some predictions, not most
    assert abs(q["perplexity"] / dense["perplexity"] - 1) < 0.05


@pytest.mark.parametrize("argv,message", [
    (["--max-tokens", "1"], "--max-tokens: at least 2 tokens are scored, got 1"),
    (["--window", "1"], "--window: between 2 and the model's context (1024), got 1"),
    (["--expert-format", "int3"], "--expert-format: unknown expert format 'int3'; known: dense, fp8, gguf, int4, int4-fused, int8, mxfp4"),
    (["--dataset", "nope"], "unknown dataset 'nope'; known: kjv-heldout"),
])
def test_bad_eval_ppl_flags_are_named(capsys, argv, message):
    assert cli_error(capsys, ["eval-ppl", *argv]) == message


def test_a_text_that_cannot_be_read_is_named(capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    assert cli_error(capsys, ["eval-ppl", "--text", str(bad)]).startswith(f"--text {bad}: cannot read it as UTF-8 text")
    assert cli_error(capsys, ["eval-ppl", "--text", str(tmp_path / "absent.txt")]).startswith(f"--text {tmp_path / 'absent.txt'}")


def test_a_model_without_a_tokenizer_is_named(capsys, checkpoint_dir):
    folder = checkpoint_dir("mixtral")
    assert cli_error(capsys, ["eval-ppl", "--model", str(folder)]) == f"{folder} has no tokenizer.json: perplexity is scored on text"


def test_through_an_offloading_engine_a_window_is_scored_token_by_token_and_changes_no_bit(model):
    """Fed a token at a time, as generation feeds it: the engine (exact) scores what the resident
    experts score token by token, bit for bit, and what one forward per window scores, to rounding."""
    from moepic.core.moe import ResidentExperts
    from moepic.runtime.offload import offloaded_experts
    from tests_support import policy_for

    ids = [(7 * i + 3) % model.spec.vocab_size for i in range(40)]
    engine = offloaded_experts(model, 0.4, 0.5, policy=policy_for("lru", None))
    offloaded = score(model, ids, 16, experts=engine, progress=False)
    resident = score(model, ids, 16, experts=ResidentExperts(model.weights), progress=False)
    assert (offloaded.nll, offloaded.tokens) == (resident.nll, resident.tokens) and torch.equal(offloaded.predictions, resident.predictions)
    assert engine.report()["misses"] > 0
    windowed = score(model, ids, 16, progress=False)
    assert offloaded.tokens == windowed.tokens == 40 - 3  # windows of 16, 16, 8: 15 + 15 + 7 predicted
    assert math.isclose(offloaded.nll, windowed.nll, rel_tol=1e-5)
