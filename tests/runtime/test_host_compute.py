"""The host worker pool: what it computes is `swiglu` on the rows asked for, results come back in
the order jobs were submitted, a failed job names its layer and expert, and a CPU device's torch
threads are left alone."""

from __future__ import annotations

import pytest
import torch

from moepic.core.ffn import SegmentOutput, swiglu
from moepic.runtime.host_compute import HostCompute, HostComputeError
from tests_support import random_expert

CPU = torch.device("cpu")


@pytest.fixture
def host():
    pool = HostCompute(CPU)
    yield pool
    pool.close()


def test_a_batch_hands_back_each_experts_output_on_its_own_rows(host):
    experts = [random_expert(8, 12, seed) for seed in range(3)]
    x_TD = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    rows = {0: [0, 2, 4], 1: None, 2: [3]}
    x = host.stage(x_TD)
    batch = host.batch([host.submit(7, e, "whole", experts[e], x, rows[e]) for e in rows])
    assert len(batch) == 3
    for e, r in rows.items():
        out = batch.output(e)
        assert isinstance(out, SegmentOutput)
        assert torch.equal(out.y_TD, swiglu(x_TD if r is None else x_TD[r], experts[e]))
    assert batch.busy_s > 0


def test_a_bottom_segment_is_computed_from_the_weights_in_place(host):
    expert = random_expert(8, 16, 1, block=4)
    bottom = expert.neurons(8, 16)
    x_TD = torch.randn(2, 8)
    batch = host.batch([host.submit(0, 3, "bottom", bottom, host.stage(x_TD), None)])
    torch.testing.assert_close(batch.output(3).y_TD + swiglu(x_TD, expert.neurons(0, 8)), swiglu(x_TD, expert), atol=1e-5, rtol=1e-5)


def test_a_failed_job_is_raised_in_the_caller_naming_its_layer_and_expert(host):
    wrong = random_expert(6, 12, 0)  # D = 6, the input has D = 8
    batch = host.batch([host.submit(4, 9, "whole", wrong, host.stage(torch.randn(1, 8)), None)])
    with pytest.raises(HostComputeError, match="layer 4 expert 9 \\(whole\\) on the host failed"):
        batch.output(9)


def test_on_a_cpu_device_torch_threads_are_left_alone_and_threads_are_refused():
    before = torch.get_num_threads()
    pool = HostCompute(CPU)
    pool.close()
    pool.close()  # twice is harmless
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="CUDA device"):
        HostCompute(CPU, threads=1)
