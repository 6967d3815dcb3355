"""What every RoutingTrace holds, and whether it fits the model it is used with. Pure numpy, vectorized
(a 100k-token trace checks in milliseconds).

- On its own, whoever builds it (a loader, the recorder, the synthetic generator, a test):
  RoutingTrace's constructor calls `check_trace`, so a loader gets the checks by building one. A
  broken invariant raises ValueError naming the field, the first offending token (and MoE layer)
  and what was expected; loaders prefix the file. Bounds are on what the file format stores and
  what any model has: they turn an absurd header into one clear line instead of a 43 TiB
  allocation later.
- Against a model, each rule written once for every caller (ConfigError, prefixed by the trace's
  name): `fit_trace_to_model` (a whole trace as a model's routing: the simulator, the ablations),
  `check_trace_covers` (the model layer a trace-reading strategy looks up: static, belady, the
  oracles), `check_same_layers` (a model-wide learner: train-predictor), `require_router_inputs`
  and `router_inputs` (the recorded router inputs a predictor scores: there, and the model's width).
Shapes: N tokens, L MoE layers, K top-k, D model width.
"""

from __future__ import annotations

import numbers

import attrs
import numpy as np

from moepic.errors import ConfigError

MAX_EXPERTS = 2**15  # expert ids are stored as int16
MAX_LAYER = 10_000  # model layer indices; the deepest published models have ~100
MAX_POSITION = 2**31 - 1  # positions and sequence numbers are stored as int32


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_header(moe_layers: tuple, num_experts: object, top_k: object) -> None:
    """The sizes a header declares: each bounded, and top_k ≤ num_experts (a top-k's ids differ)."""
    if not _whole(num_experts) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts: expected an integer in [1, {MAX_EXPERTS}], got {num_experts!r}")
    if not _whole(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an integer in [1, num_experts={num_experts}], got {top_k!r}")
    if not moe_layers or len(moe_layers) > MAX_LAYER:
        raise ValueError(f"moe_layers: expected 1 to {MAX_LAYER} layer indices, got {len(moe_layers)}")
    if not all(_whole(l) and 0 <= l < MAX_LAYER for l in moe_layers):
        raise ValueError(f"moe_layers: expected layer indices in [0, {MAX_LAYER}), got {_short(list(moe_layers))}")
    if any(a >= b for a, b in zip(moe_layers, moe_layers[1:])):
        raise ValueError(f"moe_layers: expected increasing layer indices, got {_short(list(moe_layers))}")


def check_shapes(N: int, L: int, K: int, arrays: dict[str, tuple | None]) -> None:
    """Each field's shape (a tuple; None: absent) against [N, L, K]; `hidden` is [N, L, D]."""
    expected = {"expert_ids": (N, L, K), "weights": (N, L, K), "sequence": (N,), "position": (N,), "prefill": (N,)}
    for name, want in expected.items():
        if arrays[name] != want:
            raise ValueError(f"field {name!r} has shape {arrays[name]}, expected {want}")
    hidden = arrays.get("hidden")
    if hidden is not None and (len(hidden) != 3 or hidden[:2] != (N, L)):
        raise ValueError(f"field 'hidden' has shape {hidden}, expected ({N}, {L}, D)")


def check_dtypes(dtypes: dict[str, np.dtype | None]) -> None:
    """Ids and positions integers (a float id would be silently truncated), weights floats, prefill bool."""
    kinds = {"expert_ids": ("iu", "integers"), "sequence": ("iu", "integers"), "position": ("iu", "integers"),
             "weights": ("f", "floats"), "prefill": ("b", "booleans"), "hidden": ("f", "floats")}
    for name, (kind, words) in kinds.items():
        dtype = dtypes.get(name)
        if dtype is not None and dtype.kind not in kind:
            raise ValueError(f"field {name!r} has dtype {dtype}, expected {words}")


def check_trace(trace) -> None:
    """All of the above for a built RoutingTrace, then its values (see the module docstring)."""
    check_header(trace.moe_layers, trace.num_experts, trace.top_k)
    fields = {"expert_ids": trace.expert_ids_NLK, "weights": trace.weights_NLK, "sequence": trace.sequence_N,
              "position": trace.position_N, "prefill": trace.prefill_N, "hidden": trace.hidden_NLD}
    check_dtypes({name: None if a is None else np.asarray(a).dtype for name, a in fields.items()})
    check_shapes(len(trace.sequence_N), len(trace.moe_layers), trace.top_k,
                 {name: None if a is None else np.shape(a) for name, a in fields.items()})
    _check_routing(trace.expert_ids_NLK, trace.weights_NLK, trace.num_experts, trace.moe_layers)
    _check_order(trace.sequence_N, trace.position_N)


def _check_routing(ids_NLK: np.ndarray, weights_NLK: np.ndarray, num_experts: int, moe_layers: tuple) -> None:
    """Whole-array reductions first (a reduction over the tiny K axis is 50x slower); the first bad
    (token, layer) is looked for only once something is wrong."""

    def fail(bad_NLK: np.ndarray, field: str, values_NLK: np.ndarray, expected: str):
        n, column = np.argwhere(bad_NLK.any(-1))[0]
        raise ValueError(f"field {field!r}: token {n}, layer {moe_layers[column]} has "
                         f"{values_NLK[n, column].tolist()}, expected {expected}")

    if not ids_NLK.size:
        return
    if ids_NLK.min() < 0 or ids_NLK.max() >= num_experts:
        fail((ids_NLK < 0) | (ids_NLK >= num_experts), "expert_ids", ids_NLK, f"ids in [0, {num_experts}) (num_experts)")
    for shift in range(1, ids_NLK.shape[-1]):  # every pair of a top-k, as the pairs `shift` apart: no sort
        same_NLK = ids_NLK[..., shift:] == ids_NLK[..., :-shift]
        if same_NLK.any():
            fail(same_NLK, "expert_ids", ids_NLK, f"{ids_NLK.shape[-1]} different experts")
    if not (weights_NLK.min() >= 0 and weights_NLK.max() < np.inf):  # NaN fails both comparisons
        fail(~(np.isfinite(weights_NLK) & (weights_NLK >= 0)), "weights", weights_NLK, "finite values >= 0")


def _check_order(sequence_N: np.ndarray, position_N: np.ndarray) -> None:
    """One record per (sequence, position): each sequence's tokens together, positions increasing."""
    for name, values in (("sequence", sequence_N), ("position", position_N)):
        outside = np.flatnonzero((values < 0) | (values > MAX_POSITION))
        if outside.size:
            n = outside[0]
            raise ValueError(f"field {name!r}: token {n} has {name} {values[n]}, expected [0, {MAX_POSITION}]")
    if len(sequence_N) < 2:
        return
    same = sequence_N[1:] == sequence_N[:-1]
    starts = np.r_[0, np.flatnonzero(~same) + 1]  # the first token of each run of one sequence
    _, first_run = np.unique(sequence_N[starts], return_index=True)
    if len(first_run) < len(starts):  # a sequence id that starts a second run: interleaved
        again = np.setdiff1d(np.arange(len(starts)), first_run)[0]
        n = starts[again]
        raise ValueError(f"field 'sequence': token {n} returns to sequence {sequence_N[n]} after sequence "
                         f"{sequence_N[n - 1]}, expected each sequence's tokens together")
    behind = np.flatnonzero(same & (position_N[1:] <= position_N[:-1]))
    if behind.size:
        n = behind[0] + 1
        what = "repeats" if position_N[n] == position_N[n - 1] else "comes after"
        raise ValueError(f"field 'position': token {n} (sequence {sequence_N[n]}, position {position_N[n]}) {what} "
                         f"position {position_N[n - 1]}, expected one token per position, in increasing order")


# -- the trace against a model ---------------------------------------------------------------------


def fit_trace_to_model(trace, spec, where: str, *, model: str):
    """`trace` as the routing of `spec` (a ModelSpec): the same number of MoE layers and top-k, expert
    ids within the model's, renumbered to the model's layer indices and expert count (a JSONL log
    only knows the ids it saw). `where` names the trace, `model` the model ("the model shape X")."""
    moe = spec.moe
    if len(trace.moe_layers) != len(spec.moe_layers):
        raise ConfigError(f"{where}: the trace has {len(trace.moe_layers)} MoE layers, {model} has {len(spec.moe_layers)}")
    if trace.top_k != moe.top_k:
        raise ConfigError(f"{where}: the trace routes top-{trace.top_k}, {model} top-{moe.top_k}")
    largest = int(trace.expert_ids_NLK.max()) if trace.num_tokens else -1
    if largest >= moe.num_experts:
        raise ConfigError(f"{where}: the trace has expert ids up to {largest}, but {model} has {moe.num_experts} experts")
    if trace.num_experts > moe.num_experts:
        raise ConfigError(f"{where}: the trace declares {trace.num_experts} experts, {model} has {moe.num_experts}")
    return attrs.evolve(trace, moe_layers=spec.moe_layers, num_experts=moe.num_experts)


def check_trace_covers(where: str, trace, layer: int, num_experts: int) -> int:
    """The trace column of model layer `layer`, which must have `num_experts` experts."""
    if layer not in trace.moe_layers or num_experts != trace.num_experts:
        raise ConfigError(
            f"{where}: trace has MoE layers {sorted(trace.moe_layers)} with {trace.num_experts} experts; "
            f"the model's layer {layer} has {num_experts}"
        )
    return trace.moe_layers.index(layer)


def check_same_layers(where: str, trace, spec) -> None:
    """The trace routes exactly `spec`'s MoE layers and experts (what a model-wide learner needs)."""
    if tuple(trace.moe_layers) != tuple(spec.moe_layers) or trace.num_experts != spec.moe.num_experts:
        raise ConfigError(
            f"{where}: trace has MoE layers {list(trace.moe_layers)} with {trace.num_experts} experts; "
            f"the model has {list(spec.moe_layers)} with {spec.moe.num_experts}"
        )


def require_router_inputs(trace, where: str, problem: str) -> None:
    """The trace must hold its router inputs ('hidden'); `problem` says what cannot be done without
    them and how to get them (the message is `where: problem`)."""
    if trace.hidden_NLD is None:
        raise ConfigError(f"{where}: {problem}")


def router_inputs(trace, hidden_size: int, where: str) -> np.ndarray:
    """The trace's recorded router inputs [N, L, D], which must be the model's width D (a trace of
    another model's would fail deep inside a matmul). `where` names the trace; it must have them."""
    hidden_NLD = trace.hidden_NLD
    width = hidden_NLD.shape[2] if hidden_NLD.ndim == 3 else None
    if width != hidden_size:
        got = f"{width} wide" if width is not None else f"of shape {tuple(hidden_NLD.shape)}, not [N, L, D]"
        raise ConfigError(f"{where}: the trace's router inputs ('hidden') are {got}; the model's hidden size is {hidden_size}")
    return hidden_NLD


def clipped(value: object) -> str:
    """repr(value), cut to one readable piece of an error line (a file may hold a huge value)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _short(values: list) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, … ({len(values)} values)]"
