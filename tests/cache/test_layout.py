"""cache/layout.py: budget values → bytes, and a budget plus θ → per-layer slots and staging (unit + property)."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moepic.cache.layout import AUTO_THETA, MAX_BUDGET_BYTES, BudgetError, budget_bytes, plan_layout, slots_for
from moepic.core.spec import ModelSpec, MoESpec, RopeSpec
from moepic.errors import ConfigError

MiB, WHOLE = 2**20, 4000


def tiny_spec(*, E: int = 4, K: int = 2, F: int = 256, D: int = 8, kinds=("moe", "moe", "moe")) -> ModelSpec:
    return ModelSpec(
        model_type="tiny",
        vocab_size=16,
        hidden_size=D,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        norm_eps=1e-5,
        rope=RopeSpec(theta=1e4),
        layer_kinds=kinds,
        moe=MoESpec(num_experts=E, top_k=K, expert_ffn=F),
        dense_ffn=16,
    )


def expert_bytes(F: int, D: int, dtype_bytes: int) -> int:
    """A SwiGLU expert: F neurons, each a gate row, an up row and a down column of D values."""
    return F * 3 * D * dtype_bytes


# tiny_spec() at 2 bytes a value: 12288 bytes an expert, 49152 a layer, 147456 for the 3 MoE layers.
EXPERT = expert_bytes(256, 8, 2)
LAYER = 4 * EXPERT
ALL = 3 * LAYER


# --- budget_bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5KiB", 1536),
        ("3 kb", 3000),
        ("7B", 7),
        ("1048576", 1048576),
        (1048576, 1048576),
        (2.0, 2),
        ("1e3", 1000),
    ],
)
def test_sizes_with_a_unit_or_a_plain_byte_count_are_bytes(value, expected):
    assert budget_bytes(value, WHOLE, "cache.budget") == expected


@pytest.mark.parametrize(
    "value,expected",
    [(0.25, 1000), ("0.25", 1000), (1.0, WHOLE), (1, WHOLE), ("1", WHOLE), ("1.0", WHOLE), (0, 0), ("25%", 1000), ("100%", WHOLE), ("12.5%", 500)],
)
def test_numbers_up_to_one_and_percentages_are_fractions_of_the_whole(value, expected):
    assert budget_bytes(value, WHOLE, "cache.budget") == expected


@pytest.mark.parametrize(
    "value,message",
    [
        ("lots", "expected bytes"),
        ("", "expected bytes"),
        ("-5MB", "expected bytes"),
        ("5XB", "unknown unit"),
        ("101%", "at most 100%"),
        ("250%", "at most 100%"),
        ("1.5", "whole number"),
        (1.5, "whole number"),
        ("2.5B", "whole number"),
        (True, "expected bytes"),
    ],
)
def test_a_bad_budget_value_is_a_budget_error_naming_the_key(value, message):
    with pytest.raises(BudgetError, match=message) as err:
        budget_bytes(value, WHOLE, "cache.budget[2]")
    assert str(err.value).startswith("cache.budget[2]: ")
    assert isinstance(err.value, ConfigError)  # so the CLI prints it as one line


@pytest.mark.parametrize("value", [-0.25, -5, -3.5])
def test_a_negative_number_is_a_budget_error_not_a_negative_size(value):
    with pytest.raises(BudgetError, match=r"^cache\.budget: "):
        budget_bytes(value, WHOLE, "cache.budget")


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_number_is_a_budget_error_naming_the_key(value):
    with pytest.raises(BudgetError, match=r"^cache\.budget: "):
        budget_bytes(value, WHOLE, "cache.budget")


@pytest.mark.parametrize(
    "value,whole,expected",
    [("8.2GB", 1, 8_200_000_000), ("57%", 100, 57), (0.57, 100, 57), ("0.41", 100, 41)],
)
def test_decimal_sizes_and_fractions_are_exact_not_rounded_down_by_binary_floats(value, whole, expected):
    assert budget_bytes(value, whole, "cache.budget") == expected


# --- plan_layout: one global budget --------------------------------------------------------------


def test_global_budget_keeps_top_k_staging_experts_and_splits_the_rest_evenly():
    # 5 experts' bytes: 2 for staging (top-2), 3 split over 3 layers = 1 expert's bytes each;
    # θ = 0.5 is 128 neurons (2 blocks of 64), so each layer holds 2 half-experts.
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget=5 * EXPERT, theta=0.5)
    assert layout.staging_experts == 2 and layout.staging_bytes == 2 * EXPERT
    assert [l.layer for l in layout.layers] == [0, 1, 2]
    for l in layout.layers:
        assert (l.top_neurons, l.slots, l.block) == (128, 2, 64)
        assert l.top_bytes == EXPERT // 2 and l.bottom_bytes == EXPERT // 2 and l.cache_bytes == EXPERT
    assert layout.cache_bytes == 3 * EXPERT


def test_layers_are_numbered_as_in_the_model_when_dense_layers_come_first():
    layout = plan_layout(tiny_spec(kinds=("dense", "moe", "dense", "moe")), dtype_bytes=2, budget=4 * EXPERT, theta=1.0)
    assert [l.layer for l in layout.layers] == [1, 3]
    assert layout.for_layer(3).slots == 1
    with pytest.raises(KeyError):
        layout.for_layer(0)


def test_a_global_budget_below_the_staging_experts_names_the_minimum_in_mib():
    plan_layout(tiny_spec(), dtype_bytes=2, budget=2 * EXPERT, theta=0.5)  # exactly the minimum: fine
    with pytest.raises(BudgetError) as err:
        plan_layout(tiny_spec(), dtype_bytes=2, budget=2 * EXPERT - 1, theta=0.5)
    message = str(err.value)
    assert message.startswith("cache.budget ")
    assert f"{2 * EXPERT / MiB:.2f} MiB" in message and str(2 * EXPERT) in message


def test_the_minimum_working_set_is_enforced_for_a_fraction_too():
    # 10% of 12 experts is 1.2 experts' bytes: less than the 2 staging experts.
    with pytest.raises(BudgetError, match="minimum working set"):
        plan_layout(tiny_spec(), dtype_bytes=2, budget="10%", theta=1.0)


@pytest.mark.parametrize("budget", ["100%", 1.0, 1, ALL, ALL + 12345])
def test_everything_fits_at_theta_one_so_no_staging_and_every_layer_is_fully_resident(budget):
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget=budget, theta=1.0)
    assert layout.staging_experts == 0 and layout.staging_bytes == 0
    assert all(l.fully_resident and l.slots == 4 and l.top_neurons == 256 for l in layout.layers)
    assert layout.cache_bytes == layout.expert_bytes == ALL


def test_one_byte_short_of_everything_keeps_staging_and_some_layer_is_not_fully_resident():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget=ALL - 1, theta=1.0)
    assert layout.staging_experts == 2
    assert not all(l.fully_resident for l in layout.layers)


def test_a_full_budget_below_theta_one_still_keeps_staging_for_the_bottoms():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget="100%", theta=0.5)
    assert layout.staging_experts == 2
    assert all(l.slots == 4 and not l.fully_resident for l in layout.layers)


def test_theta_zero_gives_no_slots():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget="100%", theta=0.0)
    assert all(l.top_neurons == 0 and l.slots == 0 and l.cache_bytes == 0 for l in layout.layers)


def test_a_model_without_experts_cannot_be_laid_out():
    dense = ModelSpec(
        model_type="dense", vocab_size=16, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, norm_eps=1e-5,
        rope=RopeSpec(theta=1e4), layer_kinds=("dense",), dense_ffn=16,
    )
    with pytest.raises(BudgetError, match="no routed experts"):
        plan_layout(dense, dtype_bytes=2, budget="50%", theta=1.0)


# --- plan_layout: one budget per MoE layer ----------------------------------------------------


def test_per_layer_budgets_are_each_layers_cache_and_staging_comes_on_top():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget=["50%", 0.25, 3 * EXPERT + EXPERT - 1], theta=1.0)
    assert [l.slots for l in layout.layers] == [2, 1, 3]
    assert layout.staging_experts == 2


def test_per_layer_budgets_that_hold_every_expert_need_no_staging():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget=["100%", 1.0, LAYER], theta=1.0)
    assert layout.staging_experts == 0 and all(l.fully_resident for l in layout.layers)


def test_a_per_layer_budget_list_of_the_wrong_length_is_an_error_naming_the_count():
    with pytest.raises(BudgetError, match=r"cache\.budget: expected one value per MoE layer \(3\), got 2"):
        plan_layout(tiny_spec(), dtype_bytes=2, budget=["50%", "50%"], theta=1.0)


def test_a_bad_per_layer_budget_names_its_index():
    with pytest.raises(BudgetError, match=r"^cache\.budget\[1\]: "):
        plan_layout(tiny_spec(), dtype_bytes=2, budget=["50%", "1.5", "50%"], theta=1.0)


def test_a_negative_per_layer_budget_is_an_error_not_negative_slots():
    with pytest.raises(BudgetError, match=r"cache\.budget\[0\]"):
        plan_layout(tiny_spec(), dtype_bytes=2, budget=[-0.5, 0.5, 0.5], theta=1.0)


# --- θ ---------------------------------------------------------------------------------------


def test_theta_may_be_given_per_layer():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget=["100%"] * 3, theta=[1.0, 0.5, 0.0])
    assert [l.top_neurons for l in layout.layers] == [256, 128, 0]
    assert [l.slots for l in layout.layers] == [4, 4, 0]
    assert [l.theta for l in layout.layers] == [1.0, 0.5, 0.0]


def test_a_per_layer_theta_list_of_the_wrong_length_is_an_error():
    with pytest.raises(BudgetError, match=r"cache\.theta: expected one value per MoE layer \(3\), got 4"):
        plan_layout(tiny_spec(), dtype_bytes=2, budget="50%", theta=[1.0] * 4)


@pytest.mark.parametrize("theta", [-0.1, 1.5, [1.0, 1.01, 0.5]])
def test_theta_outside_zero_to_one_is_an_error(theta):
    with pytest.raises(BudgetError, match=r"cache\.theta: each value must be in \[0, 1\]"):
        plan_layout(tiny_spec(), dtype_bytes=2, budget="50%", theta=theta)


def test_theta_rounds_down_to_whole_neuron_blocks():
    # 0.3 · 14336 = 4300.8 neurons = 67.2 blocks of 64: 67 blocks are kept.
    layout = plan_layout(tiny_spec(F=14336), dtype_bytes=1, budget="100%", theta=0.3)
    assert all(l.block == 64 and l.top_neurons == 67 * 64 for l in layout.layers)
    assert layout.layers[0].theta < 0.3


def test_theta_below_one_block_keeps_no_top_and_so_no_slots_and_the_note_names_the_smallest_theta_that_caches():
    # 0.2 · 256 = 51.2 neurons: less than one block of 64, so it caches nothing at all.
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget="100%", theta=0.2)
    assert all(l.top_neurons == 0 and l.slots == 0 for l in layout.layers)
    (note,) = layout.notes
    assert note.caches_nothing and note.problem() == (
        "cache.theta 0.2 rounds down to 0 (whole 64-neuron blocks of 256 neurons: 0, 0.25, 0.5, 0.75, 1), "
        "which caches nothing: give 0 for no cache or at least 0.25"
    )


def test_a_narrower_widest_block_rounds_theta_in_smaller_steps():
    # 0.2 · 256 = 51.2 neurons: 3 blocks of 16.
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget="100%", theta=0.2, widest_neuron_block=16)
    assert all(l.block == 16 and l.top_neurons == 48 for l in layout.layers)


def test_slots_are_the_whole_top_segments_that_fit_capped_at_the_expert_count():
    # Per-layer budget of 3.5 experts' bytes at θ = 0.25 (64 neurons: a quarter expert): 14 would fit, E = 4.
    capped = plan_layout(tiny_spec(), dtype_bytes=2, budget=[7 * EXPERT // 2] * 3, theta=0.25)
    assert all(l.slots == 4 for l in capped.layers)
    # 0.9 of one expert at θ = 0.25: 3 quarter-experts fit, the 4th does not.
    partial = plan_layout(tiny_spec(), dtype_bytes=2, budget=[9 * EXPERT // 10] * 3, theta=0.25)
    assert all(l.slots == 3 for l in partial.layers)


@st.composite
def models_and_budgets(draw):
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, E))
    kinds = draw(st.lists(st.sampled_from(["moe", "dense"]), min_size=1, max_size=5).filter(lambda k: "moe" in k))
    block = draw(st.sampled_from([1, 2, 4, 64]))
    F = block * draw(st.integers(1, 6))
    D, dtype_bytes = draw(st.integers(1, 16)), draw(st.sampled_from([1, 2, 4]))
    spec = tiny_spec(E=E, K=K, F=F, D=D, kinds=tuple(kinds))
    L = kinds.count("moe")
    every = L * E * expert_bytes(F, D, dtype_bytes)
    budget = draw(st.integers(2, max(2, every * 6 // 5)))
    unit = st.floats(0, 1, allow_nan=False)
    theta = draw(unit | st.lists(unit, min_size=L, max_size=L))
    return spec, dtype_bytes, budget, theta


@given(case=models_and_budgets())
def test_a_global_budget_is_never_exceeded_and_no_layer_could_hold_one_more_slot(case):
    spec, dtype_bytes, budget, theta = case
    E, K, F = spec.moe.num_experts, spec.moe.top_k, spec.moe.expert_ffn
    expert = expert_bytes(F, spec.hidden_size, dtype_bytes)
    L = len(spec.moe_layers)
    thetas = theta if isinstance(theta, list) else [theta] * L
    everything_whole = all(t == 1 for t in thetas) and budget >= L * E * expert
    if budget < K * expert and not everything_whole:
        with pytest.raises(BudgetError, match="minimum working set"):
            plan_layout(spec, dtype_bytes=dtype_bytes, budget=budget, theta=theta)
        return
    layout = plan_layout(spec, dtype_bytes=dtype_bytes, budget=budget, theta=theta)
    assert layout.cache_bytes + layout.staging_bytes <= budget
    assert layout.staging_experts == (0 if everything_whole else K)
    share = (budget - layout.staging_bytes) / L  # each layer's equal part of what staging leaves
    for l, t in zip(layout.layers, thetas):
        assert 0 <= l.top_neurons <= t * F and l.top_neurons % l.block == 0
        assert l.top_neurons + l.block > t * F or l.top_neurons == F  # rounded down by less than one block
        assert 0 <= l.slots <= E
        if l.top_neurons == 0:
            assert l.slots == 0
        elif l.slots < E:
            assert (l.slots + 1) * l.top_bytes > share


@given(case=models_and_budgets())
def test_per_layer_budgets_are_never_exceeded_by_their_layers_cache(case):
    spec, dtype_bytes, budget, theta = case
    L = len(spec.moe_layers)
    per_layer = [max(2, budget // L)] * L
    layout = plan_layout(spec, dtype_bytes=dtype_bytes, budget=per_layer, theta=theta)
    for l, b in zip(layout.layers, per_layer):
        assert l.cache_bytes <= b
        assert l.slots == l.num_experts or l.top_neurons == 0 or (l.slots + 1) * l.top_bytes > b


# --- θ not given: decided here, once for the engine, the simulator and the configurator -------------


def _without_notes(layout):
    return attrs.evolve(layout, notes=())


@pytest.mark.parametrize("budget", ["100%", 1.0, ALL, ALL + 1])
def test_a_budget_that_holds_every_expert_whole_gives_the_dense_layout_when_theta_is_not_given(budget):
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget=budget, theta=None)
    assert layout.staging_experts == 0 and all(l.fully_resident for l in layout.layers)
    assert layout == plan_layout(tiny_spec(), dtype_bytes=2, budget=budget, theta=1.0)


def test_a_budget_short_of_every_expert_splits_at_the_automatic_theta():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget=ALL - 1, theta=None)
    assert [l.theta for l in layout.layers] == [AUTO_THETA] * 3 and layout.staging_experts == 2
    assert layout == _without_notes(plan_layout(tiny_spec(), dtype_bytes=2, budget=ALL - 1, theta=AUTO_THETA))


def test_a_given_theta_is_kept_even_when_the_budget_holds_every_expert():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget="100%", theta=0.5)
    assert all(l.theta == 0.5 and not l.fully_resident for l in layout.layers) and layout.staging_experts == 2


def test_per_layer_budgets_without_theta_cache_whole_experts_only_in_the_layers_that_hold_them_all():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget=[LAYER, LAYER - 1, "100%"], theta=None)
    assert [l.theta for l in layout.layers] == [1.0, AUTO_THETA, 1.0]
    assert layout.staging_experts == 2  # the middle layer still loads


@given(case=models_and_budgets())
def test_theta_not_given_is_whole_experts_exactly_when_the_budget_holds_them_all(case):
    spec, dtype_bytes, budget, _ = case
    L, E, F = len(spec.moe_layers), spec.moe.num_experts, spec.moe.expert_ffn
    fits = budget >= L * E * expert_bytes(F, spec.hidden_size, dtype_bytes)
    expected_theta = 1.0 if fits else AUTO_THETA
    try:
        expected = _without_notes(plan_layout(spec, dtype_bytes=dtype_bytes, budget=budget, theta=expected_theta))
    except BudgetError as e:
        with pytest.raises(BudgetError, match=str(e).split(" is ")[0]):
            plan_layout(spec, dtype_bytes=dtype_bytes, budget=budget, theta=None)
        return
    auto = plan_layout(spec, dtype_bytes=dtype_bytes, budget=budget, theta=None)
    assert auto == expected and auto.notes == ()


# --- θ rounded to whole neuron blocks: said once, or an error where it would cache nothing ------------


def test_a_theta_that_rounds_to_another_block_says_so_once_naming_the_blocks():
    layout = plan_layout(tiny_spec(), dtype_bytes=2, budget="50%", theta=[0.3, 0.3, 0.5])
    assert [str(n) for n in layout.notes] == ["cache.theta 0.3 rounds down to 0.25 (whole 64-neuron blocks of 256 neurons: 0, 0.25, 0.5, 0.75, 1)"]
    assert layout.notes[0].problem() is None  # it still caches: a note, not a refusal


def test_a_wide_expert_lists_only_the_first_blocks():
    layout = plan_layout(tiny_spec(F=320), dtype_bytes=2, budget="50%", theta=0.5)
    assert [str(n) for n in layout.notes] == ["cache.theta 0.5 rounds down to 0.4 (whole 64-neuron blocks of 320 neurons: 0, 0.2, 0.4, ...)"]


@pytest.mark.parametrize("theta", [0.0, 0.25, 0.5, 1.0, None, [0.0, 0.75, 1.0]])
def test_a_theta_on_whole_blocks_or_not_given_has_no_note(theta):
    assert plan_layout(tiny_spec(), dtype_bytes=2, budget="50%", theta=theta).notes == ()


@given(F_blocks=st.integers(1, 12), theta=st.floats(0, 1, allow_nan=False))
def test_a_note_is_given_exactly_when_theta_is_not_whole_blocks_and_a_problem_only_when_it_caches_nothing(F_blocks, theta):
    F = 64 * F_blocks
    layout = plan_layout(tiny_spec(F=F), dtype_bytes=1, budget="100%", theta=theta)
    used = layout.layers[0].theta
    assert used <= theta and (len(layout.notes) == 1) == (used != theta)
    assert [n.problem() is not None for n in layout.notes] == [0 < theta * F < 64] * len(layout.notes)


def test_a_budget_above_a_petabyte_is_an_error_naming_the_limit():
    assert budget_bytes(f"{MAX_BUDGET_BYTES}", 1, "cache.budget") == MAX_BUDGET_BYTES
    for value in ("1e400", f"{MAX_BUDGET_BYTES + 1}", "2048TiB", 10**30):
        with pytest.raises(BudgetError, match=r"^cache\.budget: expected a size of at most 1 PiB"):
            budget_bytes(value, 1, "cache.budget")


@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**20)), min_size=1, max_size=8), st.integers(1, 256))
def test_slots_are_the_tops_a_cache_holds_capped_at_every_expert_alike_for_ints_and_arrays(pairs, experts):
    """One formula for the layout (ints) and the configurators' grids (arrays): min(E, ⌊cache / top⌋), 0 without a top."""
    cache_X, top_X = (np.array(column, dtype=np.int64) for column in zip(*pairs))
    expected = [min(experts, cache // top) if top else 0 for cache, top in pairs]
    assert [slots_for(cache, top, experts) for cache, top in pairs] == expected
    assert all(type(slots_for(cache, top, experts)) is int for cache, top in pairs)
    assert slots_for(cache_X, top_X, experts).tolist() == expected
