"""The learned policy (moepic/policies/learned.py, reuse.py): its features and labels are what they
say, its file round-trips and is checked field by field, and a file used on another model shape is
an error naming both. (The invariants every policy keeps run on it too: test_invariants.py.)"""

from __future__ import annotations

import json

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.errors import ConfigError
from moepic.policies import POLICIES
from moepic.policies.base import LayerStep
from moepic.policies.learned import (DEFAULT_FILE, LearnedConfig, LearnedPolicy, fit_reuse_model, load_reuse_model,
                                    ranking_least_squares)
from moepic.policies.reuse import (FEATURES, NEVER, advanced, feature_series, features, initial_state, reuse_labels, reuse_samples,
                                   tokens_to_next_use)
from policy_support import one_layer_trace


@given(st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=30), st.integers(1, 6))
def test_a_label_says_whether_the_expert_is_used_within_the_horizon(used, horizon):
    counts_SE = np.array(used, dtype=np.int64)
    S = len(counts_SE)
    labels_SE = reuse_labels(counts_SE, np.arange(S), np.ones(S, np.int64), horizon)
    for s in range(S):
        for e in range(4):
            assert labels_SE[s, e] == any(counts_SE[t, e] for t in range(s + 1, min(S, s + 1 + horizon)))


@given(st.lists(st.tuples(st.lists(st.booleans(), min_size=3, max_size=3), st.integers(1, 5)), min_size=1, max_size=20))
def test_tokens_to_next_use_is_the_wait_from_a_steps_end_to_the_next_step_using_the_expert(steps):
    counts_SE = np.array([used for used, _ in steps], dtype=np.int64)
    tokens_S = np.array([tokens for _, tokens in steps])
    clock_S = np.cumsum(tokens_S) - tokens_S
    out_SE = tokens_to_next_use(counts_SE, clock_S, tokens_S)
    for s in range(len(steps)):
        for e in range(3):
            later = [clock_S[t] for t in range(s + 1, len(steps)) if counts_SE[t, e]]
            assert out_SE[s, e] == (later[0] - clock_S[s] - tokens_S[s] if later else np.inf)


def test_labels_of_multi_token_steps_count_tokens_not_steps():
    counts_SE = np.array([[1, 0], [0, 1], [1, 0]])
    clock_S, tokens_S = np.array([0, 5, 6]), np.array([5, 1, 1])  # a 5-token prompt, then two decode tokens
    assert reuse_labels(counts_SE, clock_S, tokens_S, 1).tolist() == [[False, True], [True, False], [False, False]]
    assert reuse_labels(counts_SE, clock_S, tokens_S, 2).tolist() == [[True, True], [True, False], [False, False]]


def test_features_follow_an_experts_history():
    state = initial_state(3)
    for clock, used in enumerate([[0], [1], [0], [], [0]]):
        counts_E = np.zeros(3, np.int64)
        counts_E[used] = 1
        state = advanced(state, LayerStep(layer=0, clock=clock, tokens=1, counts_E=counts_E, new_request=clock == 0))
    f = dict(zip(FEATURES, features(state).T))
    assert f["used_now"].tolist() == [1, 0, 0]
    assert np.expm1(f["log_recency"]).round().tolist() == [1, 4, NEVER]  # the clock after the step (5) less the last use
    assert f["never_used"].tolist() == [0, 0, 1]
    assert np.expm1(f["log_prev_gap"]).round().tolist() == [2, NEVER, NEVER]  # expert 0: used at 0, 2, 4
    assert np.expm1(f["log_mu"]).round().tolist() == [3, 1, 0]
    assert np.expm1(f["log_ema_1"])[0] == pytest.approx(1 + 0.25 + 0.0625)  # halves every token


def test_a_new_request_restarts_mu_only():
    state = initial_state(2)
    for clock, new in enumerate([True, False, True]):
        state = advanced(state, LayerStep(layer=0, clock=clock, tokens=1, counts_E=np.array([1, 0]), new_request=new))
    f = dict(zip(FEATURES, features(state).T))
    assert np.expm1(f["log_mu"]).round().tolist() == [1, 0] and np.expm1(f["log_ema_256"])[0] > 2.9


def _fitted(tmp_path, **shape):
    trace = one_layer_trace([[0, 1], [2, 1], [0, 3], [0, 1], [2, 3]] * 6, num_experts=4)
    model = fit_reuse_model(*reuse_samples(trace, 1), horizon=1, trained_on=("hand-made",), **shape)
    path = tmp_path / "policy.json"
    model.save(path)
    return model, path, trace


def test_a_saved_model_loads_back_scoring_alike(tmp_path):
    model, path, trace = _fitted(tmp_path, num_experts=4, moe_layers=(0,))
    loaded = load_reuse_model(path)
    features_SEF = feature_series(0, 4, np.eye(4, dtype=np.int64)[[0, 1, 2]], np.arange(3), np.ones(3, np.int64), np.zeros(3, bool))
    for f_EF in features_SEF:
        np.testing.assert_array_equal(loaded.score(f_EF), model.score(f_EF))
    assert (loaded.num_experts, loaded.moe_layers, loaded.trained_on) == (4, (0,), ("hand-made",))
    policy = POLICIES.build(LearnedConfig(path=str(path)))
    assert policy.priority(policy.init(0, 4)).shape == (4,)


def test_a_file_for_another_shape_is_an_error_naming_the_file_and_both_shapes(tmp_path):
    _, path, _ = _fitted(tmp_path, num_experts=4, moe_layers=(0, 1))
    policy = LearnedPolicy(LearnedConfig(path=str(path)))
    with pytest.raises(ConfigError, match=r"policy.json: the learned policy was trained for 4 experts per layer; this model's layer 0 has 8"):
        policy.init(0, 8)
    with pytest.raises(ConfigError, match=r"trained for a model whose MoE layers are 0–1; this model's layer 5 is not among them"):
        policy.init(5, 4)


@pytest.mark.parametrize("edit, says", [
    (lambda d: d.update(format="something-else"), "field 'format' should be 'moepic-reuse-policy'"),
    (lambda d: d.update(version=2), "field 'version' should be 1"),
    (lambda d: d.update(features=d["features"][:-1]), "field 'features' should be the features"),
    (lambda d: d["weights"].pop(), f"field 'weights' should be {len(FEATURES)} finite numbers"),
    (lambda d: d["weights"].__setitem__(0, float("nan")), "field 'weights' should be"),
    (lambda d: d["std"].__setitem__(0, 0.0), "field 'std' should be 10 finite positive numbers"),
    (lambda d: d.update(horizon=0), "field 'horizon' should be a positive integer"),
    (lambda d: d.update(num_experts="8"), "field 'num_experts' should be a positive integer or null"),
    (lambda d: d.update(bias=True), "field 'bias' should be a finite number"),
])
def test_a_corrupt_file_is_a_clear_error(tmp_path, edit, says):
    _, path, _ = _fitted(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="policy.json: " + says.replace("(", r"\(").replace(")", r"\)")):
        load_reuse_model(path)


def test_a_missing_or_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.json: learned policy file not found"):
        POLICIES.build(LearnedConfig(path=str(tmp_path / "nowhere.json")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: cannot read it as a learned policy"):
        load_reuse_model(tmp_path / "bad.json")


def test_the_built_in_model_is_generic_and_loads():
    model = load_reuse_model(DEFAULT_FILE)
    assert model.num_experts is None and model.moe_layers is None and model.horizon >= 1
    LearnedPolicy().init(7, 128)  # any shape


def test_samples_are_the_engines_steps_a_prompt_one_step_each_generated_token_one():
    """The states a model is fit on are those it ranks in: a 3-token prompt is one step (as the
    engine and the simulator take it, moepic/sim/steps.py), then one step per generated token."""
    trace = attrs.evolve(one_layer_trace([[0, 1], [1, 2], [2, 3], [3, 0], [0, 1]], num_experts=4),
                         prefill_N=np.array([True, True, True, False, False]))
    features_MEF, labels_ME = reuse_samples(trace, 1)
    assert features_MEF.shape == (3, 4, len(FEATURES)) and labels_ME.shape == (3, 4)
    f = dict(zip(FEATURES, features_MEF[0].T))
    assert f["used_now"].tolist() == [1, 1, 1, 1] and np.expm1(f["log_mu"]).round().tolist() == [1, 2, 2, 1]
    assert labels_ME.tolist() == [[True, False, False, True], [True, True, False, False], [False, False, False, False]]


@given(st.integers(0, 2**32 - 1), st.integers(2, 6))
def test_the_fit_ranks_within_a_step_a_shift_of_a_whole_step_changes_nothing(seed, num_experts):
    """Only the order of a step's experts decides an eviction: adding any constant to a feature across
    all experts of one step leaves the fitted score's weights (in the features' own units) unchanged."""
    rng = np.random.default_rng(seed)
    features_MEF = rng.normal(size=(40, num_experts, 3))
    labels_ME = rng.random((40, num_experts)) < 0.4
    shifted_MEF = features_MEF + rng.normal(scale=5.0, size=(40, 1, 3))
    (_, std_F, w_F), (_, shifted_std_F, shifted_w_F) = (ranking_least_squares(f, labels_ME, 0.0) for f in (features_MEF, shifted_MEF))
    np.testing.assert_allclose(w_F / std_F, shifted_w_F / shifted_std_F, rtol=1e-6, atol=1e-9)


def test_learning_finds_a_pattern_lru_cannot_see():
    """Expert 3 comes back every 4th token and expert 0 is used at random in between: a cache of one
    (beside the step's own) should keep 3 over a more recent 0 just before 3 is due. The fitted
    score, trained on one run of the pattern, ranks 3 above 0 right before its return."""
    rng = np.random.default_rng(0)
    ids = [[3, 1] if t % 4 == 0 else [int(rng.choice([0, 1])), 2] for t in range(400)]
    trace = one_layer_trace(ids, num_experts=4)
    model = fit_reuse_model(*reuse_samples(trace, 1), horizon=1)
    features_SEF = feature_series(0, 4, np.eye(4, dtype=np.int64)[[3, 0, 0]] + np.eye(4, dtype=np.int64)[[1, 2, 2]],
                                  np.arange(3), np.ones(3, np.int64), np.zeros(3, bool))
    before_return = model.score(features_SEF[-1])  # the step before 3's use, 0 just used
    assert before_return[3] > before_return[0]


def _record(tmp_path, name: str, prompt: str, model: str | None = None) -> str:
    from moepic.cli import main

    path = tmp_path / f"{name}.npz"
    assert main(["generate", *(["--model", model] if model else []), "--prompt-ids", prompt, "--max-new-tokens", "24",
                 "--record-trace", str(path), "--json"]) == 0
    return str(path)


def test_train_policy_fits_a_file_scores_it_held_out_and_generation_with_it_equals_the_dense_run(tmp_path, capsys):
    from moepic.cli import main

    train, held_out = _record(tmp_path, "train", "5,17,300,42"), _record(tmp_path, "held", "7,99,1000")
    out = tmp_path / "policy.json"
    capsys.readouterr()
    assert main(["train-policy", "--trace", train, "--eval-trace", held_out, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["hit_rates"]) == {"0.125", "0.25", "0.5"}
    for rates in report["hit_rates"].values():
        assert set(rates) == {"learned", "lru", "lfu", "lcp", "belady"} and all(0 <= r <= 1 for r in rates.values())
        assert rates["belady"] >= max(rates.values()) - 1e-12  # nothing beats the bound
    assert load_reuse_model(out).num_experts == 16
    runs = []
    for extra in ([], ["--budget", "0.25", "--policy", "learned", f"cache.policy.path={out}"]):
        assert main(["generate", "--prompt-ids", "7,99,1000", "--max-new-tokens", "12", "--json", *extra]) == 0
        runs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert runs[0] == runs[1]


def test_train_policy_refuses_traces_of_two_models_and_bad_flags(tmp_path, capsys, checkpoint_dir):
    from tests_support import cli_error

    bundled = _record(tmp_path, "bundled", "5,17,300")
    other = _record(tmp_path, "other", "5,17,30", model=str(checkpoint_dir("mixtral")))
    out = str(tmp_path / "p.json")
    assert "use one model's traces" in cli_error(capsys, ["train-policy", "--trace", bundled, "--trace", other, "--out", out])
    assert "use one model's traces" in cli_error(capsys, ["train-policy", "--trace", bundled, "--eval-trace", other, "--out", out])
    assert "--horizon must be an integer from 1" in cli_error(capsys, ["train-policy", "--trace", bundled, "--out", out, "--horizon", "0"])
    assert "--ridge must be a finite number >= 0" in cli_error(capsys, ["train-policy", "--trace", bundled, "--out", out, "--ridge", "nan"])
    assert not (tmp_path / "p.json").exists()


def test_a_fit_on_some_feature_groups_leaves_the_others_out():
    from moepic.policies.reuse import FEATURE_GROUPS, feature_mask

    trace = one_layer_trace([[0, 1], [2, 1], [0, 3], [0, 1], [2, 3]] * 6, num_experts=4)
    features_MEF, labels_ME = reuse_samples(trace, 1)
    model = fit_reuse_model(features_MEF, labels_ME, horizon=1, groups=("recency",))
    kept = feature_mask(("recency",))
    assert kept.sum() == len(FEATURE_GROUPS["recency"]) and (model.weights_F[~kept] == 0).all() and (model.weights_F[kept] != 0).any()
    # Left-out features do not move the score, whatever their values.
    changed_MEF = features_MEF.copy()
    changed_MEF[..., ~kept] += 7.0
    np.testing.assert_array_equal(model.score(changed_MEF[3]), model.score(features_MEF[3]))
    with pytest.raises(ValueError, match="unknown feature group 'colour'; known: recency, frequency, gap, request"):
        feature_mask(("recency", "colour"))
