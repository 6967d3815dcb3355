"""Synthetic routing traces with controllable statistics, fitted to a real trace or carried to another shape.

Pure, except that generation draws from a numpy Generator seeded by the caller.

At MoE layer l, token t picks K distinct experts by sampling without replacement (Gumbel top-k)
from router-like logits, one term per law:

    logit_E = -skew · q_E^1.5                  popularity: q_E is the expert's rank quantile
            + reuse · recent_E                 recent_E: share of the sequence's past tokens that
                                               used E at this layer, token t-d weighted (1-decay)·decay^(d-1)
            + correlation · mapped_E           mapped_E: 1 for the experts that token t's layer l-1
                                               experts map to (a fixed seeded map), else 0

Which expert holds which popularity rank is a seeded permutation per layer, and the map sends
layer l-1's expert of rank j to layer l's expert of rank j, so layers agree on what is popular.
`recent` is a reuse-distance distribution: what LRU caches see. Cell (t, l) depends only on cells
(t-d, l) and (t, l-1), so generation sweeps anti-diagonals t + l, vectorized over layers and sequences.
Shapes: S sequences, T tokens per sequence, N tokens, L MoE layers, K top-k, E experts; l the layers
of one anti-diagonal (d: those past layer 0); fitting: P laws, Y statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np

from moepic.analysis.routing_stats import frequency_hit_curve, next_layer_predictability, recency_hit_curve
from moepic.outputs import write_text_atomic
from moepic.tracing.trace import RoutingTrace, TraceError

FORMAT, VERSION = "moepic-synthetic-routing", 1
LAWS = ("skew", "reuse", "decay", "correlation")
# Popularity logits fall as rank quantile^1.5: a flat top and a rarely used bottom. Of 1, 1.5, 2 and a
# Zipf law, it fitted the Mixtral traces' hit-rate curves best; Zipf gives the busiest expert too much.
_SHAPE = 1.5


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=float)))


@attrs.frozen(kw_only=True)
class SyntheticRouting:
    """The synthetic router: model shape, and per MoE layer one value of each law (see the module)."""

    num_experts: int
    top_k: int
    skew: tuple[float, ...] = attrs.field(converter=_floats)  # popularity logit fall, ≥ 0 (0: uniform)
    reuse: tuple[float, ...] = attrs.field(converter=_floats)  # logit boost of recently used experts, ≥ 0
    decay: tuple[float, ...] = attrs.field(converter=_floats)  # how far back "recent" looks, [0, 1)
    correlation: tuple[float, ...] = attrs.field(converter=_floats)  # logit boost of mapped experts, ≥ 0
    weight_alpha: float = 1.0  # routing weights: sorted Dirichlet(alpha); smaller is more peaked
    tokens_per_sequence: int = 256  # a request's decode length: recent use is forgotten between requests
    source: str = ""

    def __attrs_post_init__(self) -> None:
        for name in ("num_experts", "top_k", "tokens_per_sequence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        lengths = {name: len(getattr(self, name)) for name in LAWS}
        if len(set(lengths.values())) != 1 or not lengths["skew"]:
            raise ValueError(f"skew, reuse, decay and correlation need one value per MoE layer each, got lengths {lengths}")
        for name in LAWS:
            high, text = (1.0, "[0, 1)") if name == "decay" else (np.inf, "[0, inf)")
            for layer, v in enumerate(getattr(self, name)):
                if not 0 <= v < high:
                    raise ValueError(f"{name}[{layer}] must be in {text}, got {v}")
        if not 0 < self.weight_alpha < np.inf:
            raise ValueError(f"weight_alpha must be in (0, inf), got {self.weight_alpha}")
        if self.tokens_per_sequence < 1:
            raise ValueError(f"tokens_per_sequence must be at least 1, got {self.tokens_per_sequence}")

    @property
    def num_layers(self) -> int:
        return len(self.skew)

    def for_shape(self, num_experts: int, top_k: int, num_layers: int) -> SyntheticRouting:
        """The same laws for another model shape: each per-layer value interpolated over relative depth
        (first MoE layer 0, last 1), the first layer's correlation 0 (nothing before it).

        Every law is kept as a logit, and logits transfer across E: skew is defined over rank
        *quantile*, so the top quarter of 60 experts keeps the edge the top quarter of 8 had (the
        busiest single expert's share shrinks, as it should); reuse and correlation multiply an
        expert's odds, not its absolute chance, which falls as the pool grows; decay is per token.
        """
        old = np.linspace(0.0, 1.0, self.num_layers)
        new = np.linspace(0.0, 1.0, num_layers) if num_layers > 1 else np.zeros(max(num_layers, 0))
        values = {name: np.interp(new, old, getattr(self, name)) for name in LAWS}
        values["correlation"][:1] = 0.0
        shape = f"{num_layers} layers x {num_experts} experts, top-{top_k}"
        return attrs.evolve(self, num_experts=num_experts, top_k=top_k, **values,
                            source=f"{self.source or 'synthetic'}, resampled to {shape}")

    def as_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **attrs.asdict(self)}


def popularity_logits(skew: float, num_experts: int) -> np.ndarray:
    """[E] by rank (most popular first): the popularity law's logits."""
    return -skew * ((np.arange(num_experts) + 0.5) / num_experts) ** _SHAPE


def generation_bytes(tokens: int, sequences: int, *, layers: int, top_k: int, experts: int) -> int:
    """About the peak memory `generate_trace` needs: per token and layer its top-k ids (int64, then
    masked into the trace) and weights (float64 Dirichlet draws, their sort, float32), and per
    sequence, layer and expert the few float64 arrays of one anti-diagonal's logits."""
    return 44 * tokens * layers * top_k + 64 * sequences * layers * experts


def generate_trace(config: SyntheticRouting, tokens: int, seed: int, sequences: int = 1) -> RoutingTrace:
    """`tokens` decode steps in `sequences` requests of (nearly) equal length. Same seed, same trace."""
    if tokens < 0 or not 1 <= sequences <= max(tokens, 1):
        raise ValueError(f"need tokens >= 0 and 1 <= sequences <= max(tokens, 1), got tokens={tokens}, sequences={sequences}")
    E, K, L, S = config.num_experts, config.top_k, config.num_layers, sequences
    T = -(-tokens // S)
    rng = np.random.default_rng(seed)
    ranked_LE = np.stack([rng.permutation(E) for _ in range(L)])  # [l, j]: layer l's expert of rank j
    logit_LE = np.zeros((L, E))
    np.put_along_axis(logit_LE, ranked_LE, np.stack([popularity_logits(s, E) for s in config.skew]), axis=1)
    map_LE = np.zeros((L, E), dtype=np.int64)  # [l, e]: where layer l-1's expert e sends token t at layer l
    np.put_along_axis(map_LE[1:], ranked_LE[:-1], ranked_LE[1:], axis=1)
    reuse_L, decay_L = np.array(config.reuse), np.array(config.decay)
    correlation_L = np.array(config.correlation) * (np.arange(L) > 0)
    ids_STLK = np.zeros((S, T, L, K), dtype=np.int64)
    recent_SLE = np.zeros((S, L, E))  # decayed sum over past tokens of their experts, 1/K each
    seen_SL = np.zeros((S, L))  # the weight that sum holds so far, 1 - decay^t: dividing makes it a share
    for diagonal in range(T + L - 1):
        ls = np.arange(max(0, diagonal - T + 1), min(L, diagonal + 1))
        ts = diagonal - ls
        recent_SlE = K * recent_SLE[:, ls] / np.maximum(seen_SL[:, ls, None], 1e-300)
        mapped_SlE = np.zeros((S, len(ls), E))  # layer 0 keeps zeros: nothing before it
        deeper = np.flatnonzero(ls > 0)  # a tail of ls, so mapped_SlE[:, deeper[0]:] is their view
        if deeper.size:
            previous_SdK = ids_STLK[:, ts[deeper], ls[deeper] - 1]
            targets_SdK = map_LE[ls[deeper]][np.arange(deeper.size)[None, :, None], previous_SdK]
            np.put_along_axis(mapped_SlE[:, deeper[0]:], targets_SdK, 1.0, axis=-1)
        logits_SlE = logit_LE[ls] + reuse_L[ls, None] * recent_SlE + correlation_L[ls, None] * mapped_SlE
        # Top-K of logits + Gumbel noise draws K experts without replacement, each in proportion to exp(logit).
        chosen_SlK = np.argsort(-(logits_SlE + rng.gumbel(size=logits_SlE.shape)), axis=-1)[..., :K]
        ids_STLK[:, ts, ls] = chosen_SlK
        used_SlE = np.zeros((S, len(ls), E))
        np.put_along_axis(used_SlE, chosen_SlK, 1.0 / K, axis=-1)
        d_l = decay_L[ls]
        recent_SLE[:, ls] = d_l[:, None] * recent_SLE[:, ls] + (1 - d_l)[:, None] * used_SlE
        seen_SL[:, ls] = d_l * seen_SL[:, ls] + (1 - d_l)
    lengths_S = tokens // S + (np.arange(S) < tokens % S)
    weights_NLK = -np.sort(-rng.dirichlet(np.full(K, config.weight_alpha), size=(tokens, L)), axis=-1)
    return RoutingTrace(
        model="synthetic",
        moe_layers=tuple(range(L)),
        num_experts=E,
        top_k=K,
        expert_ids_NLK=ids_STLK[np.arange(T) < lengths_S[:, None]],
        weights_NLK=weights_NLK.astype(np.float32),
        sequence_N=np.repeat(np.arange(S), lengths_S).astype(np.int32),
        position_N=(np.arange(tokens) - np.repeat(np.cumsum(lengths_S) - lengths_S, lengths_S)).astype(np.int32),
        prefill_N=np.zeros(tokens, dtype=bool),
        source=f"moepic synthetic routing, seed {seed}, {S} sequences: {json.dumps(config.as_dict())}",
    )


# Fitting. Each law is fitted to the statistic it controls, all computed on decode steps:
#   skew        the frequency-rank hit curve: share of routed experts among the C most used so far (≈ LFU)
#   reuse,decay the recency-rank hit curve: … among the C most recently used (≈ LRU; its reuse distances)
#   correlation the next-layer predictability (in sample; on the synthetic trace averaged over pieces
#               as long as the real one, so both carry the same small-sample optimism)
# for C = 1..E-1. The laws interact (reuse also concentrates load, correlation carries popularity),
# so they are solved together: Gauss-Newton on synthetic traces of a fixed seed, with a per-layer
# Jacobian from finite differences, refreshed every few steps, keeping each layer's best iterate.
_FIT_START = np.array([1.0, 1.0, 0.5, 1.0])
_FIT_HIGH = np.array([6.0, 5.0, 0.9, 6.0])  # decay past 0.9 makes routing near-absorbing: high variance
_FIT_STEP = np.array([0.5, 0.5, 0.15, 0.5])  # finite-difference steps; an iteration moves at most twice


def select_tokens(trace: RoutingTrace, keep) -> RoutingTrace:
    """The trace's tokens that `keep` (a mask or slice) selects (router inputs too, where recorded)."""
    return attrs.evolve(
        trace, expert_ids_NLK=trace.expert_ids_NLK[keep], weights_NLK=trace.weights_NLK[keep],
        sequence_N=trace.sequence_N[keep], position_N=trace.position_N[keep], prefill_N=trace.prefill_N[keep],
        hidden_NLD=None if trace.hidden_NLD is None else trace.hidden_NLD[keep],
    )


def fit_statistics(trace: RoutingTrace, piece: int) -> np.ndarray:
    """[L, 2(E-1)+1]: frequency and recency hit curves, then predictability (averaged over pieces of
    `piece` tokens; 0 for the first layer) weighted √(E-1) so that it counts as much as one curve."""
    pieces = range(0, trace.num_tokens - piece + 1, piece)
    predictable_L = np.mean([next_layer_predictability(select_tokens(trace, slice(i, i + piece))) for i in pieces], axis=0)
    predictable_L = np.nan_to_num(predictable_L) * np.sqrt(trace.num_experts - 1)
    return np.concatenate([frequency_hit_curve(trace), recency_hit_curve(trace), predictable_L[:, None]], axis=1)


def _weight_alpha(trace: RoutingTrace) -> float:
    """Method of moments: a symmetric Dirichlet(α) over K has E[Σ w²] = (α + 1) / (Kα + 1)."""
    K = trace.top_k
    if K == 1 or not trace.num_tokens:
        return 1.0
    w = trace.weights_NLK.astype(np.float64)
    h = float(np.mean(np.sum((w / w.sum(-1, keepdims=True)) ** 2, axis=-1)))
    return float(np.clip((1 - h) / max(h * K - 1, 1e-9), 0.01, 100.0))


def fit_synthetic(trace: RoutingTrace, *, tokens: int = 3000, iterations: int = 10, seed: int = 0) -> SyntheticRouting:
    """Parameters whose synthetic traces (`tokens` long) show `trace`'s decode-step statistics (see above)."""
    decode = select_tokens(trace, ~trace.prefill_N)
    N, L, K = decode.expert_ids_NLK.shape
    E = trace.num_experts
    if N < 2 or tokens < 2:
        raise ValueError(f"fitting needs at least 2 decode steps and tokens >= 2; got {N} and {tokens}")
    layers = np.zeros(L)
    base = SyntheticRouting(
        num_experts=E, top_k=K, skew=layers, reuse=layers, decay=layers, correlation=layers,
        weight_alpha=_weight_alpha(decode), tokens_per_sequence=max(1, round(N / len(np.unique(decode.sequence_N)))),
        source=f"fitted to {trace.source or trace.model or 'a trace'} ({N} decode steps)",
    )
    if E == K:  # every token uses every expert: no law can show
        return base
    piece = min(N, tokens)  # predictability is compared on pieces of one length
    sequences = min(tokens, max(1, round(tokens / base.tokens_per_sequence)))
    target_LY = fit_statistics(decode, piece)

    def simulate(x_LP: np.ndarray) -> np.ndarray:
        config = attrs.evolve(base, **dict(zip(LAWS, x_LP.T)))
        return fit_statistics(generate_trace(config, tokens, seed, sequences), piece)

    x_LP = np.tile(_FIT_START, (L, 1))
    x_LP[0, 3] = 0.0
    best_LP, best_L = x_LP.copy(), np.full(L, np.inf)
    for iteration in range(iterations):
        y_LY = simulate(x_LP)
        error_L = np.abs(target_LY - y_LY).mean(1)
        better = error_L < best_L
        best_LP[better], best_L[better] = x_LP[better], error_L[better]
        if iteration % 4 == 0:  # Jacobian [L, Y, P] by finite differences, stepping down at the bounds
            jacobian_LYP = np.zeros((L, y_LY.shape[1], len(LAWS)))
            for p in range(len(LAWS)):
                step_L = np.where(x_LP[:, p] + _FIT_STEP[p] <= _FIT_HIGH[p], _FIT_STEP[p], -_FIT_STEP[p])
                moved_LP = x_LP.copy()
                moved_LP[:, p] += step_L
                jacobian_LYP[..., p] = (simulate(moved_LP) - y_LY) / step_L[:, None]
            jacobian_LYP[0, :, 3] = 0.0
        # Levenberg-Marquardt step, damped and clipped: the simulated statistics are noisy.
        normal_LPP = jacobian_LYP.transpose(0, 2, 1) @ jacobian_LYP
        ridge_L = 1e-3 * np.trace(normal_LPP, axis1=1, axis2=2) / len(LAWS) + 1e-9
        rhs_LP = np.einsum("lyp,ly->lp", jacobian_LYP, target_LY - y_LY)
        delta_LP = np.linalg.solve(normal_LPP + ridge_L[:, None, None] * np.eye(len(LAWS)), rhs_LP[..., None])[..., 0]
        x_LP = np.clip(x_LP + 0.8 * np.clip(delta_LP, -2 * _FIT_STEP, 2 * _FIT_STEP), 0.0, _FIT_HIGH)
        x_LP[0, 3] = 0.0
    return attrs.evolve(base, **dict(zip(LAWS, best_LP.T)))


def save_synthetic(config: SyntheticRouting, path: str | Path) -> None:
    """All or nothing (moepic.outputs): a failure leaves an older file at `path` as it was."""
    # One key a line, each law's per-layer values on one line: readable and diffable.
    lines = (f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in config.as_dict().items())
    write_text_atomic(path, "synthetic routing parameters", "{\n" + ",\n".join(lines) + "\n}\n")


_KINDS = {"num_experts": int, "top_k": int, "weight_alpha": float, "tokens_per_sequence": int, "source": str}


def load_synthetic(path: str | Path) -> SyntheticRouting:
    """Parameters saved by `save_synthetic` (plain JSON); a bad file raises TraceError naming it and the key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TraceError(f"{path}: synthetic routing parameters not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read synthetic routing parameters ({e})") from None
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise TraceError(f"{path}: keys 'format' and 'version' must be {FORMAT!r} and {VERSION}")
    known = {f.name: f for f in attrs.fields(SyntheticRouting)}
    for key in data:
        if key not in known and key not in ("format", "version"):
            raise TraceError(f"{path}: unknown key {key!r}; known: {', '.join(known)}")
    values = {}
    for key, field in known.items():
        if key not in data:
            if field.default is attrs.NOTHING:
                raise TraceError(f"{path}: missing key {key!r}")
            continue
        value = data[key]
        if key in LAWS:
            ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            expected = "a list of numbers, one per MoE layer"
        else:
            kind = _KINDS[key]
            ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
            expected = {int: "an integer", float: "a number", str: "a string"}[kind]
        if not ok:
            raise TraceError(f"{path}: key {key!r} should be {expected}, got {value!r}")
        values[key] = value
    try:
        return SyntheticRouting(**values)
    except ValueError as e:
        raise TraceError(f"{path}: {e}") from None
