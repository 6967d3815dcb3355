"""Read routing traces logged as JSONL (one record per token and layer) into a RoutingTrace.

The shared Mixtral-8x7B traces (../shared/traces, see its README) have this form: keys `dataset`,
`problem_id`, `layer`, `token_idx`, `experts` (top-k ids, by weight) and `gating_probs`. Records
come layer-major; a few tokens miss layers, and only tokens with every layer are kept (the trace's
`dropped_tokens` counts the others). Each record is checked as it is read, so an error names its
line: ids and indices bounded (moepic.tracing.checks), distinct ids in a top-k, finite weights >= 0,
one record per (dataset, problem, token, layer). Without `num_experts` the expert count is the
largest id + 1, and only if every id below it occurs: one stray id must not make a 100-expert trace.
Side effects: reads one file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from moepic.tracing.checks import MAX_EXPERTS, MAX_LAYER, MAX_POSITION, clipped
from moepic.tracing.trace import RoutingTrace, TraceError

_FIELDS = {"problem_id": int, "layer": int, "token_idx": int, "experts": list, "gating_probs": list}
_BOUNDS = {"layer": MAX_LAYER - 1, "token_idx": MAX_POSITION}


def _record(line: str, where: str, num_experts: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise TraceError(f"{where}: expected a JSON object")
    for field, kind in _FIELDS.items():
        value = record.get(field)
        if value is None:
            raise TraceError(f"{where}: missing field {field!r}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TraceError(f"{where}: field {field!r} should be {kind.__name__}, got {clipped(value)}")
    for field, high in _BOUNDS.items():
        if not 0 <= record[field] <= high:
            raise TraceError(f"{where}: field {field!r} should be in [0, {high}], got {clipped(record[field])}")
    # Built-ins over whole lists (map, min, sum run in C): per-element Python checks doubled load time.
    experts, probs = record["experts"], record["gating_probs"]
    if not experts or set(map(type, experts)) != {int} or min(experts) < 0 or max(experts) >= num_experts:
        expected = f"[0, {num_experts})" + (" (the model's experts)" if num_experts < MAX_EXPERTS else "")
        raise TraceError(f"{where}: field 'experts' should hold expert ids in {expected}, got {clipped(experts)}")
    if len(set(experts)) != len(experts):
        raise TraceError(f"{where}: field 'experts' names an expert twice: {experts}")
    if len(probs) != len(experts):
        raise TraceError(f"{where}: 'gating_probs' has {len(probs)} values for {len(experts)} experts")
    # A NaN or inf makes the sum non-finite (NaN compares false, so min() alone could miss it).
    if not set(map(type, probs)) <= {int, float} or not math.isfinite(sum(probs)) or min(probs) < 0:
        raise TraceError(f"{where}: field 'gating_probs' should hold finite numbers >= 0, got {clipped(probs)}")
    return record


def load_jsonl_trace(path: str | Path, *, num_experts: int | None = None, model: str = "") -> RoutingTrace:
    """All complete tokens of the file, in order of problem and position. `num_experts`: the model's
    expert count (ids must lie below it); without it, the largest id + 1 if every smaller id occurs."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    tokens: dict[tuple, dict[int, tuple[list[int], list[float], int]]] = {}
    top_k = None
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            r = _record(line, where, MAX_EXPERTS if num_experts is None else num_experts)
            if top_k is None:
                top_k = len(r["experts"])
            elif len(r["experts"]) != top_k:
                raise TraceError(f"{where}: {len(r['experts'])} experts, but earlier lines have {top_k}")
            key = (str(r.get("dataset", "")), r["problem_id"], r["token_idx"])
            per_layer = tokens.setdefault(key, {})
            if r["layer"] in per_layer:
                raise TraceError(f"{where}: a second record for dataset {key[0]!r}, problem {key[1]}, token {key[2]}, "
                                 f"layer {r['layer']} (the first is line {per_layer[r['layer']][2]})")
            per_layer[r["layer"]] = (r["experts"], r["gating_probs"], number)
    if not tokens:
        raise TraceError(f"{path}: no routing records")
    layers = sorted({layer for per_layer in tokens.values() for layer in per_layer})
    # Sequences (dataset, problem) numbered in order of first appearance; tokens by position within.
    sequences = {seq: i for i, seq in enumerate(dict.fromkeys(key[:2] for key in tokens))}
    complete = sorted(
        (key for key, per_layer in tokens.items() if len(per_layer) == len(layers)),
        key=lambda key: (sequences[key[:2]], key[2]),
    )
    if len(complete) * 2 < len(tokens):  # a few incomplete tokens are normal; most is a broken log
        seen = {layer: sum(layer in per_layer for per_layer in tokens.values()) for layer in layers}
        rarest = min(layers, key=seen.__getitem__)
        raise TraceError(f"{path}: only {len(complete)} of its {len(tokens)} tokens have a record for each of its "
                         f"{len(layers)} layers ({layers[0]}-{layers[-1]}); layer {rarest} has records for {seen[rarest]} tokens")
    ids = np.array([[tokens[key][layer][0] for layer in layers] for key in complete], dtype=np.int64)
    weights = np.array([[tokens[key][layer][1] for layer in layers] for key in complete], dtype=np.float32)
    return RoutingTrace(
        model=model,
        moe_layers=tuple(layers),
        num_experts=_inferred_experts(ids, path) if num_experts is None else num_experts,
        top_k=top_k,
        expert_ids_NLK=ids,
        weights_NLK=weights,
        sequence_N=np.array([sequences[key[:2]] for key in complete], dtype=np.int32),
        position_N=np.array([key[2] for key in complete], dtype=np.int32),
        prefill_N=np.zeros(len(complete), dtype=bool),
        source=str(path),
        dropped_tokens=len(tokens) - len(complete),
    )


def _inferred_experts(ids: np.ndarray, path: Path) -> int:
    """The largest id + 1, if every id below it occurs; else a stray id is likelier than dead experts."""
    used = np.bincount(ids.ravel())
    never = np.flatnonzero(used == 0)
    if never.size:
        raise TraceError(
            f"{path}: expert ids reach {len(used) - 1}, but {never.size} of the ids 0-{len(used) - 1} never occur "
            f"(e.g. {', '.join(map(str, never[:3]))}), so the expert count cannot be inferred as {len(used)}: "
            f"check the file for a stray id, or give the model (--model)"
        )
    return len(used)
