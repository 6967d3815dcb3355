"""Probe: do the current token's hidden state or its routing at the layer before add to the learned
policy's routing-history features, and does another model or target beat its least squares?
Measured held out before building any of them into the engine.

What is known when layer l ranks its experts after a step (moepic/cache/planner.py plans then):
the layer's routing history (the policy's features, policies/reuse.py), the step's hidden state at
layer l, and the step's routing at layers < l. Feature sets, each fit as the policy is
(learned.ranking_least_squares: least squares within a step to "used by the next token"):

    history      the learned policy's features
    +router      + the layer's router scores of the step's tokens (its hidden state through the
                   router: every expert's score, not only the top-k), now and decayed at 4 and 16 tokens
    +same-layer  + P(e used next | experts used now) in this layer, a table fit on the training routing
    +prev-layer  + P(e used next | the step's experts at layer l-1), likewise
    all          all of them

and, on the history features alone, other fits than the policy's:

    MLP          a small MLP (32 tanh units) by binary cross-entropy on "used by the next token"
    pairwise     a linear score by logistic loss on the step's (used-next, unused) pairs
    distance     least squares within a step to -log(1 + tokens to the next use): Belady's own order
    in-sample    the policy's fit, fit on the very routing it is scored on: not a result, a ceiling
                 (what a linear score of the history could reach knowing the test set)

Scored on held-out routing, stepped as the engine steps (a prompt one step): the ranking's AUC
within a step (a used-next expert above an unused one), and the hit rate of a whole-expert cache of
1/8, 1/4 and 1/2 of a layer's experts planned with each score (cache/planner.py), beside LRU, LFU,
LCP and Belady. The bundled model: fit on its routing of kjv-heldout's first half, scored on its
routing of the second (both recorded here, with hidden states). The shared Mixtral traces (no
hidden states: +router does not apply): fit on one, scored on the other.

Run:  python experiments/probe_reuse_features.py [--out experiments/results/learned_policy/probe.txt]
      (the figure: the same name, .png)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from moepic.cache.layout import CacheLayout, slot_count_layout
from moepic.cache.replay import replay_trace
from moepic.cache.stats import total
from moepic.experiments.plots import grouped_bars
from moepic.policies import POLICIES
from moepic.policies.base import build_policy_on, priority_series
from moepic.policies.learned import ONLINE, gap_closed, ranking_least_squares
from moepic.policies.reuse import NEVER, reuse_samples, tokens_to_next_use
from moepic.sim.steps import trace_steps

HERE = Path(__file__).resolve().parent
SHARED = Path("../shared/traces/mixtral-8x7b-instruct-fp8")
SHARES = (0.125, 0.25, 0.5)
ROUTER_HALF_LIVES = (4, 16)
# row: (extra feature groups, fit)
ROWS = {
    "history": ((), "least squares"), "+router": (("router",), "least squares"), "+same-layer": (("same",), "least squares"),
    "+prev-layer": (("prev",), "least squares"), "all": (("router", "same", "prev"), "least squares"),
    "MLP": ((), "mlp"), "pairwise": ((), "pairwise"), "distance": ((), "distance"),
}


def step_router_scores(trace, model, steps) -> np.ndarray:
    """[L, S, E]: each step's mean router score of every expert (its tokens' hidden states through the layer's router)."""
    from moepic.core.routing import router_logits, selection_scores

    step_N = np.repeat(np.arange(steps.num_steps), steps.tokens_S)
    out = np.zeros((len(trace.moe_layers), steps.num_steps, trace.num_experts))
    for column, layer in enumerate(trace.moe_layers):
        ffn = model.weights.layers[layer].ffn
        hidden_TD = torch.from_numpy(trace.hidden_NLD[:, column]).to(ffn.router_ED.dtype)
        with torch.no_grad():
            logits_TE = router_logits(hidden_TD, ffn.router_ED, model.spec.moe.router, ffn.router_logit_bias_E)
            scores_TE = selection_scores(logits_TE, model.spec.moe.router, ffn.router_bias_E).double().numpy()
        np.add.at(out[column], step_N, scores_TE)
    return out / steps.tokens_S[None, :, None]


def decayed(values_SE: np.ndarray, tokens_S: np.ndarray, half_life: int) -> np.ndarray:
    """[S, E]: Σ of earlier steps' values, each decayed by half every `half_life` tokens."""
    out, running = np.empty_like(values_SE), np.zeros(values_SE.shape[1])
    for s, (values_E, tokens) in enumerate(zip(values_SE, tokens_S)):
        running = running * 2.0 ** (-tokens / half_life) + values_E
        out[s] = running
    return out


def used_LSE(trace, steps) -> np.ndarray:
    return np.stack([steps.counts_SE(trace, c) > 0 for c in range(len(trace.moe_layers))])


def transition_tables(trace) -> tuple[np.ndarray, np.ndarray]:
    """[L, E, E] each: P(e used at the next step | e' used now) in the same layer, and given e' used
    now at the layer before (layer 0: its own), counted over `trace`'s steps with add-one smoothing."""
    steps = trace_steps(trace)
    used = used_LSE(trace, steps).astype(np.float64)
    L, S, E = used.shape
    same, prev = np.empty((L, E, E)), np.empty((L, E, E))
    for l in range(L):
        nxt = used[l, 1:]
        for table, now in ((same, used[l, :-1]), (prev, used[max(l - 1, 0), :-1])):
            table[l] = (now.T @ nxt + 1) / (now.sum(0)[:, None] + 2)
    return same, prev


def extra_features(trace, model, tables, wanted: tuple[str, ...]) -> np.ndarray:
    """[L·S, E, X] in reuse_samples' row order (layer by layer, step by step)."""
    steps = trace_steps(trace)
    L, E = len(trace.moe_layers), trace.num_experts
    cols = []
    if "router" in wanted:
        scores = step_router_scores(trace, model, steps)
        cols += [scores] + [np.log1p(np.stack([decayed(s, steps.tokens_S, h) for s in scores])) for h in ROUTER_HALF_LIVES]
    used = used_LSE(trace, steps).astype(np.float64)
    for name, table in zip(("same", "prev"), tables):
        if name in wanted:
            source = used if name == "same" else np.concatenate([used[:1], used[:-1]])
            cols.append(np.einsum("lse,lef->lsf", source, table) / np.maximum(source.sum(-1, keepdims=True), 1))
    if not cols:
        return np.zeros((L * steps.num_steps, E, 0))
    return np.stack(cols, axis=-1).reshape(L * steps.num_steps, E, len(cols))


def within_step_auc(score_ME: np.ndarray, labels_ME: np.ndarray) -> float:
    """Mean over steps with both kinds of expert: the share of (used-next, unused) pairs ranked right (ties: half)."""
    aucs = []
    for s_E, y_E in zip(score_ME, labels_ME):
        pos, neg = s_E[y_E], s_E[~y_E]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            aucs.append(((diff > 0) + 0.5 * (diff == 0)).mean())
    return float(np.mean(aucs))


class _Precomputed:
    """Priorities computed ahead, [L, S, E], as the policy a replay asks for its series."""

    def __init__(self, trace, priority_LSE: np.ndarray) -> None:
        self.column = {layer: c for c, layer in enumerate(trace.moe_layers)}
        self.priority_LSE = priority_LSE

    def init(self, layer: int, num_experts: int) -> None:
        return None

    def priority_series(self, layer, num_experts, counts_SE, clock_S, tokens_S, new_request_S) -> np.ndarray:
        return self.priority_LSE[self.column[layer]]


def planned_hit_rate(trace, priority_LSE: np.ndarray, slots: int) -> float:
    """The hit rate of whole-expert caches of `slots` planned with these priorities, the trace
    replayed as the engine steps it (cache/replay.py)."""
    layout = CacheLayout(layers=tuple(slot_count_layout(l, trace.num_experts, slots) for l in trace.moe_layers),
                         staging_experts=trace.top_k, dtype_bytes=1)
    return total(replay_trace(trace, layout, _Precomputed(trace, priority_LSE), trace_steps(trace))).hit_rate


def fitted_scorer(fit: str, X_MEF: np.ndarray, used_next_ME: np.ndarray, to_next_use_ME: np.ndarray):
    """A function [M', E, F] → scores [M', E], fit on the training rows by `fit` (ROWS)."""
    if fit in ("least squares", "distance"):
        target_ME = used_next_ME if fit == "least squares" else -np.log1p(np.minimum(to_next_use_ME, NEVER))
        mean_F, std_F, w_F = ranking_least_squares(X_MEF, target_ME, 1.0)
        return lambda X: ((X - mean_F) / std_F) @ w_F
    flat = X_MEF.reshape(-1, X_MEF.shape[-1])
    mean_F, std_F = flat.mean(0), flat.std(0)
    std_F = np.where(std_F > 1e-9, std_F, 1.0)
    Z_MEF = torch.from_numpy((X_MEF - mean_F) / std_F)
    y_ME = torch.from_numpy(used_next_ME.astype(np.float64))
    torch.manual_seed(0)
    F = X_MEF.shape[-1]
    net = torch.nn.Sequential(torch.nn.Linear(F, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)) if fit == "mlp" else torch.nn.Linear(F, 1)
    net = net.double()
    pairs_MEE = (y_ME[:, :, None] > 0) & (y_ME[:, None, :] == 0)

    def loss() -> torch.Tensor:
        s_ME = net(Z_MEF).squeeze(-1)
        if fit == "mlp":
            return torch.nn.functional.binary_cross_entropy_with_logits(s_ME, y_ME)
        return torch.nn.functional.softplus(s_ME[:, None, :] - s_ME[:, :, None])[pairs_MEE].mean()

    optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(300):
        optimiser.zero_grad()
        loss().backward()
        optimiser.step()
    return lambda X: net(torch.from_numpy((X - mean_F) / std_F)).squeeze(-1).detach().numpy()


def probe(name: str, train, held, model) -> tuple[list[str], dict[str, list[float | None]]]:
    """The table's lines for one (training routing, held-out routing) pair, and each fitted row's
    share of the gap to Belady closed at SHARES (for the figure)."""
    steps = trace_steps(held)
    L, S, E = len(held.moe_layers), steps.num_steps, held.num_experts
    tables = transition_tables(train)
    history_train, labels_train = reuse_samples(train, 1)
    history_held, labels_held = reuse_samples(held, 1)
    train_steps = trace_steps(train)
    to_next_use = np.concatenate([tokens_to_next_use(train_steps.counts_SE(train, c), train_steps.start_S, train_steps.tokens_S)
                                  for c in range(len(train.moe_layers))])
    scores = {}  # row → priority [L, S, E] on the held-out steps
    for policy in (*ONLINE, "belady"):
        built = build_policy_on(POLICIES[policy].config(), held)
        scores[policy] = np.stack([priority_series(built, layer, E, steps.counts_SE(held, c), steps.tokens_S, steps.new_request_S)
                                   for c, layer in enumerate(held.moe_layers)])
    for row, (wanted, fit) in ROWS.items():
        if "router" in wanted and held.hidden_NLD is None:
            continue
        X_train = np.concatenate([history_train, extra_features(train, model, tables, wanted)], axis=-1)
        X_held = np.concatenate([history_held, extra_features(held, model, tables, wanted)], axis=-1)
        scores[row] = fitted_scorer(fit, X_train, labels_train, to_next_use)(X_held).reshape(L, S, E)
    scores["in-sample"] = fitted_scorer("least squares", history_held, labels_held, None)(history_held).reshape(L, S, E)
    rates = {row: {share: planned_hit_rate(held, score, max(1, round(share * E))) for share in SHARES} for row, score in scores.items()}
    lines = [f"{name}: fit on {train.num_tokens} tokens, scored on {held.num_tokens} ({S} steps × {L} layers)",
             f"  {'':<12} {'AUC':>6} " + " ".join(f"{f'hit@{s:g}':>9}" for s in SHARES) + "   gap to Belady closed"]
    closed = {row: [gap_closed({p: rates[p][share] for p in (*ONLINE, "belady", row)}, row) for share in SHARES] for row in scores}
    for row, score in scores.items():
        lines.append(f"  {row:<12} {within_step_auc(score.reshape(L * S, E), labels_held):>6.3f} "
                     + " ".join(f"{rates[row][share]:>9.3f}" for share in SHARES) + "   "
                     + " ".join("n/a" if c is None else f"{c:+.0%}" for c in closed[row]))
    return lines, {row: shares for row, shares in closed.items() if row not in (*ONLINE, "belady")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results" / "learned_policy" / "probe.txt"))
    args = parser.parse_args()
    from moepic.checkpoint.load import load_model
    from moepic.default_model import default_model_dir
    from moepic.experiments.backends import recorded_run, training_routing
    from moepic.experiments.config import RecordedConfig
    from moepic.tracing import load_any_trace

    folder = str(default_model_dir())
    # The ablation's bundled workload (experiments/ablate_learned_policy.py) and its training routing.
    held = recorded_run(folder, RecordedConfig(requests=8, new_tokens=64)).trace
    pairs = {"bundled model (kjv-moe-tiny, 16 experts, top-2)": (training_routing(folder), held, load_model(folder))}
    mixtral = {name: SHARED / f"{name}_2_routing.jsonl" for name in ("gsm8k", "humaneval")}
    if all(path.is_file() for path in mixtral.values()):
        traces = {name: load_any_trace(path, num_experts=8) for name, path in mixtral.items()}
        pairs["Mixtral-8x7B gsm8k (fit on humaneval)"] = (traces["humaneval"], traces["gsm8k"], None)
        pairs["Mixtral-8x7B humaneval (fit on gsm8k)"] = (traces["gsm8k"], traces["humaneval"], None)
    lines, panels = [], {}
    for name, (train, evaluated, model) in pairs.items():
        table, panels[name] = probe(name, train, evaluated, model)
        lines += table
    if len(pairs) == 1:
        lines.append(f"(the shared Mixtral traces are not at {SHARED}: their rows are left out)")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    figure = grouped_bars(panels, [f"{share:.1%} cached" for share in SHARES], out.with_suffix(".png"), percent=True,
                          title="share of the hit-rate gap to Belady closed, held out (vs the best of LRU/LFU/LCP)",
                          ylabel="gap closed")
    print(f"wrote {out}, {figure}")


if __name__ == "__main__":
    main()
