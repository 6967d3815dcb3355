"""A per-token JSONL log of an offloaded run: latency and what each token cost in copies.
Side effects: writes one JSON object per line as tokens are generated.

`moepic generate --token-log FILE` checks FILE's folder before loading the model, writes the lines
to a hidden temporary file beside it (moepic.outputs.PendingOutput) and renames that to FILE only
when generation completes: an interrupted or failed run leaves no partial log, and an older FILE as
it was. A write that fails (a full disk) is one error naming FILE, not a traceback.

    {"token": 3, "id": 297, "latency_s": 0.0041, "exposed_copy_s": 0.0012, "demand_bytes": 491520,
     "prefetch_bytes": 245760, "wasted_prefetch_bytes": 0}

Token 0 is the prompt's prefill (its latency is the time to the first token). Counters are the
change since the previous token. On CUDA, exposed copy time needs a device sync to read, which the
log must not add to every token: it is null there (the run's total is in the report).
"""

from __future__ import annotations

import json
import time
from typing import IO

from moepic.outputs import PendingOutput

_COUNTERS = ("demand_bytes", "prefetch_bytes", "wasted_prefetch_bytes")


class TokenLog:
    def __init__(self, stream: IO[str] | PendingOutput, engine) -> None:
        self.stream, self.engine = stream, engine
        self.count = 0
        self._last_time = time.perf_counter()
        self._last = self._snapshot()

    def _snapshot(self) -> dict[str, float | int | None]:
        counters = {name: getattr(self.engine.counters, name) for name in _COUNTERS}
        live = self.engine.device.type != "cuda"
        return counters | {"exposed_copy_s": self.engine.copies.stats.exposed_s if live else None}

    def __call__(self, token_id: int) -> None:
        now, snapshot = time.perf_counter(), self._snapshot()
        record = {"token": self.count, "id": token_id, "latency_s": now - self._last_time}
        for name, value in snapshot.items():
            record[name] = None if value is None else value - self._last[name]
        self.stream.write(json.dumps(record) + "\n")
        self.count, self._last_time, self._last = self.count + 1, now, snapshot
