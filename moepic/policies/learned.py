"""The learned policy: an expert's priority is a linear score of its reuse features
(policies/reuse.py), fit by least squares to Belady's labels (used within the next `horizon`
tokens) within each step of recorded routing by `moepic train-policy`. Pure, apart from reading its file.

The model file is JSON (never a pickle): format, version, the features it was fit on, their
means and spreads, the weights and bias, the horizon, and the model shape it was trained for
(experts per layer, MoE layers: a file used on another shape is an error naming both). Without a
file the policy uses the built-in generic model (`reuse_default.json`), trained on the bundled
model's own routing (experiments/train_reuse_default.py); it fits any shape, since every feature is
an expert's own history, and it has seen none of the shared Mixtral traces.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import final

import attrs
import numpy as np

from moepic.errors import ConfigError
from moepic.policies import reuse
from moepic.policies.base import LayerStep, PolicyConfig, register_policy

FORMAT, VERSION = "moepic-reuse-policy", 1
DEFAULT_FILE = Path(__file__).with_name("reuse_default.json")


@attrs.frozen(eq=False, kw_only=True)
class ReuseModel:
    weights_F: np.ndarray
    bias: float
    mean_F: np.ndarray
    std_F: np.ndarray
    horizon: int
    num_experts: int | None = None  # the shape it was trained for; None: any (the generic model)
    moe_layers: tuple[int, ...] | None = None
    trained_on: tuple[str, ...] = ()
    source: str = "in memory"  # its file, for messages

    # The score with its standardisation folded in: one product and one add a step.
    scale_F: np.ndarray = attrs.field(init=False)
    offset: float = attrs.field(init=False)

    @scale_F.default
    def _scale(self) -> np.ndarray:
        return self.weights_F / self.std_F

    @offset.default
    def _offset(self) -> float:
        return float(self.bias - self.mean_F @ self.scale_F)

    def score(self, features_EF: np.ndarray) -> np.ndarray:
        """float64 [E]: higher for experts more likely used within the horizon:
        ((features - mean) / std) · weights + bias."""
        return features_EF @ self.scale_F + self.offset

    def check_fits(self, layer: int, num_experts: int) -> None:
        if self.num_experts is not None and num_experts != self.num_experts:
            raise ConfigError(f"{self.source}: the learned policy was trained for {self.num_experts} experts per "
                              f"layer; this model's layer {layer} has {num_experts}")
        if self.moe_layers is not None and layer not in self.moe_layers:
            raise ConfigError(f"{self.source}: the learned policy was trained for a model whose MoE layers are "
                              f"{_layers_text(self.moe_layers)}; this model's layer {layer} is not among them")

    def as_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "features": list(reuse.FEATURES), "horizon": self.horizon,
                "weights": self.weights_F.tolist(), "bias": self.bias, "mean": self.mean_F.tolist(),
                "std": self.std_F.tolist(), "num_experts": self.num_experts,
                "moe_layers": None if self.moe_layers is None else list(self.moe_layers), "trained_on": list(self.trained_on)}

    def save(self, path: str | Path) -> None:
        from moepic.outputs import write_text_atomic

        write_text_atomic(path, "learned policy", json.dumps(self.as_json(), indent=1) + "\n")  # all or nothing


def _layers_text(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}–{layers[-1]}" if list(layers) == list(range(layers[0], layers[-1] + 1)) else str(list(layers))


def load_reuse_model(path: str | Path) -> ReuseModel:
    """A `moepic train-policy` file, checked field by field (a clear error names the file and field)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: learned policy file not found (moepic train-policy writes one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as a learned policy (JSON: {e})") from None

    def field(name: str, kind, check=lambda v: True, why: str = ""):
        value = data.get(name) if isinstance(data, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or not check(value):
            raise ConfigError(f"{path}: field {name!r} should be {why or kind.__name__}, got {value!r}"[:300])
        return value

    field("format", str, lambda v: v == FORMAT, f"{FORMAT!r} (this is not a moepic train-policy file)")
    field("version", int, lambda v: v == VERSION, f"{VERSION}")
    names = field("features", list, lambda v: v == list(reuse.FEATURES), f"the features {list(reuse.FEATURES)}")
    F = len(names)

    def vector(name: str, positive: bool = False) -> np.ndarray:
        values = field(name, list, lambda v: len(v) == F and all(isinstance(x, (int, float)) and math.isfinite(x) and
                                                               (x > 0 or not positive) for x in v),
                       f"{F} finite{' positive' if positive else ''} numbers")
        return np.asarray(values, dtype=np.float64)

    experts = data.get("num_experts")
    layers = data.get("moe_layers")
    if experts is not None:
        field("num_experts", int, lambda v: v >= 1, "a positive integer or null")
    if layers is not None:
        field("moe_layers", list, lambda v: v and all(isinstance(x, int) and x >= 0 for x in v), "a list of layer indices or null")
    return ReuseModel(
        weights_F=vector("weights"), bias=float(field("bias", (int, float), math.isfinite, "a finite number")),
        mean_F=vector("mean"), std_F=vector("std", positive=True), horizon=field("horizon", int, lambda v: v >= 1, "a positive integer"),
        num_experts=experts, moe_layers=None if layers is None else tuple(layers),
        trained_on=tuple(str(t) for t in data.get("trained_on") or ()), source=str(path),
    )


def fit_reuse_model(features_MEF: np.ndarray, labels_ME: np.ndarray, *, horizon: int, ridge: float = 1.0,
                    groups: tuple[str, ...] | None = None, **shape) -> ReuseModel:
    """The linear score of reuse.FEATURES that `ranking_least_squares` fits. `groups`: fit on these
    feature groups only (reuse.FEATURE_GROUPS; the others get weight 0), for ablations."""
    if features_MEF.size == 0:
        raise ValueError("no samples to fit the learned policy on (the traces have no steps)")
    used_F = reuse.feature_mask(groups)
    mean_F, std_F, weights_F = np.zeros(len(used_F)), np.ones(len(used_F)), np.zeros(len(used_F))
    mean_F[used_F], std_F[used_F], weights_F[used_F] = ranking_least_squares(features_MEF[..., used_F], labels_ME, ridge)
    # Centred, the score has no intercept; the bias puts it on the labels' scale (the mean rate of use).
    return ReuseModel(weights_F=weights_F, bias=float(labels_ME.mean()), mean_F=mean_F, std_F=std_F, horizon=horizon, **shape)


def ranking_least_squares(features_MEF: np.ndarray, labels_ME: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means, spreads and weights of a linear score fit by least squares (ridge `ridge` on standardised
    features) to the 0/1 labels *within* each row m (the E experts one ranking orders): features and
    labels centred per row, so the fit spends nothing on what moves every expert of a step alike,
    which cannot change an eviction (a constant feature: spread 1, weight 0)."""
    flat_NF = features_MEF.reshape(-1, features_MEF.shape[-1])
    mean_F, std_F = flat_NF.mean(axis=0), flat_NF.std(axis=0)
    std_F = np.where(std_F > 1e-9, std_F, 1.0)
    Z_MEF = (features_MEF - mean_F) / std_F
    Z_NF = (Z_MEF - Z_MEF.mean(axis=1, keepdims=True)).reshape(len(flat_NF), -1)
    y_N = (labels_ME - labels_ME.mean(axis=1, keepdims=True)).ravel()
    weights_F = np.linalg.solve(Z_NF.T @ Z_NF + ridge * np.eye(Z_NF.shape[1]), Z_NF.T @ y_N)
    return mean_F, std_F, weights_F


ONLINE = ("lru", "lfu", "lcp")  # the online policies a learned one is measured against


def gap_closed(hit_rates: dict[str, float], name: str) -> float | None:
    """The share of the hit-rate gap between the best of ONLINE and Belady that policy `name`
    closes (negative: below the best online one); None where Belady leads by nothing."""
    best = max(hit_rates[policy] for policy in ONLINE)
    gap = hit_rates["belady"] - best
    return (hit_rates[name] - best) / gap if gap > 0 else None


def check_one_shape(traces, names) -> None:
    """The traces are of one model shape (experts per layer, MoE layers), else an error naming two."""
    first = traces[0]
    for name, trace in zip(names[1:], traces[1:]):
        if (trace.num_experts, tuple(trace.moe_layers)) != (first.num_experts, tuple(first.moe_layers)):
            raise ConfigError(f"{name}: {trace.num_experts} experts in MoE layers {_layers_text(trace.moe_layers)}, but "
                              f"{names[0]} has {first.num_experts} in {_layers_text(first.moe_layers)}: use one model's traces")


def train_reuse_model(traces, *, horizon: int = 1, ridge: float = 1.0, generic: bool = False, names=None,
                      groups: tuple[str, ...] | None = None) -> ReuseModel:
    """The learned policy's model fit on every (token, expert) of `traces` (RoutingTraces of one model
    shape; `names`: how to call them in messages and in the file). `generic`: record no shape;
    `groups`: the feature groups to fit on (None: all)."""
    names = list(names or (t.source or f"trace {i}" for i, t in enumerate(traces)))
    check_one_shape(traces, names)
    first = traces[0]
    samples = [reuse.reuse_samples(trace, horizon) for trace in traces]
    shape = {} if generic else {"num_experts": first.num_experts, "moe_layers": tuple(first.moe_layers)}
    return fit_reuse_model(np.concatenate([f for f, _ in samples]), np.concatenate([l for _, l in samples]), horizon=horizon,
                           ridge=ridge, groups=groups, trained_on=tuple(f"{n}: {t.num_tokens} tokens" for n, t in zip(names, traces)),
                           **shape)


@attrs.frozen(kw_only=True)
class LearnedConfig(PolicyConfig):
    # A `moepic train-policy` file; None: the built-in generic model (trained on the bundled model's routing).
    path: str | None = None

    # Not among `--policy auto`'s own choices: configure weighs it only with --learned-policy FILE, a
    # file fit on other routing than the trace it configures on.
    offered_by_auto = False


@final
@register_policy("learned", LearnedConfig)
class LearnedPolicy:
    def __init__(self, config: LearnedConfig = LearnedConfig(), model: ReuseModel | None = None) -> None:
        self.config = config
        self.model = model if model is not None else load_reuse_model(config.path or DEFAULT_FILE)

    def init(self, layer: int, num_experts: int) -> reuse.ReuseState:
        self.model.check_fits(layer, num_experts)
        return reuse.initial_state(num_experts)

    def update(self, state: reuse.ReuseState, step: LayerStep) -> reuse.ReuseState:
        return reuse.advanced(state, step)

    def priority(self, state: reuse.ReuseState) -> np.ndarray:
        return self.model.score(reuse.features(state))
