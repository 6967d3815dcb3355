"""The simulator's core: a trace stepped through the engine's planner, timed by an event model. Pure.

Per step (a decode token, a batch's decode of one token per stream, or a prompt's prefill;
moepic/sim/steps.py) and MoE layer, in the engine's order:

    compute stream  ─ attention, norms, router (+ predictor) ─▶ r ─ experts in id order, each after its copy ─▶
    copy stream         … prefetches for this layer and later ones (issued at earlier layers' r) …
                        at r: this layer's wrong ones not yet started are cancelled; then its demand
                        copies (urgent), the prefetches not yet started (in issue order), and
                        this layer's own prefetches for the next `horizon` layers

- Planning is the engine's: `plan_layer_step` with the policy's priorities (`priority_series`,
  equal to the engine's step-by-step ones).
- Copies are the engine's: the copy schedule (moepic/cache/schedule.py) decides what each
  prefetch becomes (used, kept, dropped), which loads are demand copies and which experts are
  prefetched within the staging room; the simulator only times those decisions. Staging is
  counted as the engine holds it: prefetches for later layers keep their buffers until those
  layers route. What is timing here is timing there too: a wrong prefetch is offered for
  admission once it has landed, and a dropped one is cancelled only if it has not started.
- Copies are serial on one link: `link_latency + bytes / link_gbps` each (hardware profile).
  Compute waits for an expert's copy, then runs it (`expert_s`), after a device copy of its top
  (a partial hit joins the cached top to its bottom; an admitted miss keeps its top in a slot).
- Times come from `ModelTimes` (perfmodel/latency.py) of the same hardware profile, so the
  simulator and the latency model price every part alike; the simulator adds what the model
  averages away: which copies queue behind which, and each token's own misses.
- Hybrid runs (moepic/cache/placement.py, the engine's rule): the demand loads are placed on the
  link or on the host, a third resource. The host starts a layer's jobs once its tokens' input
  has reached it (hand-off), runs them one after another (host_costs.py prices them, with the
  DRAM the link shares), and the device, having computed its own experts (and the cached tops of
  host-computed bottoms), waits for the last result to come back. A host-computed miss the
  planner admitted has its top filled into its slot behind the prefetches, on the link. Where the
  device is itself the CPU (a profile with `device: cpu`), host jobs share its cores: they add
  to the layer's compute instead of running beside it.
- Each step starts with a link idle of prefetches: every prefetch of a token is either used by it
  or cancelled, except a wrong one of the last layers still in flight (it cannot delay compute).
  Fills are the cache's, not the token's: one still under way at the end of a step keeps the link
  busy into the next, and a step that reads its slot waits for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from moepic.cache.layout import CacheLayout
from moepic.cache.placement import Hybrid, check_mode, place_loads, prefetch_share, settle_fills
from moepic.cache.planner import initial_residency, plan_layer_step
from moepic.cache.schedule import (
    Part, PrefetchTarget, admission_candidates, admitted_top_copy, demand_in_flight, demand_loads, demand_reserve,
    host_filled_tops, plan_prefetches, prefetch_fates, prefetch_room, top_copy,
)
from moepic.perfmodel.hardware import HardwareProfile
from moepic.perfmodel.host_costs import host_pricing
from moepic.perfmodel.latency import ModelTimes
from moepic.policies.base import CachePolicy, priority_series
from moepic.predictors.base import NoPredictor, Predictor
from moepic.sim.result import Counters, SimResult
from moepic.sim.steps import TraceSteps, step_predictions, trace_steps, used_per_step
from moepic.tracing import RoutingTrace


FILL = -1  # the target of a fill in the queue of copies not yet started


@attrs.frozen
class _Copy:
    """A prefetch on the simulated link."""

    part: Part
    start: float
    end: float
    nbytes: int
    order: int  # issue order: prefetches not yet started run in it

    def moved_to(self, start: float) -> _Copy:
        """The same copy starting at `start` (a demand copy went first)."""
        return _Copy(self.part, start, start + (self.end - self.start), self.nbytes, self.order)


def simulate(
    trace: RoutingTrace,
    layout: CacheLayout,
    policy: CachePolicy,
    times: ModelTimes | Sequence[ModelTimes],
    hw: HardwareProfile,
    predictor: Predictor | None = None,
    *,
    hybrid: Hybrid = "off",
    steps: TraceSteps | None = None,
) -> SimResult:
    """Replay `trace` through the cache `layout` and `policy`, prefetching what `predictor` names
    (its `trace_predictions_ahead`: each MoE layer for the next `horizon` ones); with `hybrid`,
    demand loads run on the host where moepic/cache/placement.py says (priced by `hw.host`).
    A layout with a miss format (`cache.miss_format`) moves and computes an expert loaded whole as
    its low-bit copy (`times.miss_expert_s` a token), and fills an admitted top from the host.
    `steps`: the order the trace is routed in (moepic/sim/steps.py `batched_steps`, a batch's
    decode steps one token of each stream); default: the trace's own, one request after another."""
    if len(trace.moe_layers) != len(layout.layers):
        raise ValueError(f"the trace has {len(trace.moe_layers)} MoE layers, the layout {len(layout.layers)}")
    predictor = predictor or NoPredictor()
    # One per MoE layer where layers store their experts in different formats (a GGUF file's kinds).
    layer_times = tuple(times) if isinstance(times, (list, tuple)) else (times,) * len(layout.layers)
    times = layer_times[0]
    pricing = host_pricing(hw, times, layout.dtype_bytes) if hybrid != "off" else None
    check_mode(hybrid, pricing is not None)
    shared_cores = hw.device == "cpu"  # a CPU "device" (the engine on this machine) is the host's own cores
    candidates = predictor.candidates
    steps = trace_steps(trace) if steps is None else steps
    layers = layout.layers
    L, E = len(layers), trace.num_experts
    counts = [steps.counts_SE(trace, c) for c in range(L)]
    used = [used_per_step(trace, steps, c, counts_SE) for c, counts_SE in enumerate(counts)]
    priorities = [
        priority_series(policy, l.layer, E, counts[c], steps.tokens_S, steps.new_request_S) for c, l in enumerate(layers)
    ]
    # issues[c]: per step, (target column, experts named for it) in the order layer c prefetches them.
    column_of = {l.layer: c for c, l in enumerate(layers)}
    issues: list[list[tuple[int, list[list[int]]]]] = [[] for _ in range(L)]
    if candidates > 0:
        for (source, target), named_NK in sorted(predictor.trace_predictions_ahead(trace).items()):
            if source in column_of and target in column_of:
                issues[column_of[source]].append((column_of[target], step_predictions(named_NK, steps, candidates)))
    # named[c]: per step, every expert some earlier layer named for layer c (the engine's recall counts their union).
    named: list[list[set[int]] | None] = [None] * L
    for source_issues in issues:
        for target, per_step in source_issues:
            if named[target] is None:
                named[target] = [set() for _ in range(steps.num_steps)]
            for union, experts in zip(named[target], per_step):
                union.update(experts)
    reach = max((target - c for c, source_issues in enumerate(issues) for target, _ in source_issues), default=0)
    link_Bps, latency = hw.link_gbps * 1e9, hw.link_latency_us * 1e-6
    if pricing is not None and len(set(layer_times)) > 1:
        raise ValueError("hybrid is priced for one expert format: these layers store theirs in several")
    if any(l.low_bit_misses for l in layers) and (times.miss_expert_s is None or hybrid != "off"):
        raise ValueError("a layout with a miss format needs times with one (model_times(miss_format=…)), and hybrid off")
    miss_expert_s = times.miss_expert_s
    whole_s = [latency + l.whole_load_bytes / link_Bps for l in layers]
    bottom_s = [latency + l.bottom_bytes / link_Bps for l in layers]
    top_device_s = [l.top_bytes / (hw.device_copy_gbps * 1e9) for l in layers]
    fill_s = [latency + l.top_bytes / link_Bps for l in layers]
    # A layer runs the predictor once per layer ahead it names experts for.
    predictor_L = [times.predictor_s * len(issues[c]) for c in range(L)]
    layer_s = [times.layer_s + predictor_L[c] for c in range(L)]
    expert_s = [t.expert_s for t in layer_times]
    # A cached top computed alone (its bottom on the host): the launch, and θ of the weights.
    launch_s = hw.expert_overhead_us * 1e-6
    top_expert_s = [launch_s + l.theta * max(0.0, expert_s[c] - launch_s) for c, l in enumerate(layers)]
    # The engine's own host work (hardware.py): per planned step, and per loaded expert.
    step_s = [0.0 if l.fully_resident else hw.offload_step_us * 1e-6 for l in layers]
    load_s = hw.load_us * 1e-6
    host_load_s = hw.host_load_us * 1e-6  # the engine's own work per host-computed load
    caches = [initial_residency(policy, l).cache for l in layers]
    share_of = [prefetch_share(hybrid, pricing.load_costs(l, 1) if pricing is not None else None) for l in layers]
    staging = layout.staging_experts
    reserve = demand_reserve(staging, predictor)
    counters = Counters(layers)
    token_s, exposed_s, host_busy_s, host_wait_s = [], [], [], []
    layer_time_L = [0.0] * L
    exposed_L = [0.0] * L

    decode_S, tokens_S = steps.decode_S.tolist(), steps.tokens_S.tolist()
    step_tokens = []  # per decode step: its tokens (one per stream in the batch)
    carried_fills: dict[tuple[int, int], _Copy] = {}
    demand = prefetch = wasted = 0  # bytes, as the engine counts them
    for s in range(steps.num_steps):
        decode, tokens = decode_S[s], tokens_S[s]
        # A batch's decode step reads the weights once and each stream's KV cache; a prompt is priced
        # as one token (it is not reported; its clock only carries fills into the next step).
        sequences = tokens if decode else 1
        more_layer_s = (sequences - 1) * times.layer_sequence_s  # 0.0 for one: the same sums, bit for bit
        stats_L = counters.decode if decode else counters.prefill
        t = exposed = host_busy = host_wait = 0.0
        # Per target column: expert → its prefetch on the link. Copies run in issue order on one
        # link, each scheduled when issued and moved back when a demand copy goes first.
        pending: list[dict[int, _Copy]] = [{} for _ in range(L)]
        # (column, expert): a host-computed miss's top on its way to its slot; those of earlier steps
        # still under way keep the link busy, and a step that reads the slot waits for its fill.
        fills: dict[tuple[int, int], _Copy] = carried_fills
        order = 0
        for c in range(L):
            r = t + (layer_s[c] + more_layer_s) + step_s[c]
            here = pending[c]
            parts = {e: p.part for e, p in here.items()} if here else {}
            loaded = admission_candidates(parts, lambda e: here[e].end <= r) if here else ()  # noqa: B023 (called at once)
            plan, caches[c] = plan_layer_step(layers[c], caches[c], used[c][s], priorities[c][s], loaded)
            experts = plan.experts
            if decode and named[c] is not None:
                counters.predicted[c].add(named[c][s], used[c][s])
            # This layer's prefetches: used, kept, wasted (under way) or cancelled (not started).
            ready: dict[int, float] = {}  # expert → when its copy lands
            waiting: list[tuple[int, int, int]] = []  # (issue order, target, expert): not started, to move back
            link = r
            if here:
                for e, fate in prefetch_fates(plan, parts).items():
                    p = here[e]
                    started = p.start < r
                    if fate == "use":
                        if not started:
                            waiting.append((p.order, c, e))
                            continue
                        ready[e] = p.end
                    elif fate == "keep":
                        counters.kept(p.nbytes)
                    elif started:
                        wasted += p.nbytes
                    else:  # withdrawn before it used the link
                        counters.cancelled += 1
                        prefetch -= p.nbytes
                        continue
                    link = p.end if p.end > link else link  # the link is busy until its copy is done
                pending[c] = {e: here[e] for e in (*ready, *(w[2] for w in waiting))}  # the used ones
            held_later = 0  # staging buffers later layers' prefetches hold
            for later in range(c + 1, min(L, c + reach)):  # what earlier layers issued for after this one
                for e, p in pending[later].items():
                    held_later += 1
                    if p.start < r:
                        link = p.end if p.end > link else link
                    else:
                        waiting.append((p.order, later, e))
            for key, f in fills.items():  # fills queue with the prefetches
                if f.start < r:
                    link = f.end if f.end > link else link
                else:
                    waiting.append((f.order, FILL, key))
            hosted = ()
            if pricing is not None:
                # Hybrid: this layer's prefetches not yet started are withdrawn and placed with its
                # demand loads; those under way and not landed keep the link busy first.
                here = pending[c]
                for e in [e for e, p in here.items() if p.start >= r]:
                    counters.cancelled += 1
                    prefetch -= here.pop(e).nbytes
                waiting = [w for w in waiting if w[1] != c or w[2] in here]
                costs = pricing.load_costs(layers[c], tokens)
                busy = pricing.busy_s(p.nbytes for p in here.values() if p.end > r)
                placed = place_loads(demand_loads(plan, here), hybrid, costs, link_busy_s=busy)
                plan, caches[c] = settle_fills(plan, caches[c], placed)
                loads = [pl.plan for pl in placed if pl.place == "copy"]
                hosted = [pl for pl in placed if pl.place != "copy"]
            else:
                loads = demand_loads(plan, pending[c])
            matched = len(pending[c])
            demanded = 0
            for p in loads:  # urgent: ahead of prefetches not yet started
                link += whole_s[c] if p.load == "whole" else bottom_s[c]
                ready[p.expert] = link
                demand += p.bytes_loaded
                demanded += 1
            for pl in hosted:  # a split miss's top: urgent too, straight into its slot (no staging)
                if pl.place == "split":
                    link += fill_s[c]
                    ready[pl.plan.expert] = link
                    demand += layers[c].top_bytes
            for _, target, e in sorted(waiting):  # then the prefetches (and fills) not yet started, in issue order
                if target == FILL:
                    fills[e] = fills[e].moved_to(link)
                    link = fills[e].end
                    continue
                p = pending[target][e] = pending[target][e].moved_to(link)
                link = p.end
                if target == c:
                    ready[e] = link
            # Staging as the engine shares it: this layer holds its matched prefetches and the
            # demand copies its reserve lets start, later layers their prefetches.
            free = staging - matched - demand_in_flight(matched, demanded, reserve) - held_later
            targets = (
                PrefetchTarget(target, layers[target], caches[target], per_step[s], pending[target], share_of[target])
                for target, per_step in issues[c]
            )
            for p in plan_prefetches(targets, prefetch_room(free, reserve)):
                whole = p.part == "whole"
                end = link + (whole_s if whole else bottom_s)[p.key]
                nbytes = layers[p.key].whole_load_bytes if whole else layers[p.key].bottom_bytes
                pending[p.key][p.expert] = _Copy(p.part, link, end, nbytes, order)
                order += 1
                link = end
                prefetch += nbytes
            pending[c] = {}
            for e in host_filled_tops(plan, layers[c]):  # a low-bit miss's top the cache keeps: behind the prefetches
                fills[c, e] = _Copy("whole", link, link + fill_s[c], layers[c].top_bytes, order)
                order += 1
                link += fill_s[c]
                counters.miss_fill_bytes += layers[c].top_bytes
            host_ready, host_experts, host_work = r, set(), 0.0
            if hosted:  # the host's queue: hand-off, its jobs in order, the last result back
                for pl in hosted:
                    host_work += costs.host_s("bottom" if pl.place == "split" else pl.plan.load)
                    host_experts.add(pl.plan.expert)
                    if pl.fill:  # behind this layer's prefetches on the link
                        fills[c, pl.plan.expert] = _Copy("whole", link, link + fill_s[c], layers[c].top_bytes, order)
                        order += 1
                        link += fill_s[c]
                host_ready = r + costs.handoff_s + host_work + costs.handoff_s
                if decode:
                    host_busy += host_work
                    counters.host[c].add(hosted, layers[c], host_work)
            # Compute: each expert once its copy has landed (and its top has joined it); the host's
            # experts last (the engine hands them out last), then their results.
            stats_L[c] = stats_L[c].add(plan, tokens)
            clock, exposed_before = r, exposed
            for p in experts:
                filling = fills.get((c, p.expert)) if p.outcome != "miss" else None
                if filling is not None and filling.end > clock:  # its cached top is still being filled
                    exposed += filling.end - clock
                    clock = filling.end
                if p.expert in host_experts:
                    continue
                if p.load != "none":
                    landed = ready[p.expert]
                    if landed > clock:
                        exposed += landed - clock
                        clock = landed
                    clock += load_s
                    if top_copy(p, layers[c]) in ("slot_to_staging", "staging_to_slot"):
                        clock += top_device_s[c]
                one_s = miss_expert_s if p.load == "whole" and layers[c].low_bit_misses else expert_s[c]
                clock += one_s if sequences == 1 else layer_times[c].expert_s_for(int(counts[c][s, p.expert]), one_s)
            if plan.kept and admitted_top_copy(layers[c]) == "staging_to_slot":
                clock += top_device_s[c] * len(plan.kept)
            if hosted:
                for pl in hosted:  # the device's part: a cached top, or a split miss's once it has landed
                    if pl.place == "split" and ready[pl.plan.expert] > clock:
                        exposed += ready[pl.plan.expert] - clock
                        clock = ready[pl.plan.expert]
                    if pl.place == "split" or pl.plan.load == "bottom":
                        clock += top_expert_s[c]
                clock += host_load_s * len(hosted)
                if shared_cores:  # the host's jobs ran on the cores the device computes on: after its work
                    host_ready = max(host_ready, clock + host_work)
                if host_ready > clock:
                    if decode:
                        host_wait += host_ready - clock
                    clock = host_ready
            if decode:
                layer_time_L[c] += clock - t
                exposed_L[c] += exposed - exposed_before
            t = clock
        # Fills still under way when the step ends carry into the next, on its clock.
        carried_fills = {key: _Copy(f.part, -1.0, f.end - t, f.nbytes, -1) for key, f in fills.items() if f.end > t}
        if decode:
            token_s.append(t + (times.rest_s + (sequences - 1) * times.rest_sequence_s))
            step_tokens.append(tokens)
            exposed_s.append(exposed)
            host_busy_s.append(host_busy)
            host_wait_s.append(host_wait)
    counters.demand, counters.prefetch, counters.wasted = demand, prefetch, wasted
    return counters.result(
        token_s=np.array(token_s), exposed_s=np.array(exposed_s), layer_time_L=np.array(layer_time_L),
        exposed_L=np.array(exposed_L), predictor_s=sum(predictor_L), layout=layout, hybrid=hybrid,
        host_s=np.array(host_busy_s), host_wait_s=np.array(host_wait_s), step_tokens=np.array(step_tokens, dtype=np.int64),
    )
