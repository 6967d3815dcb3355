"""`moepic train-policy`: fit the learned cache policy (moepic/policies/learned.py) to Belady's
labels on routing traces, and optionally score it on a held-out trace.

    moepic train-policy --trace gsm8k.jsonl --out gsm8k-policy.json --eval-trace humaneval.jsonl
    moepic generate --budget 0.25 --policy learned cache.policy.path=gsm8k-policy.json

The traces are recorded routing (`moepic generate --record-trace`, or a JSONL routing log) of one
model; the file records that model's shape, so it cannot be used on another by mistake. The
held-out score replays the evaluation trace through whole-expert caches of 1/8, 1/4 and 1/2 of a
layer's experts (cache/replay.py), the trace cut into the engine's steps as the model is fit on
them (a prompt one step), for the learned policy, LRU, LFU, LCP and Belady (the bound).
The policy reads routing history only: router inputs a trace holds (`--trace-hidden`) are not used,
since held out they did not help (experiments/probe_reuse_features.py: the current token's router
scores move the share of the gap to Belady by −4 to +2 points) and reading them in the engine would
cost a transfer per layer.
Side effects: reads traces, writes the policy file (whole or not at all).
"""

from __future__ import annotations

import math

from moepic.commands import arguments
from moepic.errors import ConfigError

NAME = "train-policy"
HELP = "fit the learned cache policy to Belady's choices on routing traces"
COMPARED = ("lru", "lfu", "lcp", "belady")  # learned.ONLINE and the bound
SHARES = (0.125, 0.25, 0.5)


def add_parser(subparsers):
    train = subparsers.add_parser(NAME, help=HELP)
    train.add_argument("--trace", action="append", required=True, metavar="FILE",
                       help="routing trace to learn from: .npz (moepic generate --record-trace) or .jsonl (repeatable)")
    train.add_argument("--out", required=True, metavar="FILE.json", help="the policy file to write")
    train.add_argument("--eval-trace", metavar="FILE", help="a held-out trace of the same model: hit rates against LRU, LFU, LCP, Belady")
    train.add_argument("--num-experts", type=int, help="experts per MoE layer (a .jsonl log names only the ids it saw)")
    train.add_argument("--horizon", type=int, default=1, help="label: the expert is used within this many tokens")
    train.add_argument("--ridge", type=float, default=1.0, help="ridge penalty of the least-squares fit")
    train.add_argument("--generic", action="store_true", help="record no model shape: the file serves any model")
    train.add_argument("--features", metavar="GROUP,…", help="fit on these feature groups only (recency, frequency, gap, "
                       "request; default: all), for ablations")
    arguments.add_json(train)
    return train


def run(args) -> dict:
    from moepic.outputs import check_writable
    from moepic.policies.learned import check_one_shape, train_reuse_model
    from moepic.policies.reuse import FEATURES
    from moepic.tracing import load_any_trace

    if args.horizon < 1 or args.horizon > 1 << 20:
        raise ConfigError(f"train-policy --horizon must be an integer from 1 to {1 << 20}, got {args.horizon}")
    if not (math.isfinite(args.ridge) and args.ridge >= 0):
        raise ConfigError(f"train-policy --ridge must be a finite number >= 0, got {args.ridge}")
    if args.num_experts is not None and args.num_experts < 1:
        raise ConfigError(f"train-policy --num-experts must be >= 1, got {args.num_experts}")
    groups = None if args.features is None else tuple(g.strip() for g in args.features.split(","))
    if groups is not None:
        from moepic.policies.reuse import feature_mask

        try:
            feature_mask(groups)
        except ValueError as e:
            raise ConfigError(f"train-policy --features: {e}") from None
    check_writable(args.out, "learned policy")  # before reading and fitting, not after
    traces = [load_any_trace(path, num_experts=args.num_experts) for path in args.trace]
    held_out = None if args.eval_trace is None else load_any_trace(args.eval_trace, num_experts=args.num_experts)
    if held_out is not None:
        check_one_shape([*traces, held_out], [*args.trace, args.eval_trace])
    model = train_reuse_model(traces, horizon=args.horizon, ridge=args.ridge, generic=args.generic, names=args.trace, groups=groups)
    model.save(args.out)
    report = {"out": args.out, "trained_on": list(model.trained_on), "horizon": model.horizon,
              "weights": dict(zip(FEATURES, model.weights_F.tolist())), "bias": model.bias}
    if held_out is not None:
        report["eval_trace"] = args.eval_trace
        report["hit_rates"] = held_out_hit_rates(model, held_out)
    return report


def held_out_hit_rates(model, trace) -> dict[str, dict[str, float]]:
    """{share of a layer's experts cached: {policy: hit rate}} on `trace`, whole-expert caches."""
    from moepic.cache.layout import CacheLayout, slot_count_layout
    from moepic.cache.replay import replay_trace
    from moepic.cache.stats import total
    from moepic.policies import POLICIES
    from moepic.policies.base import build_policy_on
    from moepic.policies.learned import LearnedPolicy
    from moepic.sim.steps import trace_steps

    out, steps = {}, trace_steps(trace)
    for share in SHARES:
        slots = max(1, round(share * trace.num_experts))
        layout = CacheLayout(layers=tuple(slot_count_layout(l, trace.num_experts, slots) for l in trace.moe_layers),
                             staging_experts=trace.top_k, dtype_bytes=1)
        policies = {name: build_policy_on(POLICIES[name].config(), trace) for name in COMPARED} | {"learned": LearnedPolicy(model=model)}
        out[f"{share:g}"] = {name: total(replay_trace(trace, layout, policy, steps)).hit_rate for name, policy in policies.items()}
    return out


def text(report: dict) -> str:
    from moepic.policies.learned import gap_closed

    lines = [f"wrote {report['out']} (horizon {report['horizon']}; trained on {', '.join(report['trained_on'])})",
             "weights: " + ", ".join(f"{name} {w:+.3f}" for name, w in report["weights"].items())]
    if "hit_rates" in report:
        names = ["learned", *COMPARED]
        lines += [f"hit rate on {report['eval_trace']} (whole experts cached):",
                  f"{'cached':>8} " + " ".join(f"{n:>8}" for n in names) + "   gap to belady closed"]
        for share, rates in report["hit_rates"].items():
            closed = gap_closed(rates, "learned")
            lines.append(f"{float(share):>8.1%} " + " ".join(f"{rates[n]:>8.3f}" for n in names) + "   "
                         + ("n/a" if closed is None else f"{closed:+.0%}"))
    return "\n".join(lines)
