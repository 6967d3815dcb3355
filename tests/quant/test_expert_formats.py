"""Expert formats (moepic/quant/format.py, dense.py, group_format.py): encode/decode within the
format's bound, segments that commute with decoding, packing into one byte buffer, bytes per
neuron, the checkpoint file layout at any neuron block, and the errors a bad setting gets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moepic.checkpoint.stored_experts import expert_file_tensors, read_stored_expert
from moepic.core.packing import flat_buffer, flat_views, pack_expert, packed_bytes
from moepic.core.spec import SILU, GatedActivation
from moepic.core.weights import SwiGLUWeights
from moepic.errors import ConfigError
from moepic.quant import QuantizedExpert, build_format, format_of

GPT_OSS = GatedActivation(alpha=1.702, limit=7.0, up_offset=1.0)
DTYPES = [torch.float32, torch.bfloat16]


def expert(D: int, F: int, block: int, dtype: torch.dtype, biased: bool, seed: int, spread: float = 1.0,
           activation: GatedActivation = SILU) -> SwiGLUWeights:
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(F, D, generator=g) * spread for _ in range(2))
    down = torch.randn(D, F, generator=g) * spread
    biases = {}
    if biased:
        biases = dict(gate_bias_F=torch.randn(F, generator=g).to(dtype), up_bias_F=torch.randn(F, generator=g).to(dtype))
    return SwiGLUWeights.from_projections(gate.to(dtype), up.to(dtype), down.to(dtype), block=block,
                                          activation=activation, **biases)


@st.composite
def settings_(draw, blocks=(4, 8), dense: bool = False):
    """(format, D, F, block, dtype, biased, seed) for a small expert the format can store."""
    names = ["int8", "int4"] + (["dense"] if dense else [])
    name = draw(st.sampled_from(names))
    D = draw(st.sampled_from([16, 32, 64]))
    block = draw(st.sampled_from(blocks))
    F = draw(st.sampled_from([f for f in (8, 16, 48) if f % block == 0]))
    if name == "dense":
        fmt = build_format("dense")
    else:
        group = draw(st.sampled_from([g for g in (2, 4, 8, 16, 32, 64) if D % g == 0]))
        fmt = build_format({"name": name, "group_size": group, "symmetric": draw(st.booleans())})
    return fmt, D, F, block, draw(st.sampled_from(DTYPES)), draw(st.booleans()), draw(st.integers(0, 2**16))


def named_parts(q: QuantizedExpert) -> dict[str, torch.Tensor]:
    parts = q.format.parts(q.hidden, q.block, q.dtype, q.biased)
    assert len(parts) == len(q.parts)
    return {p.name: t for p, t in zip(parts, q.parts, strict=True)}


def assert_same_weights(a: SwiGLUWeights, b: SwiGLUWeights) -> None:
    assert len(a.tensors) == len(b.tensors)
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)
    assert a.activation == b.activation


# 1. decode(encode(w)) is within the format's bound of w -----------------------------------------


@given(setting=settings_(), spread=st.sampled_from([1e-2, 1.0, 30.0]), gpt_oss=st.booleans())
def test_decoded_weights_lie_within_half_their_groups_stored_scale(setting, spread, gpt_oss):
    fmt, D, F, block, dtype, biased, seed = setting
    activation = GPT_OSS if gpt_oss else SILU
    w = expert(D, F, block, dtype, biased, seed, spread, activation)
    q = fmt.encode(w)
    assert isinstance(q, QuantizedExpert) and q.format is fmt and format_of(q) is fmt
    assert (q.ffn_size, q.block, q.hidden, q.dtype, q.biased, q.activation) == (F, block, D, dtype, biased, activation)
    for part, t in zip(fmt.parts(D, block, dtype, biased), q.parts, strict=True):
        assert t.dtype == part.dtype and tuple(t.shape) == (F // block, *part.per_block)
    back = q.dense()
    # On the CPU the kernels run in float32 (QuantizedExpert.kernel_dtype); decoding in the compute dtype
    # rounds the float32 values once more.
    assert back.dtype == q.kernel_dtype == torch.float32
    assert torch.equal(fmt.decode(q, dtype).down_FD, back.down_FD.to(dtype))
    assert back.gate_up_N2BD.shape == w.gate_up_N2BD.shape and back.down_FD.shape == w.down_FD.shape
    assert back.activation == activation
    named, g = named_parts(q), fmt.config.group_size
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    for name, original, decoded in (("gate_up", w.gate_up_N2BD, back.gate_up_N2BD), ("down", w.down_FD, back.down_FD)):
        orig_RD, back_RD = original.reshape(-1, D).float(), decoded.reshape(-1, D).float()
        scales_RD = named[f"{name}_scales"].reshape(-1, D // g).float().repeat_interleave(g, dim=1)
        bound_RD = scales_RD / 2 * (1 + 1e-5) + 1e-30 + eps * (orig_RD.abs() + scales_RD)
        err = (back_RD - orig_RD).abs()
        assert bool((err <= bound_RD).all()), f"{name}: worst excess {(err - bound_RD).max().item():.3g}"
    if biased:
        assert back.gate_up_bias_N2B.dtype == torch.float32  # stored in the compute dtype, exact in float32
        assert torch.equal(back.gate_up_bias_N2B, w.gate_up_bias_N2B.float())
    else:
        assert back.gate_up_bias_N2B is None


def test_a_weight_on_the_grid_comes_back_exactly():
    # Symmetric int4 groups of 4 whose largest magnitude is 7: scale 1, every integer in [-7, 7] on the grid.
    gate = torch.tensor([[7.0, -3.0, 0.0, 1.0], [2.0, -7.0, 5.0, 4.0]])
    w = SwiGLUWeights.from_projections(gate, -gate, gate.t().contiguous(), block=2)
    back = build_format({"name": "int4", "group_size": 4}).encode(w).dense()
    assert_same_weights(back, w)


# 2. a segment commutes with decoding --------------------------------------------------------------


@given(setting=settings_(), data=st.data())
def test_a_segment_decodes_to_the_same_segment_of_the_decoded_expert(setting, data):
    fmt, D, F, block, dtype, biased, seed = setting
    q = fmt.encode(expert(D, F, block, dtype, biased, seed))
    a = data.draw(st.integers(0, F // block)) * block
    b = data.draw(st.integers(a // block, F // block)) * block
    segment = q.neurons(a, b)
    assert segment.ffn_size == b - a
    assert_same_weights(segment.dense(), q.dense().neurons(a, b))
    if b > a:  # views, no copy
        for part, whole in zip(segment.parts, q.parts, strict=True):
            assert part.data_ptr() == whole.data_ptr() + (a // block) * whole.stride(0) * whole.element_size()


@pytest.mark.parametrize("a,b", [(2, 8), (0, 6), (8, 4), (-8, 8), (0, 24)])
def test_a_segment_off_the_blocks_or_out_of_range_is_refused(a, b):
    q = build_format("int8").encode(expert(64, 16, 4, torch.float32, False, 0))
    with pytest.raises(ValueError, match="neuron-block boundaries"):
        q.neurons(a, b)


# 3. packing into one byte buffer ------------------------------------------------------------------


@given(setting=settings_(dense=True), data=st.data())
def test_a_packed_expert_is_one_byte_buffer_of_its_neuron_bytes(setting, data):
    fmt, D, F, block, dtype, biased, seed = setting
    q = fmt.encode(expert(D, F, block, dtype, biased, seed))
    assert format_of(q) is fmt or fmt.name == "dense"
    packed = pack_expert(q)
    assert type(packed) is type(q)
    assert len(packed.tensors) == len(q.tensors)
    for p, t in zip(packed.tensors, q.tensors, strict=True):
        assert p.dtype == t.dtype and p.shape == t.shape and torch.equal(p, t)
    flat = flat_buffer(packed)
    assert flat is not None and flat.dtype == torch.uint8 and flat.dim() == 1
    assert flat.numel() == packed_bytes(q, F) == fmt.neuron_bytes(D, biased, dtype.itemsize) * F
    for t in packed.tensors:  # every part starts aligned for its dtype
        assert (t.data_ptr() - flat.data_ptr()) % t.element_size() == 0

    top = data.draw(st.integers(0, F // block)) * block
    nbytes = packed_bytes(q, top)
    assert nbytes == fmt.neuron_bytes(D, biased, dtype.itemsize) * top
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    views = flat_views(buffer, top, q)
    for dst, src in zip(views.tensors, q.neurons(0, top).tensors, strict=True):
        dst.copy_(src)
    if top:
        assert flat_buffer(views).data_ptr() == buffer.data_ptr()
    if fmt.quantized:
        assert views.ffn_size == top
        assert_same_weights(views.dense(), q.neurons(0, top).dense())
    else:
        assert_same_weights(views, q.neurons(0, top))


def test_a_packed_buffer_must_be_bytes():
    q = build_format("int4").encode(expert(64, 8, 4, torch.float32, False, 1))
    with pytest.raises(TypeError, match="byte buffer"):
        flat_views(torch.zeros(packed_bytes(q, 8) // 4, dtype=torch.float32), 8, q)


@pytest.mark.parametrize("D", [16, 64, 4096])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_a_dense_neuron_is_three_rows_and_two_biases(D, biased, itemsize):
    assert build_format("dense").neuron_bytes(D, biased, itemsize) == (3 * D + (2 if biased else 0)) * itemsize


def test_dense_is_stored_as_the_weights_themselves_and_has_nothing_to_decode():
    fmt = build_format("dense")
    w = expert(16, 8, 4, torch.float32, True, 2)
    assert fmt.encode(w) is w and not fmt.quantized and format_of(w).name == "dense"
    with pytest.raises(TypeError, match="nothing to decode"):
        fmt.decode(w, torch.float32)


# 4. bytes per neuron ------------------------------------------------------------------------------


def expected_neuron_bytes(D: int, bits: int, group: int, symmetric: bool, biased: bool, itemsize: int) -> int:
    groups = 3 * D // group
    return 3 * D * bits // 8 + 2 * groups + (0 if symmetric else groups) + (2 * itemsize if biased else 0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_int4_takes_fewer_bytes_than_int8_than_dense(symmetric, biased, itemsize):
    D, g = 128, 64
    nbytes = {}
    for name, bits in (("int4", 4), ("int8", 8)):
        fmt = build_format({"name": name, "group_size": g, "symmetric": symmetric})
        nbytes[name] = fmt.neuron_bytes(D, biased, itemsize)
        assert nbytes[name] == expected_neuron_bytes(D, bits, g, symmetric, biased, itemsize)
    nbytes["dense"] = build_format("dense").neuron_bytes(D, biased, 2)
    assert nbytes["int4"] < nbytes["int8"] < nbytes["dense"]
    if not biased and itemsize == 2:  # spelled out once
        assert (nbytes["int4"], nbytes["int8"], nbytes["dense"]) == ((204, 396, 768) if symmetric else (210, 402, 768))


@given(name=st.sampled_from(["int8", "int4"]), D=st.sampled_from([16, 32, 64, 128, 256]), data=st.data(),
       symmetric=st.booleans(), biased=st.booleans(), itemsize=st.sampled_from([2, 4]))
def test_neuron_bytes_follow_the_definition(name, D, data, symmetric, biased, itemsize):
    bits = 8 if name == "int8" else 4
    group = data.draw(st.sampled_from([g for g in (2, 4, 8, 16, 32, 64, 128) if D % g == 0]))
    fmt = build_format({"name": name, "group_size": group, "symmetric": symmetric})
    assert fmt.neuron_bytes(D, biased, itemsize) == expected_neuron_bytes(D, bits, group, symmetric, biased, itemsize)


# 5. the checkpoint file layout --------------------------------------------------------------------


def random_part(part, blocks: int, g: torch.Generator) -> torch.Tensor:
    shape = (blocks, *part.per_block)
    if part.dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(part.dtype)
    info = torch.iinfo(part.dtype)
    return torch.randint(info.min, info.max + 1, shape, generator=g, dtype=torch.int64).to(part.dtype)


@given(setting=settings_(dense=True))
def test_every_part_round_trips_through_its_file_layout(setting):
    fmt, D, F, block, dtype, biased, seed = setting
    g = torch.Generator().manual_seed(seed)
    other = 1 if block == 4 else 4
    for part, same in zip(fmt.parts(D, block, dtype, biased), fmt.parts(D, other, dtype, biased), strict=True):
        t = random_part(part, F // block, g)
        stored = part.to_file(t)
        assert tuple(stored.shape) == part.file_shape(F, block) and stored.is_contiguous()
        assert same.name == part.name and same.file_shape(F, other) == part.file_shape(F, block)  # whatever the block
        back = part.from_file(stored, block)
        assert back.dtype == t.dtype and back.is_contiguous() and torch.equal(back, t)


def test_the_file_layout_of_gate_up_is_gate_rows_then_up_rows():
    fmt = build_format({"name": "int8", "group_size": 8})
    w = expert(16, 8, 4, torch.float32, True, 3)
    files = expert_file_tensors("e", fmt.encode(w))
    whole = fmt.encode(SwiGLUWeights.from_projections(w.gate_FD, w.up_FD, w.down_FD.t(), block=8,
                                                      gate_bias_F=w.gate_up_bias_N2B[:, 0].reshape(-1),
                                                      up_bias_F=w.gate_up_bias_N2B[:, 1].reshape(-1)))
    # One block of all F neurons: its gate rows then its up rows are the file's two halves.
    assert torch.equal(files["e.gate_up"], named_parts(whole)["gate_up"][0])
    assert torch.equal(files["e.gate_up_bias"][0], w.gate_up_bias_N2B[:, 0].reshape(-1))
    assert torch.equal(files["e.gate_up_bias"][1], w.gate_up_bias_N2B[:, 1].reshape(-1))


@given(setting=settings_(blocks=(4,)))
def test_a_file_written_at_one_block_reads_back_at_another(setting):
    fmt, D, F, block, dtype, biased, seed = setting
    w = expert(D, F, 4, dtype, biased, seed)
    q4 = fmt.encode(w)
    files = expert_file_tensors("x.experts.0", q4)
    parts8 = fmt.parts(D, 8, dtype, biased)
    assert set(files) == {f"x.experts.0.{p.name}" for p in parts8}
    tensors = []
    for part in parts8:
        stored = files[f"x.experts.0.{part.name}"]
        assert tuple(stored.shape) == part.file_shape(F, 8) and stored.dtype == part.dtype
        t = part.from_file(stored, 8)
        assert tuple(t.shape) == (F // 8, *part.per_block)
        tensors.append(t)
    q8 = QuantizedExpert(fmt, tuple(tensors), 8, D, dtype, w.activation, biased)
    assert q8.ffn_size == F
    # Quantization is per neuron row, so encoding at block 8 stores the very same parts.
    for mine, direct in zip(q8.parts, fmt.encode(expert(D, F, 8, dtype, biased, seed)).parts, strict=True):
        assert torch.equal(mine, direct)
    back4, back8 = q4.dense(), q8.dense()
    assert back8.block == 8
    for rows in ("gate_FD", "up_FD", "down_FD"):
        assert torch.equal(getattr(back8, rows), getattr(back4, rows))
    if biased:
        assert torch.equal(back8.gate_up_bias_N2B.reshape(-1, 2, 8).transpose(0, 1).reshape(2, F),
                           back4.gate_up_bias_N2B.reshape(-1, 2, 4).transpose(0, 1).reshape(2, F))


class FakeCheckpoint:
    """What `read_stored_expert` asks of a checkpoint reader, over a dict of file tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def read(self, name, shape, dtype):
        t = self.tensors[name]
        assert tuple(t.shape) == tuple(shape)
        return t.to(dtype)

    def read_stored(self, name, shape, dtype):
        t = self.tensors[name]
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype
        return t


@pytest.mark.parametrize("name,symmetric", [("int8", True), ("int8", False), ("int4", True), ("int4", False)])
@pytest.mark.parametrize("biased", [False, True])
def test_read_stored_expert_reads_what_expert_file_tensors_wrote_at_another_block(name, symmetric, biased):
    D, F = 32, 16
    fmt = build_format({"name": name, "group_size": 8, "symmetric": symmetric})
    q4 = fmt.encode(expert(D, F, 4, torch.bfloat16, biased, 4, activation=GPT_OSS))
    # Float parts as a checkpoint might keep them (float32), read back in the part's dtype.
    files = {k: (v.float() if v.dtype.is_floating_point else v) for k, v in expert_file_tensors("m.experts.2", q4).items()}
    spec = SimpleNamespace(hidden_size=D, moe=SimpleNamespace(expert_ffn=F, expert_bias=biased, activation=GPT_OSS))
    q8 = read_stored_expert(FakeCheckpoint(files), "m.experts.2", fmt, spec, torch.bfloat16, 8, "cpu")
    assert (q8.block, q8.ffn_size, q8.hidden, q8.dtype, q8.biased, q8.activation) == (8, F, D, torch.bfloat16, biased, GPT_OSS)
    back4, back8 = q4.dense(), q8.dense()
    for rows in ("gate_FD", "up_FD", "down_FD"):
        assert torch.equal(getattr(back8, rows), getattr(back4, rows))


# 6. errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("group_size", [0, -4])
def test_a_group_size_below_one_is_refused(name, group_size):
    with pytest.raises((ConfigError, ValueError), match="group_size"):
        build_format({"name": name, "group_size": group_size})


def test_an_unknown_format_names_the_known_ones():
    with pytest.raises(ConfigError, match="int3") as e:
        build_format("int3")
    for known in ("dense", "int8", "int4"):
        assert known in str(e.value)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("D,group", [(32, 24), (16, 32), (64, 48)])
def test_a_group_size_that_does_not_divide_the_width_is_refused(name, D, group):
    fmt = build_format({"name": name, "group_size": group})
    with pytest.raises(ValueError, match="does not divide"):
        fmt.encode(expert(D, 8, 4, torch.float32, False, 5))
    with pytest.raises(ValueError, match="does not divide"):
        fmt.check_shape(D, 8, 4)


@pytest.mark.parametrize("D,group", [(48, 3), (16, 1), (64, 1)])
def test_int4_needs_even_groups(D, group):
    fmt = build_format({"name": "int4", "group_size": group})
    with pytest.raises(ValueError, match="even"):
        fmt.encode(expert(D, 8, 4, torch.float32, False, 6))
    build_format({"name": "int8", "group_size": group}).encode(expert(D, 8, 4, torch.float32, False, 6))  # int8 takes them


def test_a_block_that_does_not_divide_the_ffn_is_refused():
    with pytest.raises(ValueError, match="neuron block 16 of an FFN 24 wide"):
        build_format("int8").check_shape(64, 24, 16)
