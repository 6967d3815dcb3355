"""RoutingTrace: per token and per MoE layer, the routed experts and their weights. Pure data + file I/O.

File format (`.npz`, numpy's zip of arrays, read with allow_pickle=False — never unpickled):
  header          0-d unicode array holding JSON: {"format": "moepic-routing-trace", "version": 1,
                  "model", "moe_layers", "num_experts", "top_k", "source", "dropped_tokens"}
  expert_ids      int16 [N, L, K]  routed expert ids, per token, per MoE layer, in top-k order
  weights         float32 [N, L, K] their routing weights
  sequence        int32 [N]        which request/problem each token belongs to
  position        int32 [N]        the token's position in its sequence
  prefill         bool [N]         routed during the prompt's prefill (False: a decode step)
  hidden          float16/32 [N, L, D], optional: each MoE layer's router input
Shapes: N tokens, L MoE layers (their model layer indices in `moe_layers`), K top-k, D model width.
Loading reads each array's shape from its .npy header first (moepic.tracing.npz) and checks them all
(moepic.tracing.checks) before reading data; saving is all or nothing (moepic.outputs).
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import attrs
import numpy as np

from moepic.errors import MoepicError
from moepic.outputs import atomic_output
from moepic.tracing import npz
from moepic.tracing.checks import check_dtypes, check_header, check_shapes, check_trace, clipped

FORMAT, VERSION = "moepic-routing-trace", 1
FIELDS = ("expert_ids", "weights", "sequence", "position", "prefill")  # `hidden` is optional
_MAX_HEADER_BYTES = 1 << 20  # the JSON header: a few hundred bytes in practice


class TraceError(MoepicError):
    """A trace file that cannot be read: the message names the file and the field or line."""


@attrs.frozen(eq=False)
class RoutingTrace:
    """Checked on construction (moepic.tracing.checks): ids in range and distinct within a top-k,
    finite weights, one token per (sequence, position) in order. A ValueError names what is wrong."""

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
    dropped_tokens: int = 0  # tokens of the source left out (a JSONL log's tokens missing some layer)

    def __attrs_post_init__(self) -> None:
        check_trace(self)

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
            "dropped_tokens": self.dropped_tokens,
        }


def save_trace(trace: RoutingTrace, path: str | Path) -> None:
    """All or nothing (moepic.outputs): a failure leaves an older file at `path` as it was."""
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
    with atomic_output(path, "trace") as f:  # a file object, so numpy does not append ".npz" to the name
        np.savez_compressed(f, **arrays)


def load_trace(path: str | Path) -> RoutingTrace:
    """A trace saved by `save_trace`. Every size is checked against the others (and against what the
    file holds) before any array is read; a bad file raises TraceError naming it and the field."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            members = npz.members(archive)
            for field in ("header", *FIELDS):
                if field not in members:
                    raise TraceError(f"{path}: missing field {field!r}")
            header = _header(npz.read(archive, _header_member(members["header"])), path)
            wanted = ("hidden", *FIELDS) if "hidden" in members else FIELDS
            check_dtypes({name: members[name].dtype for name in wanted})
            if len(members["sequence"].shape) != 1:
                raise ValueError(f"field 'sequence' has shape {members['sequence'].shape}, expected (N,)")
            N, L, K = members["sequence"].shape[0], len(header["moe_layers"]), header["top_k"]
            check_shapes(N, L, K, {name: members[name].shape for name in wanted})
            arrays = {name: npz.read(archive, members[name]) for name in wanted}
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise TraceError(f"{path}: not a moepic trace (.npz) file ({e})") from None
    except ValueError as e:
        raise TraceError(f"{path}: {e}") from None
    try:
        return RoutingTrace(
            expert_ids_NLK=arrays["expert_ids"].astype(np.int64),
            weights_NLK=arrays["weights"],
            sequence_N=arrays["sequence"],
            position_N=arrays["position"],
            prefill_N=arrays["prefill"],
            hidden_NLD=arrays.get("hidden"),
            **header,
        )
    except ValueError as e:
        raise TraceError(f"{path}: {e}") from None


def _header_member(member: npz.Member) -> npz.Member:
    if member.shape != () or member.dtype.kind != "U" or member.nbytes > _MAX_HEADER_BYTES:
        raise ValueError(f"field 'header' should be one JSON string (at most {_MAX_HEADER_BYTES} bytes), "
                         f"got shape {member.shape} of {member.dtype}")
    return member


_HEADER_KEYS = {"model": str, "moe_layers": list, "num_experts": int, "top_k": int, "source": str, "dropped_tokens": int}


def _header(array: np.ndarray, path: Path) -> dict:
    """The header's RoutingTrace keys, each of the right type and bounded (checks.check_header)."""
    try:
        header = json.loads(str(array))
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}: field 'header' is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise TraceError(f"{path}: header does not declare format {FORMAT!r} version {VERSION}")
    header.setdefault("source", "")
    header.setdefault("dropped_tokens", 0)  # absent from traces saved before it was recorded
    for key, kind in _HEADER_KEYS.items():
        if key not in header:
            raise TraceError(f"{path}: header misses key {key!r}")
        if not isinstance(header[key], kind) or isinstance(header[key], bool):
            raise TraceError(f"{path}: header key {key!r} should be {kind.__name__}, got {clipped(header[key])}")
    if header["dropped_tokens"] < 0:
        raise TraceError(f"{path}: header key 'dropped_tokens' should be >= 0, got {header['dropped_tokens']}")
    try:
        check_header(header["moe_layers"], header["num_experts"], header["top_k"])
    except ValueError as e:
        raise TraceError(f"{path}: header key {e}") from None
    return {key: header[key] for key in _HEADER_KEYS}
