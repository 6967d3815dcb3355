"""Read routing traces logged as JSONL (one record per token and layer) into a RoutingTrace.

The shared Mixtral-8x7B traces (../shared/traces, see its README) have this form: keys `dataset`,
`problem_id`, `layer`, `token_idx`, `experts` (top-k ids, by weight) and `gating_probs`. Records
come layer-major; a few tokens miss layers, and only tokens with every layer are kept.
Side effects: reads one file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moepic.tracing.trace import RoutingTrace, TraceError

_FIELDS = {"problem_id": int, "layer": int, "token_idx": int, "experts": list, "gating_probs": list}


def _record(line: str, where: str) -> dict:
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
            raise TraceError(f"{where}: field {field!r} should be {kind.__name__}, got {value!r}")
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in record["experts"]):
        raise TraceError(f"{where}: field 'experts' should hold non-negative expert ids, got {record['experts']!r}")
    if len(record["gating_probs"]) != len(record["experts"]):
        raise TraceError(f"{where}: 'gating_probs' has {len(record['gating_probs'])} values for {len(record['experts'])} experts")
    return record


def load_jsonl_trace(path: str | Path, *, num_experts: int | None = None, model: str = "") -> RoutingTrace:
    """All complete tokens of the file; `num_experts` defaults to the largest id seen + 1."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    tokens: dict[tuple, dict[int, tuple[list[int], list[float]]]] = {}
    top_k = None
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            r = _record(line, where)
            if top_k is None:
                top_k = len(r["experts"])
            elif len(r["experts"]) != top_k:
                raise TraceError(f"{where}: {len(r['experts'])} experts, but earlier lines have {top_k}")
            key = (str(r.get("dataset", "")), r["problem_id"], r["token_idx"])
            tokens.setdefault(key, {})[r["layer"]] = (r["experts"], r["gating_probs"])
    if not tokens:
        raise TraceError(f"{path}: no routing records")
    layers = sorted({layer for per_layer in tokens.values() for layer in per_layer})
    # Sequences (dataset, problem) numbered in order of first appearance; tokens by position within.
    sequences = {seq: i for i, seq in enumerate(dict.fromkeys(key[:2] for key in tokens))}
    complete = sorted(
        (key for key, per_layer in tokens.items() if len(per_layer) == len(layers)),
        key=lambda key: (sequences[key[:2]], key[2]),
    )
    ids = np.array([[tokens[key][layer][0] for layer in layers] for key in complete], dtype=np.int64)
    weights = np.array([[tokens[key][layer][1] for layer in layers] for key in complete], dtype=np.float32)
    return RoutingTrace(
        model=model,
        moe_layers=tuple(layers),
        num_experts=int(ids.max()) + 1 if num_experts is None else num_experts,
        top_k=top_k,
        expert_ids_NLK=ids,
        weights_NLK=weights,
        sequence_N=np.array([sequences[key[:2]] for key in complete], dtype=np.int32),
        position_N=np.array([key[2] for key in complete], dtype=np.int32),
        prefill_N=np.zeros(len(complete), dtype=bool),
        source=str(path),
    )
