"""A learned predictor: per (layer, layer ahead), a small MLP from layer l's router input to the
later layer's expert scores. Pure at inference (weights are data, run through torch.func).

    router input x_TD ─Linear(D→H)─▶ silu ─Linear(H→E)─▶ scores_TE ─▶ top-k′ per token

Trained by `moepic train-predictor` (moepic/commands/train_predictor.py) from routing traces that
carry hidden states; stored as `predictor.safetensors` (the weights) beside `predictor.json` (its
shape, layers and the validation recall it reached), never pickled. Both are written or neither
(moepic.outputs); reading them checks every key and tensor shape first.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.func import functional_call

from moepic.core.model import Model
from moepic.errors import ConfigError
from moepic.outputs import OutputError, atomic_files, atomic_folder, check_writable
from moepic.predictors.base import PredictorConfig, ScoringPredictor, at_least_one, check_horizon, layers_ahead, register_predictor

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


def check_predictor_folder(folder: str | Path) -> None:
    """Before training: a predictor can be written to `folder` (an existing one, or a new one in an
    existing parent)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: cannot write the predictor (a file of that name exists; it is written as a folder)")
    check_writable(folder / META if folder.is_dir() else folder, "predictor")


def save_predictor(folder: str | Path, params: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """params: pair key → {"up.weight", …}; meta: hidden, width, experts, horizon, layers, metrics.

    All or nothing: a failure leaves the old predictor (if any) as it was and no partial new one.
    A new folder appears only once complete (atomic_folder); in an existing one the two files are
    replaced together and anything else in it is left alone (atomic_files).
    """
    folder = Path(folder)
    flat = {f"{pair}/{name}": t.detach().contiguous().cpu() for pair, p in params.items() for name, t in p.items()}
    writer = atomic_files if folder.is_dir() else atomic_folder
    with writer(folder, "predictor") as tmp:
        _write_bytes(tmp / WEIGHTS, save(flat))
        _write_bytes(tmp / META, json.dumps(meta, indent=1).encode())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# What predictor.json must hold, and of which type (bool is an int to Python: excluded below).
_META_KEYS = {"hidden": int, "width": int, "experts": int, "horizon": int, "layers": list}


def load_predictor(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    folder = Path(folder)
    for name in (WEIGHTS, META):
        if not (folder / name).is_file():
            raise ConfigError(f"{folder}: no {name} (train one with `moepic train-predictor`)")
    try:
        meta = json.loads((folder / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{folder / META}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{folder / META}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in _META_KEYS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            expected = "a positive integer" if kind is int else "a list"
            raise ConfigError(f"{folder / META}: key {key!r} should be {expected}, got {value!r}")
    try:
        flat = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{folder / WEIGHTS}: not a readable safetensors file ({e})") from None
    params: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        pair, _, name = key.partition("/")
        params.setdefault(pair, {})[name] = tensor
    return params, meta


def check_params(folder: str | Path, params: dict[str, dict[str, torch.Tensor]], meta: dict, pairs: list[str]) -> None:
    """Every pair the predictor will score has its four tensors, shaped as `meta` says, finite."""
    D, H, E = meta["hidden"], meta["width"], meta["experts"]
    shapes = {"up.weight": (H, D), "up.bias": (H,), "out.weight": (E, H), "out.bias": (E,)}
    where = Path(folder) / WEIGHTS
    for pair in pairs:
        for name, shape in shapes.items():
            tensor = params.get(pair, {}).get(name)
            if tensor is None:
                raise ConfigError(f"{where}: missing tensor {pair}/{name}")
            if tuple(tensor.shape) != shape:
                raise ConfigError(f"{where}: tensor {pair}/{name} has shape {list(tensor.shape)}, expected {list(shape)}")
            if not bool(torch.isfinite(tensor).all()):
                raise ConfigError(f"{where}: tensor {pair}/{name} holds NaN or infinite values")


@attrs.frozen(kw_only=True)
class MLPConfig(PredictorConfig):
    path: str | None = None  # a folder written by `moepic train-predictor`
    candidates: int | None = attrs.field(default=None, validator=at_least_one)  # k′ (default: the model's top-k)
    horizon: int = attrs.field(default=1, validator=check_horizon)  # at most what it was trained for

    needs_router_inputs = True


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
        self.hidden_size = spec.hidden_size
        self.device, self.dtype = model.device, model.dtype
        moe_layers = spec.moe_layers
        self.targets = layers_ahead(moe_layers, spec.num_layers, config.horizon)
        check_params(config.path, params, meta, [pair_key(l, t) for l, targets in self.targets.items() for t in targets])
        self.params = {pair: {n: t.to(self.device, self.dtype) for n, t in p.items()} for pair, p in params.items()}
        with torch.device("meta"):  # shape only: the weights come from self.params
            self.net = ScoreMLP(meta["hidden"], meta["width"], meta["experts"])
        self.reads = "router_input"

    def scores(self, layer: int, target: int, hidden_TD: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, self.params[pair_key(layer, target)], (hidden_TD,))
