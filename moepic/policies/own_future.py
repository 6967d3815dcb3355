"""The future a strategy reads from a trace must be this run's own. Pure.

Belady's MIN and the oracle predictors (oracle, noisy_oracle) are bounds only when the trace they
read is the routing of the very run they serve: a trace of another prompt, or of the same prompt
under other settings, gives a confident but wrong bound. So such a run is stopped with one line:

    before the run   the trace's prompt (its first sequence's prefill) has the run's length
    every step       the trace routes, at the step's tokens and layer, what the run routed
                     (and the run never goes past the trace's end)

The simulator and trace replays run these strategies on the trace they replay, where the checks
hold by construction; they cost one bincount per step (the vectorised form: one per layer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from moepic.errors import ConfigError
from moepic.tracing import RoutingTrace

RECORD_ONE = "record this run's with `moepic generate --record-trace FILE` and the same prompt and settings"


def prompt_tokens(trace: RoutingTrace) -> int:
    """How many tokens the trace's first sequence routed in its prefill (its prompt)."""
    if not trace.num_tokens:
        return 0
    first = trace.sequence_N == trace.sequence_N[0]
    leading = np.cumprod(first & trace.prefill_N)  # 1 up to the first token that is not the first prompt's
    return int(leading.sum())


def check_prompt(where: str, trace: RoutingTrace, run_prompt_tokens: int, user: str) -> None:
    """The trace's prompt has the run's length; `user` names the strategy ("the belady policy")."""
    recorded = prompt_tokens(trace)
    if recorded != run_prompt_tokens:
        raise ConfigError(
            f"{where}: {user} needs the trace of this run, but the trace's prompt has {recorded} tokens and this "
            f"run's {run_prompt_tokens}; {RECORD_ONE}"
        )


def check_run_prompt(strategies: Iterable[object], run_prompt_tokens: int) -> None:
    """Before generating: every strategy that reads the run's future (it has `check_prompt`) checks its trace."""
    for strategy in strategies:
        check = getattr(strategy, "check_prompt", None)
        if check is not None:
            check(run_prompt_tokens)


def trace_counts(trace: RoutingTrace, column: int, clock_S: np.ndarray, tokens_S: np.ndarray) -> np.ndarray:
    """[S, E]: how many of step s's tokens (clock_S[s] onwards, tokens_S[s] of them) the trace routes
    to each expert in `column`. The steps must lie within the trace."""
    # Only the tokens the steps cover: one engine step costs its own tokens, not the whole trace.
    start, stop = int(clock_S.min()), int((clock_S + tokens_S).max())
    ids_NK = trace.expert_ids_NLK[start:stop, column]
    onehot_NE = np.zeros((len(ids_NK), trace.num_experts), dtype=np.int64)
    np.add.at(onehot_NE, (np.repeat(np.arange(len(ids_NK)), ids_NK.shape[1]), ids_NK.ravel()), 1)
    cumulative_NE = np.concatenate([np.zeros((1, trace.num_experts), np.int64), np.cumsum(onehot_NE, axis=0)])
    return cumulative_NE[clock_S + tokens_S - start] - cumulative_NE[clock_S - start]


def check_steps(
    where: str, trace: RoutingTrace, column: int, layer: int, clock_S: Sequence[int], tokens_S: Sequence[int], counts_SE, user: str
) -> None:
    """Each step's routed counts (`counts_SE[s, e]`: step s's tokens that chose expert e) equal the
    trace's at the step's tokens; stop at the first that does not, naming it."""
    clock_S, tokens_S = np.asarray(clock_S, np.int64), np.asarray(tokens_S, np.int64)
    if not len(clock_S):
        return
    end = int((clock_S + tokens_S).max())
    if end > trace.num_tokens:
        raise ConfigError(
            f"{where}: {user} needs the trace of this run, but the run goes past its end (layer {layer} routes token "
            f"{end - 1}; the trace has {trace.num_tokens} tokens); {RECORD_ONE}"
        )
    counts_SE = np.asarray(counts_SE, np.int64)
    expected_SE = trace_counts(trace, column, clock_S, tokens_S)
    differs_S = (expected_SE != counts_SE).any(axis=1)
    if not differs_S.any():
        return
    s = int(np.argmax(differs_S))
    clock, tokens = int(clock_S[s]), int(tokens_S[s])
    if tokens == 1:
        at = f"token {clock}"
        what = f"experts {np.flatnonzero(expected_SE[s]).tolist()}, this run routed {np.flatnonzero(counts_SE[s]).tolist()}"
    else:
        e = int(np.argmax(expected_SE[s] != counts_SE[s]))
        at = f"tokens {clock}-{clock + tokens - 1}"
        what = f"{expected_SE[s, e]} of them to expert {e}, this run {counts_SE[s, e]}"
    raise ConfigError(
        f"{where}: {user} needs the trace of this run, but at layer {layer}, {at} the trace routes {what}; {RECORD_ONE}"
    )


def check_step(where: str, trace: RoutingTrace, column: int, layer: int, clock: int, tokens: int, counts_E, user: str) -> None:
    """One step of `tokens` tokens from `clock`: as `check_steps`."""
    check_steps(where, trace, column, layer, [clock], [tokens], np.asarray(counts_E)[None, :], user)


def routed_counts(ids_per_token: Sequence[Sequence[int]], num_experts: int) -> np.ndarray:
    """[E]: how many tokens chose each expert, from the engine's per-token ids."""
    return np.bincount(np.asarray(ids_per_token, np.int64).ravel(), minlength=num_experts)
