"""The prices a hybrid `auto` run places its loads with (perfmodel/host_costs.py's HostPricing),
for the machine it runs on. Side effects: short measurements at start-up (about a second or two),
unless a host profile is given on CUDA.

    CUDA  host: the profile given (`--host NAME|FILE`), else measured now (quick) on the worker's
          threads; link: measured now, a 16 MiB pinned copy through the copy engine, as
          `moepic profile` measures it (runtime/measure.py).
    CPU   the host is the device: measured now (quick, a small working set) on torch's threads,
          which the host jobs share; link: the emulated one. With no emulated link a copy is a
          memcpy that costs next to nothing, priced as free: `auto` then copies every load.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moepic.perfmodel.hardware import load_host
from moepic.perfmodel.host_costs import HostPricing, check_priceable
from moepic.quant import ExpertFormat, build_format
from moepic.runtime.copy_engine import Link
from moepic.runtime.host_measure import MiB, measure_host

QUICK_WORKING_SET = 16 * MiB  # a CPU run's host measurement: a second, not several


def run_pricing(
    device: torch.device, dtype_bytes: int, *, host: str | None, link: Link | None, threads: int | None,
    expert_format: ExpertFormat | None = None, note: Callable[[str], None] = lambda text: None,
) -> HostPricing:
    """HostPricing for an engine on `device` whose experts are stored in `expert_format` (default
    dense; one the host computes as stored: perfmodel/host_costs.py check_priceable); `note` hears
    what was measured, in one line."""
    fmt = expert_format or build_format("dense")
    check_priceable(fmt, "--hybrid auto")
    if device.type == "cuda":
        from moepic.runtime.measure import copy_rates

        if host is not None:
            profile = load_host(host)
        else:
            profile = measure_host(device, quick=True, threads=threads, name="measured", int4=fmt.host_kernel == "int4")
        rates = copy_rates(device, 16 * MiB, 3, None)
        gbps, latency_us = rates["link_gbps"], rates["link_latency_us"]
        where = f"host {profile.name}" + (" (measured now; --host NAME|FILE gives one)" if host is None else "")
    else:
        if host is not None:
            raise ValueError("a host profile is for a CUDA device; on a CPU device the host is the device")
        profile = measure_host(device, quick=True, threads=torch.get_num_threads(), name="measured", int4=fmt.host_kernel == "int4",
                               working_set=QUICK_WORKING_SET)
        gbps, latency_us = (link.gbps, link.latency_us) if link is not None else (math.inf, 0.0)
        where = "host measured now"
    note(
        f"hybrid auto prices with {where}: {profile.expert_gbps(dtype_bytes, fmt.host_kernel):.1f} GB/s of {fmt.name} experts, "
        f"{profile.call_overhead_us:.0f} µs a call; link {gbps:.1f} GB/s + {latency_us:.0f} µs"
        + ("" if device.type == "cuda" or link is not None else " (no emulated link: copies are free, every load is copied)")
    )
    return HostPricing(host=profile, link_gbps=gbps, link_latency_us=latency_us, dtype_bytes=dtype_bytes,
                       kernel=fmt.host_kernel, weight_bytes=fmt.weight_bytes(dtype_bytes))
