"""The simulator's core: a trace stepped through the engine's planner, timed by an event model. Pure.

Per step (a decode token, or a prompt's prefill) and MoE layer, in the engine's order:

    compute stream  ─ attention, norms, router (+ predictor) ─▶ r ─ experts in id order, each after its copy ─▶
    copy stream         … prefetches for this layer and later ones (issued at earlier layers' r) …
                        at r: this layer's wrong ones not yet started are cancelled; then its demand
                        copies (urgent), the prefetches not yet started (in issue order), and
                        this layer's own prefetches for the next `horizon` layers

- Planning is the engine's: `plan_layer_step` with the policy's priorities (`priority_series`,
  equal to the engine's step-by-step ones), and a wrong prefetch is offered for admission exactly
  when the engine would offer it: it was copied whole and had landed by r.
- Staging is shared as the engine shares it: prefetches for later layers hold their buffers until
  those layers route, a layer's prefetching stops where it would take the demand reserve, and an
  expert already on its way for a layer (named by an earlier one) is not copied twice.
- Copies are serial on one link: `link_latency + bytes / link_gbps` each (hardware profile).
  Compute waits for an expert's copy, then runs it (`expert_s`), after a device copy of its top
  (a partial hit joins the cached top to its bottom; an admitted miss keeps its top in a slot).
- Times come from `ModelTimes` (perfmodel/latency.py) of the same hardware profile, so the
  simulator and the latency model price every part alike; the simulator adds what the model
  averages away: which copies queue behind which, and each token's own misses.
- Each step starts with an idle link: every copy of a token is either used by it or cancelled,
  except a wrong prefetch of the last layer still in flight (rare, and it cannot delay compute).
"""

from __future__ import annotations

import numpy as np

from moepic.cache.layout import CacheLayout, prefetch_buffers
from moepic.cache.planner import initial_residency, plan_layer_step
from moepic.perfmodel.hardware import HardwareProfile
from moepic.perfmodel.latency import ModelTimes
from moepic.policies.base import CachePolicy, priority_series
from moepic.predictors.base import NoPredictor, Predictor, merge_votes
from moepic.sim.result import Counters, SimResult
from moepic.sim.steps import trace_steps
from moepic.tracing import RoutingTrace


def step_predictions(named_NK: np.ndarray, steps, candidates: int) -> list[list[int]]:
    """Per step: the experts named for a layer (a prompt's tokens merged by votes), at most k′."""
    rows = [[e for e in row if e >= 0] for row in named_NK.tolist()]
    out = []
    for start, tokens in zip(steps.start_S.tolist(), steps.tokens_S.tolist()):
        out.append((rows[start] if tokens == 1 else merge_votes(rows[start : start + tokens]))[:candidates])
    return out


def _used_lists(counts_SE: np.ndarray) -> list[list[int]]:
    """Per step, the experts it routes to, ascending (what the planner takes)."""
    rows, experts = np.nonzero(counts_SE)
    return [part.tolist() for part in np.split(experts, np.cumsum(np.bincount(rows, minlength=len(counts_SE)))[:-1])]


def _used_per_step(trace: RoutingTrace, steps, column: int, counts_SE: np.ndarray) -> list[list[int]]:
    if (steps.tokens_S == 1).all():  # decode only: each token's ids, sorted (distinct, as routers pick them)
        ids_NK = np.sort(trace.expert_ids_NLK[:, column], axis=1)
        if (np.diff(ids_NK, axis=1) > 0).all():
            return ids_NK.tolist()
    return _used_lists(counts_SE)


def simulate(
    trace: RoutingTrace,
    layout: CacheLayout,
    policy: CachePolicy,
    times: ModelTimes,
    hw: HardwareProfile,
    predictor: Predictor | None = None,
) -> SimResult:
    """Replay `trace` through the cache `layout` and `policy`, prefetching what `predictor` names
    (its `trace_predictions_ahead`: each MoE layer for the next `horizon` ones)."""
    if len(trace.moe_layers) != len(layout.layers):
        raise ValueError(f"the trace has {len(trace.moe_layers)} MoE layers, the layout {len(layout.layers)}")
    predictor = predictor or NoPredictor()
    candidates = predictor.candidates
    steps = trace_steps(trace)
    layers = layout.layers
    L, E = len(layers), trace.num_experts
    counts = [steps.counts_SE(trace, c) for c in range(L)]
    used = [_used_per_step(trace, steps, c, counts_SE) for c, counts_SE in enumerate(counts)]
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
    predicting = any(issues)
    reach = max((target - c for c, source_issues in enumerate(issues) for target, _ in source_issues), default=0)
    link_Bps, latency = hw.link_gbps * 1e9, hw.link_latency_us * 1e-6
    whole_s = [latency + l.expert_bytes / link_Bps for l in layers]
    bottom_s = [latency + l.bottom_bytes / link_Bps for l in layers]
    top_device_s = [l.top_bytes / (hw.device_copy_gbps * 1e9) for l in layers]
    # A layer runs the predictor once per layer ahead it names experts for.
    predictor_L = [times.predictor_s * len(issues[c]) for c in range(L)]
    layer_s = [times.layer_s + predictor_L[c] for c in range(L)]
    expert_s = times.expert_s
    # The engine's own host work (hardware.py): per planned step, and per loaded expert.
    step_s = [0.0 if l.fully_resident else hw.offload_step_us * 1e-6 for l in layers]
    load_s = hw.load_us * 1e-6
    caches = [initial_residency(policy, l).cache for l in layers]
    staging = layout.staging_experts
    reserve = max(1, staging - prefetch_buffers(predictor)) if predicting else staging
    counters = Counters(layers)
    token_s, exposed_s = [], []
    layer_time_L = [0.0] * L
    exposed_L = [0.0] * L

    decode_S, tokens_S = steps.decode_S.tolist(), steps.tokens_S.tolist()
    demand = prefetch = wasted = 0  # bytes, as the engine counts them
    for s in range(steps.num_steps):
        decode, tokens = decode_S[s], tokens_S[s]
        counts_L = (counters.decode if decode else counters.prefill).counts
        t = exposed = 0.0
        # Per target column: expert → [whole?, start, end, bytes, issue order]; copies run in issue
        # order on one link, each scheduled when issued and moved back when a demand copy goes first.
        pending: list[dict[int, list]] = [{} for _ in range(L)]
        order = 0
        for c in range(L):
            r = t + layer_s[c] + step_s[c]
            here = pending[c]
            loaded = [e for e, p in here.items() if p[0] and p[2] <= r] if here else ()
            plan, caches[c] = plan_layer_step(layers[c], caches[c], used[c][s], priorities[c][s], loaded)
            experts = plan.experts
            if decode and named[c] is not None:
                row = counters.predicted[c]
                named_s = named[c][s]
                row[0] += 1
                row[1] += len(named_s)
                row[2] += len(experts)
                row[3] += sum(1 for e in used[c][s] if e in named_s)
            # This layer's prefetches: used, kept, wasted (under way) or cancelled (not started).
            ready: dict[int, float] = {}
            waiting: list[tuple[int, int, int]] = []  # (issue order, target, expert): not started, to move back
            link = r
            if here:
                load_of = {e: load for e, _, _, load, _ in experts}
                kept = [e for e, _ in plan.kept]
                for e, (whole, start, end, nbytes, issued) in here.items():
                    load = load_of.get(e)
                    if load is not None and (load == "whole") == whole:
                        if start < r:
                            ready[e] = end
                            link = end if end > link else link
                        else:
                            waiting.append((issued, c, e))
                    elif e in kept:
                        counters.kept(nbytes)
                        link = end if end > link else link
                    elif start < r:
                        wasted += nbytes
                        link = end if end > link else link
                    else:  # withdrawn before it used the link
                        counters.cancelled += 1
                        prefetch -= nbytes
                pending[c] = {e: here[e] for e in (*ready, *(w[2] for w in waiting))}  # the matched ones
            held_later = 0  # staging buffers later layers' prefetches hold
            for later in range(c + 1, min(L, c + reach)):  # what earlier layers issued for after this one
                for e, p in pending[later].items():
                    held_later += 1
                    if p[1] < r:
                        link = p[2] if p[2] > link else link
                    else:
                        waiting.append((p[4], later, e))
            matched, demanded = len(pending[c]), 0
            for e, _, _, load, nbytes in experts:  # demand copies, urgent: ahead of prefetches not yet started
                if load != "none" and e not in pending[c]:
                    link += whole_s[c] if load == "whole" else bottom_s[c]
                    ready[e] = link
                    demand += nbytes
                    demanded += 1
            for _, target, e in sorted(waiting):  # then the prefetches not yet started, in issue order
                p = pending[target][e]
                p[1], p[2] = link, link + (p[2] - p[1])
                link = p[2]
                if target == c:
                    ready[e] = link
            # Staging as the engine shares it: this layer holds its matched prefetches and as many
            # demand copies as its reserve allows, later layers their prefetches; prefetching never
            # takes the reserve.
            room = staging - matched - min(demanded, max(0, reserve - matched)) - reserve - held_later
            for target, per_step in issues[c]:
                if room <= 0:
                    break
                layout_t, queued = layers[target], pending[target]
                slot_of = caches[target].slot_of()
                whole_hit = layout_t.top_neurons == layout_t.ffn_size
                for e in per_step[s]:
                    whole = e not in slot_of  # its top is cached: only the bottom is copied
                    if e in queued or (not whole and whole_hit):
                        continue  # already on its way, or a whole-expert hit: nothing to copy
                    end = link + (whole_s if whole else bottom_s)[target]
                    nbytes = layout_t.expert_bytes if whole else layout_t.bottom_bytes
                    queued[e] = [whole, link, end, nbytes, order]
                    order += 1
                    link = end
                    prefetch += nbytes
                    room -= 1
                    if not room:
                        break
            pending[c] = {}
            # Compute: each expert once its copy has landed (and its top has joined it); count it.
            row = counts_L[c]
            clock, exposed_before = r, exposed
            for e, outcome, slot, load, nbytes in experts:
                if load == "none":
                    row[3] += 1
                else:
                    row[8] += nbytes
                    landed = ready[e]
                    if landed > clock:
                        exposed += landed - clock
                        clock = landed
                    clock += load_s
                    if slot is not None:  # partial: top → staging; admitted miss: top → slot
                        clock += top_device_s[c]
                        if outcome == "miss":
                            row[6] += 1
                    row[4 if outcome == "partial" else 5] += 1
                clock += expert_s
            row[0] += 1
            row[1] += tokens
            row[2] += len(experts)
            row[7] += len(plan.evicted)
            if plan.kept:
                clock += top_device_s[c] * len(plan.kept)
            if decode:
                layer_time_L[c] += clock - t
                exposed_L[c] += exposed - exposed_before
            t = clock
        if decode:
            token_s.append(t + times.rest_s)
            exposed_s.append(exposed)
    counters.demand, counters.prefetch, counters.wasted = demand, prefetch, wasted
    return counters.result(
        token_s=np.array(token_s), exposed_s=np.array(exposed_s), layer_time_L=np.array(layer_time_L),
        exposed_L=np.array(exposed_L), predictor_s=sum(predictor_L), layout=layout
    )
