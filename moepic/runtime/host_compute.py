"""Host expert compute: a worker thread that runs routed experts, or their bottom segments, on the
host CPU from the host store's weights where they already are (no staging copy), while the main
thread drives the device. Side effects: a worker thread, torch's thread count (CUDA only), pinned
buffers, device copies. The decision of what runs here is moepic/cache/placement.py's.

    main thread (per layer step)                         worker "moepic-host" (FIFO)
    stage(router_input_TD) ─ input to the host, once ──▶
    submit(expert, weights, rows) ─────────────────────▶ swiglu(x_rows, weights) ─▶ y_TD (pinned on CUDA)
    ... the device computes the step's other experts ...
    HostBatch.output(expert): the first one waits for all the step's jobs (one wait per layer),
                              each y_TD goes to the device without a host sync (non_blocking)

On a CUDA device the input is copied to pinned host memory without blocking the main thread: the
worker waits for that copy's event before it starts. A result leaves pinned memory with a
non_blocking copy on the compute stream; torch's pinned-memory allocator keeps the buffer until
that copy has run, so nothing here waits for the device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import attrs
import torch

from moepic.core.ffn import SegmentOutput, swiglu
from moepic.core.weights import SwiGLUWeights
from moepic.errors import MoepicError
from moepic.runtime.host_measure import default_host_threads


HOST_JOB_LABEL = "moepic.host_expert"


class HostComputeError(MoepicError):
    """An expert computed on the host failed; the message names its layer and expert."""


@attrs.frozen(eq=False)
class HostInput:
    """A layer step's router input on the host, shared by the step's jobs."""

    x_TD: torch.Tensor
    ready: object = None  # CUDA: the event of its copy from the device (the worker waits for it)


@attrs.frozen(eq=False)
class HostJob:
    layer: int
    expert: int
    part: str  # "whole" or "bottom": what is computed here
    future: Future


class HostBatch:
    """A layer step's host jobs. The first output asked for waits for all of them at once: they
    are handed out last (the device's own experts go first), so by then most have finished."""

    def __init__(self, host: HostCompute, jobs: Sequence[HostJob]) -> None:
        self._host, self._jobs = host, {job.expert: job for job in jobs}
        self._outputs: dict[int, SegmentOutput] | None = None
        self.busy_s = 0.0  # worker time spent on these jobs, known once they are collected

    def __len__(self) -> int:
        return len(self._jobs)

    def output(self, expert: int) -> SegmentOutput:
        if self._outputs is None:
            self._outputs, self.busy_s = self._host.collect(list(self._jobs.values()))
        return self._outputs[expert]


class HostCompute:
    """One worker thread that computes experts on the host, in submission order.

    `threads`: torch's intra-op threads for the host work (default: the physical cores less one).
    On a CUDA device torch's thread count is set to it for as long as this pool is open: the
    main thread only launches kernels and copies there, so the host's cores are the worker's. On a
    CPU device the host *is* the device: its compute and the worker's share torch's threads, which
    are left as they are (giving `threads` there is an error)."""

    def __init__(self, device: torch.device, threads: int | None = None) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._threads_before = None
        if self._cuda:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads or default_host_threads())
        elif threads is not None:
            raise ValueError(
                "host threads are for a CUDA device; on a CPU device the host is the device and runs on torch's threads"
            )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepic-host")

    def stage(self, x_TD: torch.Tensor) -> HostInput:
        """A layer step's input to the host, once for all its jobs (no host sync on CUDA)."""
        if not self._cuda:
            return HostInput(x_TD)
        x_host = torch.empty(x_TD.shape, dtype=x_TD.dtype, pin_memory=True)
        x_host.copy_(x_TD, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return HostInput(x_host, ready)

    def submit(
        self, layer: int, expert: int, part: str, weights: SwiGLUWeights, x: HostInput, rows: Sequence[int] | None
    ) -> HostJob:
        """Compute `weights` (host memory) for the input's `rows` (the expert's tokens, in token
        order; None: every row) on the worker; its output is [len(rows), D], unweighted."""
        future = self._pool.submit(_run, weights, x, None if rows is None else list(rows), self._cuda)
        return HostJob(layer, expert, part, future)

    def batch(self, jobs: Sequence[HostJob]) -> HostBatch:
        return HostBatch(self, jobs)

    def collect(self, jobs: Sequence[HostJob]) -> tuple[dict[int, SegmentOutput], float]:
        """Wait for `jobs` (one wait), and hand each result to the device: {expert: output}, and
        the worker seconds they took. A failed job raises HostComputeError naming it."""
        wait([job.future for job in jobs])
        outputs, busy_s = {}, 0.0
        for job in jobs:
            try:
                y_TD, seconds = job.future.result()
            except Exception as e:
                raise HostComputeError(
                    f"computing layer {job.layer} expert {job.expert} ({job.part}) on the host failed: {e}"
                ) from e
            busy_s += seconds
            outputs[job.expert] = SegmentOutput(y_TD.to(self.device, non_blocking=True) if self._cuda else y_TD)
        return outputs, busy_s

    def close(self) -> None:
        """Stop: jobs not started are dropped, the one running finishes (one expert: milliseconds);
        torch's thread count is restored. Safe to call twice, and from an interrupted run."""
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            if self._threads_before is not None:
                torch.set_num_threads(self._threads_before)
                self._threads_before = None


def _run(weights: SwiGLUWeights, x: HostInput, rows: list[int] | None, pinned: bool) -> tuple[torch.Tensor, float]:
    """One job, on the worker: (the expert's output, the seconds it took once its input was there)."""
    if x.ready is not None:
        x.ready.synchronize()  # this thread waits for the input's copy; the main thread never does
    start = time.perf_counter()
    x_TD = x.x_TD if rows is None else x.x_TD[rows]
    # Named on a profiler timeline (costs nothing unless one records), so overlap can be seen.
    with torch.inference_mode(), torch.profiler.record_function(HOST_JOB_LABEL):
        y_TD = swiglu(x_TD, weights)
    if pinned:
        out = torch.empty(y_TD.shape, dtype=y_TD.dtype, pin_memory=True)
        y_TD = out.copy_(y_TD)
    return y_TD, time.perf_counter() - start
