"""`GET /metrics`: Prometheus text format, through prometheus_client (its exposition format and
histograms are the ones every Prometheus setup reads; written by hand they drift). Side effects:
reads the worker's counters at scrape time.

Per request (updated by the handlers): requests by endpoint and outcome, time to first token, and
latency. Per server (read from the worker at each scrape): tokens generated and prompted, tokens/s
over the last RATE_WINDOW_S, steps, queue length, batch size; and, for an offloading engine, its
expert hit rate, bytes loaded (by how they moved) and copy time (exposed, and in all).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moepic.serve.worker import RATE_WINDOW_S, ServeWorker

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    def __init__(self, worker: ServeWorker) -> None:
        self.registry = CollectorRegistry()  # its own: two servers in one process (tests) never share counters
        self.requests = Counter("moepic_requests", "Requests answered, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=self.registry)
        self.first_token_s = Histogram("moepic_time_to_first_token_seconds", "From a request's arrival to its first token",
                                       buckets=_SECONDS, registry=self.registry)
        self.latency_s = Histogram("moepic_request_seconds", "From a request's arrival to its last token",
                                   buckets=_SECONDS, registry=self.registry)
        self.registry.register(_WorkerCollector(worker))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCollector:
    def __init__(self, worker: ServeWorker) -> None:
        self.worker = worker

    def collect(self):
        counters, worker = self.worker.counters, self.worker
        yield _counter("moepic_generated_tokens", "Tokens generated", counters.generated_tokens)
        yield _counter("moepic_prompt_tokens", "Prompt tokens of the requests queued", counters.prompt_tokens)
        yield _counter("moepic_steps", "Scheduler steps (each: admitted prefills, then one decode step of the batch)",
                       counters.steps)
        yield _counter("moepic_busy_seconds", "Time the worker spent inside steps", counters.busy_s)
        yield _gauge("moepic_tokens_per_second", f"Tokens generated per second over the last {RATE_WINDOW_S:g} s",
                     counters.tokens_per_s(time.perf_counter()))
        yield _gauge("moepic_queue_length", "Requests waiting for a place in the batch", worker.queued)
        yield _gauge("moepic_batch_size", "Requests in the running batch", worker.batch_size)
        yield _gauge("moepic_max_batch_size", "The batch's limit (serve.max_batch)", worker.scheduler.max_batch)
        yield _gauge("moepic_up", "1 while the engine can generate; 0 after a step failed", int(worker.failed is None))
        report = counters.engine
        if report is None:  # every expert resident: nothing is loaded, every routing is a hit
            return
        yield _gauge("moepic_expert_hit_rate", "Expert activations whose weights were in the device cache (all steps)",
                     report["expert_hit_rate"])
        yield _gauge("moepic_decode_expert_hit_rate", "The same, decode steps only", report["decode_expert_hit_rate"])
        loaded = CounterMetricFamily("moepic_expert_bytes_loaded", "Expert bytes copied from host memory to the device, "
                                     "by why: demand (waited for), prefetch, fill (tops of host-computed misses), "
                                     "miss_fill (tops of misses served low-bit)", labels=["how"])
        for how in ("demand", "prefetch", "fill", "miss_fill"):
            loaded.add_metric([how], report[f"{how}_bytes"])
        yield loaded
        yield _counter("moepic_exposed_copy_seconds", "Copy time compute waited for", report["exposed_copy_s"])
        yield _counter("moepic_copy_seconds", "Time the host→device link was busy", report["copy_s"])


def _counter(name: str, help: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help, value=value)


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help, value=value)
