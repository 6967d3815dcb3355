"""The `mxfp4` expert format (quant/mxfp4.py) and MXFP4 encoding (quant/mx.py): values the format
holds come back exactly, others within its rounding; GPT-OSS's MXFP4 checkpoints stay compressed
end to end and compute exactly what dequantising them on load computes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.cache.layout import plan_layout
from moepic.cache.stats import total
from moepic.checkpoint.load import load_model
from moepic.cli import main
from moepic.core.packing import pack_expert, packed_bytes
from moepic.core.weights import MoEWeights, SwiGLUWeights
from moepic.quant import QuantizedExpert, build_format
from moepic.quant.mx import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from tests_support import dense_run, policy_for

MXFP4 = build_format("mxfp4")
PROMPT = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]


@given(exponents=st.lists(st.integers(-100, 100), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_values_the_format_holds_come_back_exactly(exponents, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.tensor(FP4_VALUES)[torch.randint(0, 16, (len(exponents), 32), generator=g)]
    codes[:, 5] = -6.0  # the block's largest magnitude sets its scale: 6 · 2^k
    x = (codes * torch.exp2(torch.tensor(exponents, dtype=torch.float32))[:, None]).reshape(-1)
    blocks, scales = quantize_mxfp4(x)
    assert scales.tolist() == [k + 127 for k in exponents]
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), x)


@settings(max_examples=30)
@given(spread=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_other_values_round_to_the_grid_within_two_scales(spread, seed):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * spread
    blocks, scales = quantize_mxfp4(x)
    back = dequantize_mxfp4(blocks, scales, torch.float32)
    scale_RC = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    # spacing ≤ 2 scales (between 4 and 6), so rounding is off by ≤ 1; values past 6 scales clip, by < 2
    assert bool(((back - x).abs() <= 2 * scale_RC).all())
    on_grid = (x / scale_RC).abs() <= 4
    assert bool(((back - x).abs()[on_grid] <= 0.5 * scale_RC[on_grid]).all())


def test_ties_round_to_the_even_code_and_beyond_six_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, 6.0, 7.9] + [0.0] * 22)
    blocks, scales = quantize_mxfp4(x)
    assert scales.item() == 127 + 0  # ⌊log2 7.9⌋ − 2 = 0
    assert dequantize_mxfp4(blocks, scales, torch.float32)[:10].tolist() == [0, 1, 1, 2, 2, 4, 4, -1, 6, 6]


def test_an_expert_splits_at_32_neurons_and_its_segments_decode_as_its_slices():
    g = torch.Generator().manual_seed(0)
    w = SwiGLUWeights.from_projections(torch.randn(96, 64, generator=g), torch.randn(96, 64, generator=g),
                                       torch.randn(64, 96, generator=g), block=32,
                                       gate_bias_F=torch.randn(96, generator=g), up_bias_F=torch.randn(96, generator=g))
    q = MXFP4.encode(w)
    whole = q.dense()
    for a, b in ((0, 32), (32, 96), (0, 96)):
        part = q.neurons(a, b).dense()
        assert torch.equal(part.down_FD, whole.down_FD[a:b]) and torch.equal(part.gate_up_N2BD, whole.gate_up_N2BD[a // 32 : b // 32])
        assert torch.equal(part.gate_up_bias_N2B, whole.gate_up_bias_N2B[a // 32 : b // 32])
    assert packed_bytes(q, 96) == 96 * MXFP4.neuron_bytes(64, True, 4) == 96 * (51 * 64 // 32 + 2 * 4)
    assert torch.equal(pack_expert(q).dense().down_FD, whole.down_FD)
    with pytest.raises(ValueError, match="multiples of 32 neurons"):
        MXFP4.check_shape(64, 96, 16)
    with pytest.raises(ValueError, match="hidden size 48 is not a multiple"):
        MXFP4.check_shape(48, 96, 32)


def routed(model):
    return [e for lw in model.weights.layers if isinstance(lw.ffn, MoEWeights) for e in lw.ffn.experts]


@pytest.fixture(scope="module")
def gpt_oss(checkpoint_dir):
    folder = checkpoint_dir("gpt_oss_mxfp4")
    return (load_model(folder, dtype=torch.float32), load_model(folder, dtype=torch.float32, expert_format=build_format("dense")))


def test_a_gpt_oss_mxfp4_checkpoint_stays_compressed_and_computes_what_dequantising_on_load_does(gpt_oss):
    compressed, dequantised = gpt_oss
    assert all(isinstance(e, QuantizedExpert) and e.format.name == "mxfp4" for e in routed(compressed))
    assert all(isinstance(e, SwiGLUWeights) for e in routed(dequantised))
    for q, d in zip(routed(compressed), routed(dequantised)):
        back = q.dense()
        assert torch.equal(back.gate_FD, d.gate_FD) and torch.equal(back.up_FD, d.up_FD) and torch.equal(back.down_FD, d.down_FD)
        assert torch.equal(back.gate_up_bias_N2B.reshape(-1), d.gate_up_bias_N2B.reshape(-1))
    a = generate(compressed, PROMPT, max_new_tokens=6, eos_ids=(), keep_logits=True)
    b = generate(dequantised, PROMPT, max_new_tokens=6, eos_ids=(), keep_logits=True)
    assert a.token_ids == b.token_ids and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_offloaded_mxfp4_experts_move_their_blocks_and_change_no_bit(gpt_oss, theta):
    model = gpt_oss[0]
    resident, trace = dense_run(model, PROMPT, 6)
    layout = plan_layout(model.spec, dtype_bytes=4, budget=1.0, theta=0.5, expert_format=MXFP4)
    engine = offloaded_experts(model, layout.staging_bytes + layout.expert_bytes // 5, theta, policy=policy_for("lcp", trace))
    offloaded = generate(model, PROMPT, max_new_tokens=6, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == resident.token_ids and all(torch.equal(x, y) for x, y in zip(offloaded.logits, resident.logits))
    stats = total((*engine.prefill_stats.values(), *engine.decode_stats.values()))
    D = model.spec.hidden_size
    assert engine.layout.layers[0].neuron_bytes == 51 * D // 32 + 2 * 4  # 4.25 bits a weight, biases in fp32
    assert stats.misses + stats.partial_hits > 0 and engine.host_to_device_bytes % engine.layout.layers[0].neuron_bytes == 0


def test_quantize_writes_mxfp4_from_a_dense_checkpoint_and_refuses_a_width_it_cannot_block(capsys, checkpoint_dir, tmp_path):
    out = tmp_path / "gpt_oss_mxfp4_from_bf16"
    assert main(["quantize", "--model", str(checkpoint_dir("gpt_oss")), "--format", "mxfp4", "--out", str(out)]) == 0
    model = load_model(out, dtype=torch.float32)
    assert all(isinstance(e, QuantizedExpert) and e.format.name == "mxfp4" for e in routed(model))
    capsys.readouterr()
    assert main(["quantize", "--model", str(checkpoint_dir("mixtral")), "--format", "mxfp4", "--out", str(tmp_path / "x")]) == 2
    assert "mxfp4 experts cut at multiples of 32 neurons; neuron block" in capsys.readouterr().err
