"""What an expert's routing history says about its reuse: the features the learned policy scores
experts by, and the labels it is trained on (Belady's knowledge: when each expert is next used). Pure.

After each step of a MoE layer, per expert (all of them functions of the routing so far, so the
engine, a replay and the simulator compute the same values):

    used_now       1 if the step routed to it
    log_recency    log(1 + tokens since its last use); never used: log(1 + NEVER)
    never_used     1 until its first use
    log_ema_h      log(1 + its activations, each decayed by half every h tokens), h in HALF_LIVES
    log_prev_gap   log(1 + tokens between its last two uses); fewer than two: log(1 + NEVER)
    log_mu         log(1 + its activations in this request) (LCP's μ)

The label of (step, expert) is whether the expert is used within the next `horizon` tokens: the
offline optimum (Belady's MIN) keeps exactly the experts used soonest, so a score that ranks by
this probability imitates it (horizon 1 ranked best of 1, 4, 16 on the shared Mixtral traces).
"""

from __future__ import annotations

import attrs
import numpy as np

from moepic.policies.base import LayerStep
from moepic.sim.steps import trace_steps

HALF_LIVES = (1, 4, 16, 64, 256)  # tokens
NEVER = 4096  # tokens: "never", and the cap of recency and gaps (beyond a cache's memory)
FEATURES = ("used_now", "log_recency", "never_used", *(f"log_ema_{h}" for h in HALF_LIVES), "log_prev_gap", "log_mu")
# Named groups of FEATURES, for fits on some of them (ablations: what each kind of history adds).
FEATURE_GROUPS = {
    "recency": ("used_now", "log_recency", "never_used"),
    "frequency": tuple(f"log_ema_{h}" for h in HALF_LIVES),
    "gap": ("log_prev_gap",),
    "request": ("log_mu",),
}


def feature_mask(groups: tuple[str, ...] | None) -> np.ndarray:
    """bool [F]: the features of `groups` (None: all of them)."""
    if groups is None:
        return np.ones(len(FEATURES), bool)
    unknown = sorted(set(groups) - set(FEATURE_GROUPS))
    if unknown:
        raise ValueError(f"unknown feature group {unknown[0]!r}; known: {', '.join(FEATURE_GROUPS)}")
    chosen = {name for group in groups for name in FEATURE_GROUPS[group]}
    return np.array([name in chosen for name in FEATURES])


@attrs.frozen(eq=False)
class ReuseState:
    used_E: np.ndarray  # bool: in the latest step
    last_used_E: np.ndarray  # float64 clock of the latest use; -inf never (so that now - it is inf)
    prev_gap_E: np.ndarray  # float64 tokens between the last two uses; NEVER unknown
    ema_HE: np.ndarray  # float64 decayed activations per half-life
    mu_E: np.ndarray  # int64 activations in this request
    now: int  # the clock after the latest step


def initial_state(num_experts: int) -> ReuseState:
    return ReuseState(np.zeros(num_experts, bool), np.full(num_experts, -np.inf), np.full(num_experts, float(NEVER)),
                      np.zeros((len(HALF_LIVES), num_experts)), np.zeros(num_experts, np.int64), 0)


# Per token; a decode step (one token after the last) uses it as is. The policy runs every layer
# step of the engine, so these functions keep to a few numpy calls each (~10 µs a step together).
_DECAY_PER_TOKEN_H1 = np.array([[2.0 ** (-1.0 / h)] for h in HALF_LIVES])


def advanced(state: ReuseState, step: LayerStep) -> ReuseState:
    """The state after `step` (a new value)."""
    counts_E = step.counts_E
    used_E = counts_E > 0
    elapsed = step.clock + step.tokens - state.now
    decay_H1 = _DECAY_PER_TOKEN_H1 if elapsed == 1 else _DECAY_PER_TOKEN_H1**elapsed
    return ReuseState(
        used_E=used_E,
        last_used_E=np.where(used_E, float(step.clock), state.last_used_E),
        # A first use leaves the gap unknown: clock - (-inf) is capped to NEVER, its value before.
        prev_gap_E=np.where(used_E, np.minimum(step.clock - state.last_used_E, NEVER), state.prev_gap_E),
        ema_HE=state.ema_HE * decay_H1 + counts_E,
        mu_E=counts_E.copy() if step.new_request else state.mu_E + counts_E,  # a copy: states share no arrays with steps
        now=step.clock + step.tokens,
    )


_ROW = {name: f for f, name in enumerate(FEATURES)}
_EMA_ROWS = slice(_ROW[f"log_ema_{HALF_LIVES[0]}"], _ROW[f"log_ema_{HALF_LIVES[-1]}"] + 1)


def _log_runs() -> list[slice]:
    """The runs of consecutive log_ features (each goes through log1p in place in one call)."""
    runs, start = [], None
    for f, name in enumerate((*FEATURES, "")):
        if name.startswith("log_") and start is None:
            start = f
        elif not name.startswith("log_") and start is not None:
            runs.append(slice(start, f))
            start = None
    return runs


_LOG_RUNS = _log_runs()


def features(state: ReuseState) -> np.ndarray:
    """[E, F] in FEATURES' order."""
    out_FE = np.empty((len(FEATURES), len(state.used_E)))
    out_FE[_ROW["used_now"]] = state.used_E
    out_FE[_ROW["never_used"]] = state.last_used_E < 0
    np.minimum(state.now - state.last_used_E, NEVER, out=out_FE[_ROW["log_recency"]])
    out_FE[_EMA_ROWS] = state.ema_HE
    out_FE[_ROW["log_prev_gap"]] = state.prev_gap_E
    out_FE[_ROW["log_mu"]] = state.mu_E
    for run in _LOG_RUNS:
        np.log1p(out_FE[run], out=out_FE[run])
    return out_FE.T


def feature_series(layer: int, num_experts: int, counts_SE, clock_S, tokens_S, new_request_S) -> np.ndarray:
    """[S, E, F]: the features after each of S steps of a layer, from the initial state."""
    state, out = initial_state(num_experts), np.empty((len(counts_SE), num_experts, len(FEATURES)))
    for s, (counts_E, clock, tokens, new) in enumerate(zip(counts_SE, clock_S, tokens_S, new_request_S)):
        state = advanced(state, LayerStep(layer=layer, clock=int(clock), tokens=int(tokens), counts_E=counts_E, new_request=bool(new)))
        out[s] = features(state)
    return out


def reuse_labels(counts_SE: np.ndarray, clock_S: np.ndarray, tokens_S: np.ndarray, horizon: int) -> np.ndarray:
    """[S, E] bool: expert e is used by a later step starting within `horizon` tokens of step s's end."""
    return tokens_to_next_use(counts_SE, clock_S, tokens_S) < horizon


def tokens_to_next_use(counts_SE: np.ndarray, clock_S: np.ndarray, tokens_S: np.ndarray) -> np.ndarray:
    """[S, E] float64: tokens from step s's end to the start of the next step using expert e (inf: none)."""
    S, E = counts_SE.shape
    next_use_E, out_SE = np.full(E, np.inf), np.empty((S, E))
    for s in range(S - 1, -1, -1):
        out_SE[s] = next_use_E - (clock_S[s] + tokens_S[s])
        next_use_E = np.where(counts_SE[s] > 0, clock_S[s], next_use_E)
    return out_SE


def reuse_samples(trace, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Every step of every MoE layer of `trace`: features [M, E, F] and labels [M, E], one row per
    layer step. The trace is cut into the steps the engine takes (moepic/sim/steps.py: a prompt is
    one step, each generated token one), so that the states a model is fit on are those it ranks in:
    fit with each prompt token a step of its own, the bundled model's policy fell below LCP in the
    simulator (-11 % / -28 % of the gap to Belady at 12.5 % / 25 %), and rose above it fit on these."""
    steps, E = trace_steps(trace), trace.num_experts
    clock_S = steps.start_S.astype(np.int64)
    features, labels = [np.zeros((0, E, len(FEATURES)))], [np.zeros((0, E), bool)]
    for column, layer in enumerate(trace.moe_layers):
        counts_SE = steps.counts_SE(trace, column)
        features.append(feature_series(layer, E, counts_SE, clock_S, steps.tokens_S, steps.new_request_S))
        labels.append(reuse_labels(counts_SE, clock_S, steps.tokens_S, horizon))
    return np.concatenate(features), np.concatenate(labels)
