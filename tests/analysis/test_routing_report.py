"""Routing statistics, gate-lookahead recall, and the routing-report command."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given

from moepic.analysis.lookahead import GateLookaheadTap
from moepic.analysis.routing_stats import consecutive_reuse, expert_shares, layer_loads, most_popular_recall
from moepic.checkpoint.load import load_model
from moepic.cli import main
from moepic.core.model import KVCache, forward
from tests_support import cli_error, traces

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mixtral-8x7b-instruct-fp8"


@given(trace=traces())
def test_layer_statistics_match_a_direct_count(trace):
    N, L, K = trace.expert_ids_NLK.shape
    shares = expert_shares(trace)
    reuse = consecutive_reuse(trace)
    popular = most_popular_recall(trace)
    for column in range(L):
        ids = trace.expert_ids_NLK[:, column].tolist()
        counts = [sum(row.count(e) for row in ids) for e in range(trace.num_experts)]
        assert shares[column].tolist() == pytest.approx([c / max(N * K, 1) for c in counts])
        pairs = [
            len(set(ids[t]) & set(ids[t - 1])) / K
            for t in range(1, N)
            if trace.sequence_N[t] == trace.sequence_N[t - 1] and trace.position_N[t] == trace.position_N[t - 1] + 1
        ]
        assert reuse[column] == pytest.approx(np.mean(pairs)) if pairs else np.isnan(reuse[column])
        top = set(np.argsort(-shares[column], kind="stable")[:K].tolist())
        expected = sum(e in top for row in ids for e in row) / (N * K) if N else np.nan
        assert popular[column] == pytest.approx(expected, nan_ok=True)
    for load in layer_loads(trace):
        if N:
            assert load.min_share <= 1 / trace.num_experts + 1e-9 <= load.busiest_share + 2e-9
            assert load.busiest_share <= load.top_quarter_share <= 1 + 1e-9


def test_lookahead_is_exact_when_the_next_layer_adds_no_attention(checkpoint_dir):
    # With layer l+1's attention output zeroed, its router sees exactly rmsnorm(layer l's output),
    # which is what gate lookahead feeds the router: every expert must be predicted.
    model = load_model(checkpoint_dir("olmoe"), dtype=torch.float32)
    layers = list(model.weights.layers)
    for l in range(1, len(layers)):
        attention = attrs.evolve(layers[l].attention, o_DQ=torch.zeros_like(layers[l].attention.o_DQ))
        layers[l] = attrs.evolve(layers[l], attention=attention)
    no_attention = attrs.evolve(model, weights=attrs.evolve(model.weights, layers=tuple(layers)))
    tokens = torch.tensor([1, 17, 5, 42, 8, 77, 3, 61, 29])
    for m, exact in [(no_attention, True), (model, False)]:
        tap = GateLookaheadTap(m)
        forward(m, tokens, KVCache.allocate(m, len(tokens)), tap=tap)
        recall = tap.recall()
        assert set(recall) == set(m.spec.moe_layers[1:])
        assert all(0 <= r <= 1 for r in recall.values())
        if exact:
            assert all(r == 1.0 for r in recall.values())
    assert min(recall.values()) < 1.0  # with attention the prediction is a real guess


def test_report_from_a_text_file_through_the_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEPIC_CACHE_DIR", str(tmp_path))
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 20)
    capsys.readouterr()
    assert main(["routing-report", "--text", str(text), "--chunk", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == len(text.read_text().encode())  # byte-level tokenizer
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2, 3]
    assert report["layers"][0]["next_layer_recall"] is None  # nothing precedes the first layer
    assert all(0 <= row["next_layer_recall"] <= 1 for row in report["layers"][1:])
    assert main(["routing-report", "--text", str(text)]) == 0
    assert "next-layer recall" in capsys.readouterr().out


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared routing traces not found at {SHARED}")
def test_report_on_the_shared_mixtral_trace_shows_real_moe_routing(capsys):
    capsys.readouterr()
    assert main(["routing-report", "--trace", str(SHARED / "humaneval_2_routing.jsonl"), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert len(layers) == 32
    assert all(row["min_share"] > 0.01 for row in layers)  # no dead experts
    assert np.mean([row["busiest_share"] for row in layers]) > 1 / 8  # skewed load
    assert np.mean([row["reuse"] for row in layers]) > 2 / 8  # temporal locality above random


def test_routing_report_input_errors_are_one_line(capsys, tmp_path):
    assert cli_error(capsys, ["routing-report"]) == "routing-report needs exactly one of --text FILE or --trace FILE"
    assert cli_error(capsys, ["routing-report", "--text", str(tmp_path / "none.txt")]).endswith("text file not found")
    assert cli_error(capsys, ["routing-report", "--trace", str(tmp_path / "none.npz")]).endswith("trace file not found")
