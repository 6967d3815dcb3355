"""Measuring the host side of a profile: on the threads asked for (restored after), every rate
positive and finite, the result latency only where a CUDA device takes the result."""

from __future__ import annotations

import math

import pytest
import torch

from moepic.quant.int4_tiles import kernel_layout
from moepic.runtime.host_measure import default_host_threads, measure_host, physical_cores


def test_default_host_threads_leave_the_main_thread_a_core():
    assert 1 <= default_host_threads() <= max(1, physical_cores() - 1)
    assert physical_cores() <= (torch.multiprocessing.cpu_count() or 1)


def test_host_is_measured_on_the_threads_asked_for_and_they_are_restored():
    before = torch.get_num_threads()
    host = measure_host(torch.device("cpu"), quick=True, threads=1, name="here")
    assert torch.get_num_threads() == before
    assert f"1 of {physical_cores()} physical cores" in host.source
    for rate in (host.bf16_expert_gbps, host.fp32_expert_gbps, host.memory_gbps, host.call_overhead_us):
        assert math.isfinite(rate) and rate > 0
    assert host.result_latency_us is None and "no CUDA device" in host.source
    # int4-fused experts through torch's fused kernel, where this torch has it (quant/int4_tiles.py)
    assert (host.int4_expert_gbps is None) == (kernel_layout() is None)
    assert host.int4_expert_gbps is None or (math.isfinite(host.int4_expert_gbps) and host.int4_expert_gbps > 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_result_latency_is_measured_on_cuda():
    host = measure_host(torch.device("cuda"), quick=True, threads=None, name="here")
    assert host.result_latency_us is not None and 0 < host.result_latency_us < 1e4
    assert "not measured" not in host.source
