"""A learned predictor: per (layer, layer ahead), a small MLP from layer l's router input to the
later layer's expert scores. Pure at inference (weights are data, run through torch.func).

    router input x_TD ─Linear(D→H)─▶ silu ─Linear(H→E)─▶ scores_TE ─▶ top-k′ per token

Trained by `moepic train-predictor` (moepic/commands/train_predictor.py) from routing traces that
carry hidden states; stored as `predictor.safetensors` (the weights) beside `predictor.json` (its
shape, layers and the validation recall it reached), never pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.func import functional_call

from moepic.core.model import Model
from moepic.errors import ConfigError
from moepic.predictors.base import PredictorConfig, ScoringPredictor, layers_ahead, register_predictor

WEIGHTS, META = "predictor.safetensors", "predictor.json"


class ScoreMLP(torch.nn.Module):
    """The network's shape; its weights are passed in (functional_call), never held."""

    def __init__(self, hidden: int, width: int, experts: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(hidden, width)
        self.out = torch.nn.Linear(width, experts)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.up(x_TD)))


def pair_key(source: int, target: int) -> str:
    return f"{source}->{target}"


def save_predictor(folder: str | Path, params: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """params: pair key → {"up.weight", …}; meta: hidden, width, experts, horizon, layers, metrics."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {f"{pair}/{name}": t.detach().contiguous().cpu() for pair, p in params.items() for name, t in p.items()}
    save_file(flat, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps(meta, indent=1))


def load_predictor(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    folder = Path(folder)
    for name in (WEIGHTS, META):
        if not (folder / name).is_file():
            raise ConfigError(f"{folder}: no {name} (train one with `moepic train-predictor`)")
    try:
        meta = json.loads((folder / META).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{folder / META}: not valid JSON ({e})") from None
    params: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(folder / WEIGHTS)).items():
        pair, _, name = key.partition("/")
        params.setdefault(pair, {})[name] = tensor
    return params, meta


@attrs.frozen(kw_only=True)
class MLPConfig(PredictorConfig):
    path: str | None = None  # a folder written by `moepic train-predictor`
    candidates: int | None = None  # k′ (default: the model's top-k)
    horizon: int = 1  # at most what it was trained for


@register_predictor("mlp", MLPConfig)
class MLPPredictor(ScoringPredictor):
    def __init__(self, config: MLPConfig, model: Model) -> None:
        if config.path is None:
            raise ConfigError("the mlp predictor needs its weights: set predictor.path=DIR (from `moepic train-predictor`)")
        params, meta = load_predictor(config.path)
        spec = model.spec
        expected = {"hidden": spec.hidden_size, "experts": spec.moe.num_experts, "layers": list(spec.moe_layers)}
        found = {key: meta.get(key) for key in expected}
        if found != expected:
            raise ConfigError(f"{config.path}: trained for {found}, but the model has {expected}")
        if config.horizon > meta["horizon"]:
            raise ConfigError(f"{config.path}: trained for horizon {meta['horizon']}, asked for {config.horizon}")
        self.config, self.horizon = config, config.horizon
        self.candidates = config.prefetch_shape(spec.moe.top_k).candidates
        self.num_experts = spec.moe.num_experts
        self.device, self.dtype = model.device, model.dtype
        self.params = {pair: {n: t.to(self.device, self.dtype) for n, t in p.items()} for pair, p in params.items()}
        with torch.device("meta"):  # shape only: the weights come from self.params
            self.net = ScoreMLP(meta["hidden"], meta["width"], meta["experts"])
        moe_layers = spec.moe_layers
        self.targets = layers_ahead(moe_layers, spec.num_layers, config.horizon)
        self.tap = "router_input"

    def scores(self, layer: int, target: int, hidden_TD: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, self.params[pair_key(layer, target)], (hidden_TD,))
