"""GGUF's block quantizations (moepic/quant/ggml.py) against the `gguf` package's own reference
dequantisation, bit for bit, on any bytes a block can hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf", reason="the gguf package (a test dependency) is the reference")
from gguf import quants  # noqa: E402

from moepic.quant.ggml import BLOCKS, dequantize_ggml  # noqa: E402

# Where each kind keeps its float16 factors: random bytes there could be NaN or Inf, which no file holds.
HALVES = {"Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(kind: str, n: int, seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, nbytes = BLOCKS[kind]
    blocks = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    for col in HALVES[kind]:
        halves = (rng.standard_normal(n) * scale).astype(np.float16)
        blocks[:, col : col + 2] = np.frombuffer(halves.tobytes(), dtype=np.uint8).reshape(n, 2)
    return blocks


@settings(max_examples=40)
@given(kind=st.sampled_from(sorted(BLOCKS)), n=st.integers(1, 40), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-4, 1e-2, 1.0, 100.0]))
def test_every_block_dequantises_as_the_gguf_reference(kind, n, seed, scale):
    blocks = random_blocks(kind, n, seed, scale)
    weights, _ = BLOCKS[kind]
    want = quants.dequantize(blocks.reshape(-1), getattr(gguf.GGMLQuantizationType, kind)).reshape(n, weights)
    got = dequantize_ggml(torch.from_numpy(blocks), kind).numpy()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_q8_0_blocks_gguf_writes_come_back_within_half_a_step():
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    blocks = quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(-1, BLOCKS["Q8_0"][1])
    back = dequantize_ggml(torch.from_numpy(blocks), "Q8_0").numpy().reshape(8, 64)
    step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127  # d = max|x| / 127
    # half a step, plus d's rounding to float16 (2^-11 relative) times the largest code
    assert np.all(np.abs(back.reshape(-1, 32) - x.reshape(-1, 32)) <= step * (0.5 + 127 * 2.0**-11))


@pytest.mark.parametrize("blocks,kind,message", [
    (torch.zeros(2, 34, dtype=torch.uint8), "Q5_K", "GGUF block type 'Q5_K' is not read; read: Q8_0, Q4_K, Q6_K"),
    (torch.zeros(2, 33, dtype=torch.uint8), "Q8_0", r"Q8_0 blocks are \[n, 34\] uint8, got \[2, 33\] torch.uint8"),
    (torch.zeros(2, 144), "Q4_K", r"Q4_K blocks are \[n, 144\] uint8, got \[2, 144\] torch.float32"),
])
def test_bad_blocks_are_named(blocks, kind, message):
    with pytest.raises(ValueError, match=message):
        dequantize_ggml(blocks, kind)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 4), spread=st.sampled_from([1e-3, 1.0, 100.0]), seed=st.integers(0, 2**16))
def test_mxfp4_blocks_turned_into_ocp_layout_decode_to_the_gguf_packages_values_bit_for_bit(rows, blocks, spread, seed):
    """GGUF's MXFP4 (GPT-OSS files) kept as the `mxfp4` format: the same values, nibbles reordered."""
    from moepic.quant.ggml import mxfp4_as_mx
    from moepic.quant.mx import dequantize_mxfp4

    w = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * spread).astype(np.float32)
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.MXFP4)
    codes, scales = mxfp4_as_mx(torch.from_numpy(q))
    assert codes.shape == (rows, blocks, 16) and scales.shape == (rows, blocks)
    ours = dequantize_mxfp4(codes, scales, torch.float32).reshape(rows, -1)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.MXFP4)))


def test_mxfp4_rows_of_partial_blocks_are_refused():
    from moepic.quant.ggml import mxfp4_as_mx

    with pytest.raises(ValueError, match="MXFP4 rows are whole 17-byte blocks"):
        mxfp4_as_mx(torch.zeros(2, 20, dtype=torch.uint8))
