"""Row-by-row matmuls (moepic/core/rows.py): each row of a batch is what that row alone gives —
through F.linear (with a bias, in every float dtype) and `@` — on the machine the tests run on,
while a plain matmul over several rows may round them otherwise (why the module exists)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.core import rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 9), K=st.sampled_from([8, 32, 128, 1024]), N=st.sampled_from([4, 96, 640]),
       dtype=st.sampled_from(DTYPES), biased=st.booleans(), seed=st.integers(0, 2**16))
def test_each_row_is_what_it_would_be_alone(T, K, N, dtype, biased, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(T, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if biased else None
    together = rows.linear(x, w, b, rowwise=True)
    assert torch.equal(together, torch.cat([F.linear(x[t : t + 1], w, b) for t in range(T)]))
    w_KN = torch.randn(K, N, generator=g).to(dtype)
    assert torch.equal(rows.matmul(x, w_KN, rowwise=True), torch.cat([x[t : t + 1] @ w_KN for t in range(T)]))


def test_without_rowwise_it_is_the_plain_matmul():
    x, w, b = torch.randn(5, 64), torch.randn(32, 64), torch.randn(32)
    assert torch.equal(rows.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(rows.matmul(x, w.t()), x @ w.t())


def test_a_plain_matmul_over_rows_is_not_promised_to_match_them_alone():
    """Why rowwise exists: on this CPU some shape rounds a row of a multi-row float32 product
    otherwise than the row alone (if none does, the premise is gone and this test says so)."""
    g = torch.Generator().manual_seed(0)
    differs = []
    for K, N in ((32, 96), (128, 640), (2048, 1536)):
        x, w = torch.randn(8, K, generator=g), torch.randn(N, K, generator=g)
        differs.append(not torch.equal(F.linear(x, w), torch.cat([F.linear(x[t : t + 1], w) for t in range(8)])))
    assert any(differs)
