"""Trace invariants (moepic.tracing.checks) and fail-safe trace files: every corruption of a valid trace
is refused with one line naming the field (and the file, when loaded), a .npz's sizes are checked
before its data is read, JSONL records are checked line by line, and saving is all or nothing."""

from __future__ import annotations

import errno
import io
import json
import tracemalloc
import zipfile

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.outputs import OutputError
from moepic.tracing import RoutingTrace, TraceError, load_any_trace, load_trace, save_trace
from moepic.tracing.jsonl import load_jsonl_trace
from tests_support import traces

FIELDS = {"expert_ids": "expert_ids_NLK", "weights": "weights_NLK", "sequence": "sequence_N",
          "position": "position_N", "prefill": "prefill_N"}


def arrays_of(trace: RoutingTrace) -> dict[str, np.ndarray]:
    """The arrays save_trace writes, by field name (hidden included where recorded)."""
    arrays = {name: getattr(trace, attr) for name, attr in FIELDS.items()}
    return arrays | ({} if trace.hidden_NLD is None else {"hidden": trace.hidden_NLD})


def write_npz(path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path.open("wb"), header=np.array(json.dumps(header)), **arrays)


def corrupt(trace: RoutingTrace, kind: str, data) -> tuple[dict[str, np.ndarray], str] | None:
    """`trace`'s arrays with one invariant broken at a drawn place, and the field the error must name;
    None where the trace is too small for this kind of corruption."""
    a = {name: np.array(value) for name, value in arrays_of(trace).items()}
    N, L, K = a["expert_ids"].shape
    pick = lambda n: data.draw(st.integers(0, n - 1))  # noqa: E731
    if kind in ("id out of range", "negative id", "fractional id", "repeated id", "bad weight"):
        if not N or (kind == "repeated id" and K < 2):
            return None
        n, l, k = pick(N), pick(L), pick(K)
        if kind == "id out of range":
            a["expert_ids"][n, l, k] = trace.num_experts + data.draw(st.integers(0, 5))
        elif kind == "negative id":
            a["expert_ids"][n, l, k] = -1
        elif kind == "fractional id":
            a["expert_ids"] = a["expert_ids"].astype(np.float64)
            a["expert_ids"][n, l, k] += 0.5
        elif kind == "repeated id":
            a["expert_ids"][n, l, k] = a["expert_ids"][n, l, (k + 1) % K]
        else:
            a["weights"][n, l, k] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.25]))
        return a, "weights" if kind == "bad weight" else "expert_ids"
    if kind == "negative position":
        if not N:
            return None
        a["position"][pick(N)] = -data.draw(st.integers(1, 2**20))
        return a, "position"
    # Positions out of order or repeated, or a sequence resumed after another: needs a neighbour.
    same = np.flatnonzero(a["sequence"][1:] == a["sequence"][:-1]) + 1
    if kind == "position not increasing":
        if not same.size:
            return None
        n = same[pick(same.size)]
        a["position"][n] = a["position"][n - 1] - data.draw(st.integers(0, a["position"][n - 1]))
        return a, "position"
    if kind == "interleaved sequences":
        starts = np.flatnonzero(a["sequence"][1:] != a["sequence"][:-1]) + 1
        if not starts.size:
            return None
        a["sequence"] = np.r_[a["sequence"], a["sequence"][0]]  # one more token of the first sequence, last
        for name in ("expert_ids", "weights", "position", "prefill", "hidden"):
            if name in a:
                a[name] = np.concatenate([a[name], a[name][:1]])
        a["position"][-1] = a["position"].max() + 1
        return a, "sequence"
    raise AssertionError(kind)


KINDS = ["id out of range", "negative id", "fractional id", "repeated id", "bad weight", "negative position",
         "position not increasing", "interleaved sequences"]


@settings(max_examples=60)
@given(trace=traces(), kind=st.sampled_from(KINDS), data=st.data())
def test_any_single_corruption_of_a_valid_trace_is_refused_naming_its_field(tmp_path_factory, trace, kind, data):
    broken = corrupt(trace, kind, data)
    if broken is None:
        return
    arrays, field = broken
    with pytest.raises(ValueError, match=f"^field '{field}'"):  # built in code
        RoutingTrace(**{**attrs.asdict(trace, recurse=False), **{FIELDS.get(k, "hidden_NLD"): v for k, v in arrays.items()}})
    path = tmp_path_factory.mktemp("corrupt") / "t.npz"
    write_npz(path, trace.header(), arrays)
    with pytest.raises(TraceError, match=f"^{path}: field '{field}'") as err:  # or read from a file
        load_trace(path)
    assert "\n" not in str(err.value)


@given(trace=traces())
def test_a_valid_trace_survives_the_checks_unchanged_through_save_and_load(tmp_path_factory, trace):
    path = tmp_path_factory.mktemp("valid") / "t.npz"
    save_trace(trace, path)
    loaded = load_trace(path)
    for name, value in arrays_of(trace).items():
        np.testing.assert_array_equal(arrays_of(loaded)[name], value, err_msg=name)
    assert loaded.header() == trace.header()


def small_trace(N: int = 4) -> RoutingTrace:
    return RoutingTrace(
        model="m", moe_layers=(0, 2), num_experts=4, top_k=2,
        expert_ids_NLK=np.tile([[0, 1], [2, 3]], (N, 1, 1)), weights_NLK=np.full((N, 2, 2), 0.5, np.float32),
        sequence_N=np.zeros(N, np.int32), position_N=np.arange(N, dtype=np.int32), prefill_N=np.zeros(N, bool),
    )


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_experts": 10**12}, r"header key num_experts: expected an integer in \[1, 32768\], got 1000000000000$"),
        ({"num_experts": 1e12}, r"header key 'num_experts' should be int, got 1000000000000.0$"),
        ({"top_k": 10**9}, r"header key top_k: expected an integer in \[1, num_experts=4\], got 1000000000$"),
        ({"moe_layers": [0, 10**9]}, r"header key moe_layers: expected layer indices in \[0, 10000\), got \[0, 1000000000\]$"),
        ({"moe_layers": [2, 0]}, r"header key moe_layers: expected increasing layer indices, got \[2, 0\]$"),
        ({"moe_layers": list(range(3))}, r"field 'expert_ids' has shape \(4, 2, 2\), expected \(4, 3, 2\)$"),
        ({"model": 7}, r"header key 'model' should be str, got 7$"),
    ],
)
def test_an_absurd_or_mistyped_header_is_refused_before_any_array_is_read(tmp_path, monkeypatch, change, message):
    from moepic.tracing import npz

    path = tmp_path / "t.npz"
    trace = small_trace()
    write_npz(path, trace.header() | change, arrays_of(trace))
    read = npz.read
    monkeypatch.setattr(npz, "read", lambda archive, m: read(archive, m) if m.info.filename == "header.npy" else 1 / 0)
    with pytest.raises(TraceError, match=f"^{path}: {message}"):
        load_trace(path)


def zip_with(path, members: dict[str, tuple[dict, bytes | int]]) -> None:
    """A .npz whose members have the .npy header `header` and `data` (bytes, or that many zero bytes,
    streamed: never held in memory)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, (header, data) in members.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    for start in range(0, data, 1 << 22):
                        f.write(bytes(min(1 << 22, data - start)))


def npy_header(a: np.ndarray) -> dict:
    return np.lib.format.header_data_from_array_1_0(a)


def npy_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def test_arrays_that_inflate_to_a_size_the_header_does_not_allow_are_refused_without_allocating(tmp_path):
    """A small file whose weights inflate to 64 MiB of zeros, more tokens than `sequence` has: refused
    from the .npy headers, with no buffer of that size allocated."""
    trace = small_trace()
    members = {name: (npy_header(a), npy_bytes(a)) for name, a in arrays_of(trace).items()}
    members["header"] = (npy_header(np.array(json.dumps(trace.header()))), npy_bytes(np.array(json.dumps(trace.header()))))
    big = 2**24 // 4  # tokens of 2 layers × top-2 float32: 64 MiB
    members["weights"] = ({"descr": "<f4", "fortran_order": False, "shape": (big, 2, 2)}, big * 16)
    path = tmp_path / "bomb.npz"
    zip_with(path, members)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(TraceError, match=rf"^{path}: field 'weights' has shape \({big}, 2, 2\), expected \(4, 2, 2\)$"):
            load_trace(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**22


def test_a_member_header_claiming_more_data_than_the_member_holds_is_refused(tmp_path):
    trace = small_trace()
    members = {name: (npy_header(a), npy_bytes(a)) for name, a in arrays_of(trace).items()}
    header = np.array(json.dumps(trace.header()))
    members["header"] = (npy_header(header), npy_bytes(header))
    members["sequence"] = ({"descr": "<i4", "fortran_order": False, "shape": (10**12,)}, npy_bytes(trace.sequence_N))
    zip_with(tmp_path / "t.npz", members)
    with pytest.raises(TraceError, match=r"field 'sequence' claims shape \(1000000000000,\) of int32 \(4000000000000 bytes\), "
                                         r"but its member holds 16 bytes$"):
        load_trace(tmp_path / "t.npz")


@pytest.mark.parametrize(
    "hidden,message",
    [
        (np.zeros((4, 8), np.float32), r"field 'hidden' has shape \(4, 8\), expected \(4, 2, D\)$"),
        (np.zeros((4, 2, 8), np.int64), r"field 'hidden' has dtype int64, expected floats$"),
        (np.array([{"a": 1}] * 4, dtype=object), r"field 'hidden' holds Python objects \(pickled data\), which moepic never loads$"),
    ],
)
def test_a_misshaped_or_pickled_hidden_field_is_named(tmp_path, hidden, message):
    trace = small_trace()
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array(json.dumps(trace.header())), **arrays_of(trace), hidden=hidden)
    (tmp_path / "t.npz").write_bytes(buffer.getvalue())
    with pytest.raises(TraceError, match=f"^{tmp_path / 't.npz'}: {message}"):
        load_trace(tmp_path / "t.npz")


def test_a_trace_saved_before_dropped_tokens_was_recorded_still_loads(tmp_path):
    trace = small_trace()
    header = {k: v for k, v in trace.header().items() if k != "dropped_tokens"}
    write_npz(tmp_path / "old.npz", header, arrays_of(trace))
    assert load_trace(tmp_path / "old.npz").dropped_tokens == 0


# --- saving: all or nothing ----------------------------------------------------------------------


def failing_writer(after_bytes: int, error: BaseException):
    """A stand-in for np.savez_compressed that writes `after_bytes` bytes, then fails."""

    def write(f, **arrays):
        f.write(b"x" * after_bytes)
        raise error

    return write


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_old_trace_intact_and_no_partial_file(tmp_path, monkeypatch, error):
    path = tmp_path / "t.npz"
    save_trace(small_trace(4), path)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez_compressed", failing_writer(40_000, error))
    with pytest.raises(OutputError if isinstance(error, OSError) else KeyboardInterrupt) as err:
        save_trace(small_trace(6), path)
    if isinstance(error, OSError):
        assert str(err.value) == f"{path}: cannot write the trace (No space left on device)"
    assert path.read_bytes() == before and load_trace(path).num_tokens == 4
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]


def test_a_failed_first_save_leaves_no_file_that_could_load_as_a_trace(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "savez_compressed", failing_writer(40_000, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OutputError):
        save_trace(small_trace(), tmp_path / "t.npz")
    assert list(tmp_path.iterdir()) == []


# --- JSONL: each record checked on its line ------------------------------------------------------


def record(token=0, layer=0, experts=(0, 1), probs=(0.6, 0.4), **extra) -> str:
    return json.dumps({"dataset": "d", "problem_id": 0, "token_idx": token, "layer": layer,
                       "experts": list(experts), "gating_probs": list(probs)} | extra)


def log(*records: str) -> str:
    return "\n".join(records) + "\n"


GOOD = [record(t, l, experts=((t + l) % 4, (t + l + 1) % 4)) for t in range(3) for l in range(2)]


@pytest.mark.parametrize(
    "line,message",
    [
        (record(1, 1, experts=(2, 3)), r"a second record for dataset 'd', problem 0, token 1, layer 1 \(the first is line 4\)"),
        (record(5, 0, experts=(3, 3)), r"field 'experts' names an expert twice: \[3, 3\]"),
        (record(5, 0).replace("0.6", "NaN"), r"field 'gating_probs' should hold finite numbers >= 0, got \[nan, 0.4\]"),
        (record(5, 0).replace("0.6", "Infinity"), r"field 'gating_probs' should hold finite numbers >= 0, got \[inf, 0.4\]"),
        (record(5, 0, probs=(1.2, -0.2)), r"field 'gating_probs' should hold finite numbers >= 0, got \[1.2, -0.2\]"),
        (record(5, 0, probs=("a", 0.4)), r"field 'gating_probs' should hold finite numbers >= 0, got \['a', 0.4\]"),
        (record(-1, 0), r"field 'token_idx' should be in \[0, 2147483647\], got -1"),
        (record(2**31, 0), r"field 'token_idx' should be in \[0, 2147483647\], got 2147483648"),
        (record(5, 10**9), r"field 'layer' should be in \[0, 9999\], got 1000000000"),
        (record(5, 0, experts=(1e30, 1)), r"field 'experts' should hold expert ids in \[0, 32768\), got \[1e\+30, 1\]"),
        (record(5, 0, experts=(10**30, 1)), r"field 'experts' should hold expert ids in \[0, 32768\), got \[1000000000000000000000000000000, 1\]"),
        (record(5, 0, experts=(1.0, 2)), r"field 'experts' should hold expert ids in \[0, 32768\), got \[1.0, 2\]"),
        (record(5, 0, experts=(), probs=()), r"field 'experts' should hold expert ids in \[0, 32768\), got \[\]"),
    ],
)
def test_a_bad_jsonl_record_is_named_by_its_line(tmp_path, line, message):
    path = tmp_path / "log.jsonl"
    path.write_text(log(*GOOD, line))
    with pytest.raises(TraceError, match=f"^{path}:7: {message}$"):
        load_jsonl_trace(path)


def test_a_stray_expert_id_does_not_silently_make_a_larger_trace(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(log(*GOOD[:-1], record(2, 1, experts=(99, 0))))
    with pytest.raises(TraceError, match=rf"^{path}: expert ids reach 99, but 95 of the ids 0-99 never occur \(e.g. 4, 5, 6\), "
                                         r"so the expert count cannot be inferred as 100: check the file for a stray id, "
                                         r"or give the model \(.*\)$"):
        load_any_trace(path)
    # The model's expert count, where a command knows it, names the line.
    with pytest.raises(TraceError, match=rf"^{path}:6: field 'experts' should hold expert ids in \[0, 8\) \(the model's experts\), "
                                         r"got \[99, 0\]$"):
        load_any_trace(path, num_experts=8)
    path.write_text(log(*GOOD))
    assert load_any_trace(path).num_experts == 4 and load_any_trace(path, num_experts=8).num_experts == 8


def test_incomplete_tokens_are_dropped_and_counted_but_a_mostly_incomplete_log_is_refused(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(log(*GOOD, record(3, 0)))  # token 3 misses layer 1
    trace = load_jsonl_trace(path)
    assert trace.num_tokens == 3 and trace.dropped_tokens == 1
    save_trace(trace, tmp_path / "t.npz")
    assert load_trace(tmp_path / "t.npz").dropped_tokens == 1
    # One stray layer-7 record: every other token now misses a layer.
    path.write_text(log(*GOOD, record(0, 7)))
    with pytest.raises(TraceError, match=rf"^{path}: only 1 of its 3 tokens have a record for each of its 3 layers \(0-7\); "
                                         r"layer 7 has records for 1 tokens$"):
        load_jsonl_trace(path)
