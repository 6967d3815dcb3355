"""RoutingTrace: per token and per MoE layer, the routed experts and their weights. Pure data + file I/O.

File format (`.npz`, numpy's zip of arrays, read with allow_pickle=False — never unpickled):
  header          0-d unicode array holding JSON: {"format": "moepic-routing-trace", "version": 1,
                  "model", "moe_layers", "num_experts", "top_k", "source"}
  expert_ids      int16 [N, L, K]  routed expert ids, per token, per MoE layer, in top-k order
  weights         float32 [N, L, K] their routing weights
  sequence        int32 [N]        which request/problem each token belongs to
  position        int32 [N]        the token's position in its sequence
  prefill         bool [N]         routed during the prompt's prefill (False: a decode step)
  hidden          float16/32 [N, L, D], optional: each MoE layer's router input
Shapes: N tokens, L MoE layers (their model layer indices in `moe_layers`), K top-k, D model width.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import attrs
import numpy as np

from moepic.errors import MoepicError

FORMAT, VERSION = "moepic-routing-trace", 1


class TraceError(MoepicError):
    """A trace file that cannot be read: the message names the file and the field or line."""


@attrs.frozen(eq=False)
class RoutingTrace:
    model: str
    moe_layers: tuple[int, ...] = attrs.field(converter=tuple)
    num_experts: int
    top_k: int
    expert_ids_NLK: np.ndarray
    weights_NLK: np.ndarray
    sequence_N: np.ndarray
    position_N: np.ndarray
    prefill_N: np.ndarray
    hidden_NLD: np.ndarray | None = None
    source: str = ""

    def __attrs_post_init__(self) -> None:
        N, L, K = (len(self.sequence_N), len(self.moe_layers), self.top_k)
        expected = {
            "expert_ids": (self.expert_ids_NLK, (N, L, K)),
            "weights": (self.weights_NLK, (N, L, K)),
            "position": (self.position_N, (N,)),
            "prefill": (self.prefill_N, (N,)),
        }
        for name, (array, shape) in expected.items():
            if array.shape != shape:
                raise ValueError(f"trace field {name!r} has shape {array.shape}, expected {shape}")
        if self.hidden_NLD is not None and self.hidden_NLD.shape[:2] != (N, L):
            raise ValueError(f"trace field 'hidden' has shape {self.hidden_NLD.shape}, expected ({N}, {L}, D)")
        if N and not (0 <= self.expert_ids_NLK.min() and self.expert_ids_NLK.max() < self.num_experts):
            raise ValueError(f"trace expert ids must lie in [0, {self.num_experts})")

    @property
    def num_tokens(self) -> int:
        return len(self.sequence_N)

    def header(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "moe_layers": list(self.moe_layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "source": self.source,
        }


def save_trace(trace: RoutingTrace, path: str | Path) -> None:
    arrays = {
        "header": np.array(json.dumps(trace.header())),
        "expert_ids": trace.expert_ids_NLK.astype(np.int16),
        "weights": trace.weights_NLK.astype(np.float32),
        "sequence": trace.sequence_N.astype(np.int32),
        "position": trace.position_N.astype(np.int32),
        "prefill": trace.prefill_N.astype(bool),
    }
    if trace.hidden_NLD is not None:
        arrays["hidden"] = trace.hidden_NLD
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
        np.savez_compressed(f, **arrays)


def load_trace(path: str | Path) -> RoutingTrace:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise TraceError(f"{path}: trace file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise TraceError(f"{path}: not a moepic trace (.npz) file ({e})") from None
    for field in ("header", "expert_ids", "weights", "sequence", "position", "prefill"):
        if field not in arrays:
            raise TraceError(f"{path}: missing field {field!r}")
    try:
        header = json.loads(str(arrays["header"]))
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}: field 'header' is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise TraceError(f"{path}: header does not declare format {FORMAT!r} version {VERSION}")
    try:
        return RoutingTrace(
            model=str(header["model"]),
            moe_layers=tuple(int(l) for l in header["moe_layers"]),
            num_experts=int(header["num_experts"]),
            top_k=int(header["top_k"]),
            expert_ids_NLK=arrays["expert_ids"].astype(np.int64),
            weights_NLK=arrays["weights"],
            sequence_N=arrays["sequence"],
            position_N=arrays["position"],
            prefill_N=arrays["prefill"],
            hidden_NLD=arrays.get("hidden"),
            source=str(header.get("source", "")),
        )
    except KeyError as e:
        raise TraceError(f"{path}: header misses key {e}") from None
    except (ValueError, TypeError) as e:
        raise TraceError(f"{path}: {e}") from None
