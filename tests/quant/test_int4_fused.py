"""The `int4-fused` format (moepic/quant/int4_fused.py, int4_tiles.py): torch's CPU int4 kernel
layouts, the offset quantization's bound, the fused host path against the decoded weights, files
kept in one layout whatever the machine's, and the errors a bad setting gets."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.checkpoint.stored_experts import expert_file_tensors, read_stored_expert
from moepic.core.ffn import swiglu
from moepic.core.packing import flat_buffer, pack_expert, packed_bytes
from moepic.core.spec import SILU
from moepic.quant import build_format
from moepic.quant.int4_fused import dequantize_offset, quantize_offset
from moepic.quant.int4_tiles import CANONICAL, KNOWN, TileLayout, kernel_layout
from tests.quant.test_expert_formats import GPT_OSS, FakeCheckpoint, expert

needs_kernel = pytest.mark.skipif(kernel_layout() is None, reason="this torch has no fused CPU int4 kernel in a known layout")


# 1. tiles ------------------------------------------------------------------------------------------


@given(layout=st.sampled_from(KNOWN), tiles=st.integers(1, 3), K=st.sampled_from([2, 8, 64]), seed=st.integers(0, 2**16))
def test_tiling_round_trips_and_retiling_keeps_the_codes(layout, tiles, K, seed):
    codes = torch.randint(0, 16, (2, tiles * 64, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = layout.tile(codes)
    assert packed.shape == (2, tiles * 64, K // 2) and packed.dtype == torch.uint8
    assert torch.equal(layout.untile(packed), codes)
    for other in KNOWN:
        assert torch.equal(other.untile(layout.retile(packed, other)), codes)


@needs_kernel
def test_this_process_tiles_as_torchs_own_converter_does():
    codes = torch.randint(0, 16, (192, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(kernel_layout().tile(codes), torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))


@pytest.mark.parametrize("capability,expected", [("AVX2", TileLayout(32, False)), ("DEFAULT", TileLayout(32, True))])
def test_each_cpu_capability_is_probed_to_its_own_layout(capability, expected):
    """torch dispatches its kernel by CPU capability; a process limited to another one lays codes
    out as that kernel reads them (and files still hold CANONICAL's)."""
    if capability == "AVX2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2 to limit torch to")
    probe = "from moepic.quant.int4_tiles import kernel_layout; print(repr(kernel_layout()))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == repr(expected)


def test_a_tile_of_the_wrong_height_is_refused():
    with pytest.raises(ValueError, match="tiles of 64 rows need a multiple of 64 rows"):
        CANONICAL.tile(torch.zeros(32, 8, dtype=torch.uint8))


# 2. the offset quantization ---------------------------------------------------------------------


@settings(max_examples=60)
@given(group=st.sampled_from([32, 64, 128]), spread=st.sampled_from([1e-3, 1.0, 50.0]), shift=st.sampled_from([0.0, 3.0]),
       seed=st.integers(0, 2**16))
def test_a_decoded_weight_lies_within_half_a_step_plus_the_offsets_rounding(group, spread, shift, seed):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(seed)) * spread + shift * spread
    codes, sz = quantize_offset(w, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and sz.dtype == torch.bfloat16
    back = dequantize_offset(codes, sz)
    s, z = sz[..., 0].float(), sz[..., 1].float()
    low = w.view(8, -1, group).amin(-1)
    bound = s / 2 + (z - (low + 8 * s)).abs()  # the docstring's bound, from the stored values
    error = (back - w).view(8, -1, group).abs().amax(-1)
    assert bool((error <= bound * (1 + 1e-5) + 1e-7).all())


def test_a_constant_group_comes_back_as_its_value_in_bfloat16():
    w = torch.cat([torch.zeros(1, 64), torch.full((1, 64), 0.3)])
    back = dequantize_offset(*quantize_offset(w, 64))
    assert torch.equal(back[0], torch.zeros(64))
    assert torch.equal(back[1], torch.full((64,), 0.3).bfloat16().float())


# 3. the fused host path --------------------------------------------------------------------------


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(D=st.sampled_from([64, 128, 256]), blocks=st.integers(1, 4), group=st.sampled_from([32, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), biased=st.booleans(), tokens=st.integers(1, 5),
       data=st.data())
def test_the_fused_kernel_computes_what_the_decoded_weights_do(D, blocks, group, dtype, biased, tokens, data):
    F, seed = 64 * blocks, data.draw(st.integers(0, 2**16))
    q = build_format({"name": "int4-fused", "group_size": group}).encode(
        expert(D, F, 64, dtype, biased, seed, spread=0.1, activation=GPT_OSS if biased else SILU))
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    start = data.draw(st.integers(0, blocks - 1)) * 64
    segment = q.neurons(start, F)
    fused = swiglu(x, segment)
    assert fused.dtype == dtype and fused.shape == (tokens, D)
    decoded = swiglu(x.float(), segment.dense()).to(dtype)
    # The kernel runs on bfloat16 activations: agreement to bfloat16 rounding, not bit for bit.
    torch.testing.assert_close(fused.float(), decoded.float(), atol=2e-2 * float(decoded.abs().max()) + 1e-3, rtol=2e-2)


@needs_kernel
def test_the_fused_path_is_deterministic_and_a_split_sums_to_the_whole():
    q = build_format("int4-fused").encode(expert(128, 256, 64, torch.float32, False, 5, spread=0.1))
    x = torch.randn(3, 128)
    whole = swiglu(x, q)
    assert torch.equal(whole, swiglu(x, q))
    halves = swiglu(x, q.neurons(0, 128)) + swiglu(x, q.neurons(128, 256))
    torch.testing.assert_close(halves, whole, atol=1e-2 * float(whole.abs().max()), rtol=1e-2)  # bfloat16 outputs


def test_a_process_whose_kernel_reads_another_layout_decodes_instead(monkeypatch):
    fmt = build_format("int4-fused")
    q = fmt.encode(expert(64, 64, 64, torch.float32, False, 1, spread=0.1))
    other = next(layout for layout in KNOWN if layout != fmt.tiles)
    monkeypatch.setattr(fmt, "tiles", other)  # as if the codes were laid out for another machine's kernel
    assert fmt.fused_swiglu(torch.randn(1, 64), q) is None


# 4. bytes, packing, files ---------------------------------------------------------------------------


@pytest.mark.parametrize("group,per_neuron", [(32, 1.5 * 256 + 12 * 256 / 32), (64, 1.5 * 256 + 12 * 256 / 64)])
def test_a_neuron_is_a_byte_and_a_half_of_codes_per_weight_row_and_its_groups_scales(group, per_neuron):
    fmt = build_format({"name": "int4-fused", "group_size": group})
    assert fmt.neuron_bytes(256, False, 2) == per_neuron
    q = fmt.encode(expert(256, 128, 64, torch.bfloat16, False, 2))
    assert packed_bytes(q, 128) == 128 * per_neuron == flat_buffer(pack_expert(q)).numel()


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("machine", KNOWN)
def test_files_keep_canonical_tiles_and_read_back_into_any_machines_layout_at_any_block(monkeypatch, machine, biased):
    D, F = 128, 256
    writer = build_format("int4-fused")
    monkeypatch.setattr(writer, "tiles", TileLayout(32, True))  # written by a machine without AVX
    q = writer.encode(expert(D, F, 64, torch.bfloat16, biased, 4, spread=0.1, activation=GPT_OSS))
    files = expert_file_tensors("m.experts.1", q)
    reader = build_format("int4-fused")
    monkeypatch.setattr(reader, "tiles", machine)
    spec = SimpleNamespace(hidden_size=D, moe=SimpleNamespace(expert_ffn=F, expert_bias=biased, activation=GPT_OSS))
    back = read_stored_expert(FakeCheckpoint(files), "m.experts.1", reader, spec, torch.bfloat16, 128, "cpu")
    assert back.block == 128
    written, read = q.dense(), back.dense()
    for rows in ("gate_FD", "up_FD", "down_FD"):
        assert torch.equal(getattr(written, rows), getattr(read, rows))
    if biased:
        assert torch.equal(written.gate_up_bias_N2B.transpose(0, 1).flatten(1), read.gate_up_bias_N2B.transpose(0, 1).flatten(1))
    canonical = build_format("int4-fused")
    monkeypatch.setattr(canonical, "tiles", CANONICAL)
    assert all(torch.equal(files[k], v) for k, v in expert_file_tensors("m.experts.1", canonical.encode(
        expert(D, F, 64, torch.bfloat16, biased, 4, spread=0.1, activation=GPT_OSS))).items())


# 5. errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [16, 48, 512])
def test_a_group_size_the_kernel_does_not_take_is_refused(group):
    from moepic.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="group_size one of 32, 64, 128, 256"):
        build_format({"name": "int4-fused", "group_size": group})


@pytest.mark.parametrize("D,F,block,message", [(96, 64, 64, "hidden size 96"), (128, 96, 32, "multiples of 64 neurons")])
def test_a_shape_off_the_tiles_is_refused(D, F, block, message):
    with pytest.raises(ValueError, match=message):
        build_format("int4-fused").check_shape(D, F, block)
