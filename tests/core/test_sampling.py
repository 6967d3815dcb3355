"""Greedy, temperature and nucleus sampling; seeds reproduce draws."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.core.sampling import nucleus, sample_next_token


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample_next_token(logits, greedy=True).item() == 1


def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.zeros(1000)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_next_token(logits, greedy=False, generator=g).item() for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@given(probs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30), top_p=st.floats(0.01, 1.0))
def test_nucleus_keeps_the_smallest_top_set_reaching_top_p(probs, top_p):
    p = torch.tensor(probs, dtype=torch.float64) + 1e-3
    p = p / p.sum()
    kept = nucleus(p, top_p)
    assert torch.isclose(kept.sum(), torch.tensor(1.0, dtype=torch.float64))
    support = kept > 0
    assert support.any()
    # Every kept token is at least as likely as every dropped one.
    if (~support).any():
        assert p[support].min() >= p[~support].max()
    # The kept set reaches top_p, and without its least likely member it would not.
    mass = p[support].sum()
    assert mass >= top_p - 1e-9 or support.all()
    assert mass - p[support].min() < top_p + 1e-9


def test_sampling_never_picks_a_token_outside_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {sample_next_token(logits, greedy=False, top_p=0.7, generator=g).item() for _ in range(300)}
    assert picks == {0, 1}


def test_low_temperature_concentrates_on_the_argmax():
    logits = torch.tensor([1.0, 1.5, 0.0])
    g = torch.Generator().manual_seed(0)
    picks = [sample_next_token(logits, greedy=False, temperature=0.01, generator=g).item() for _ in range(50)]
    assert set(picks) == {1}


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_sampling_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        sample_next_token(torch.zeros(4), greedy=False, **kwargs)
