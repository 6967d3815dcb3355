"""`moepic train-predictor`: learn the `mlp` expert predictor from routing with hidden states.

Data: traces recorded with hidden states (`moepic generate --record-trace F --trace-hidden`), or a
text routed through the model here. The last `--valid` share of tokens is held out; the report
compares, per (layer, layer ahead), the MLP's recall@k with gate lookahead's on those tokens.
Every flag is checked, and the output folder's writability, before any work; the predictor is
written whole or not at all (moepic.predictors.mlp.save_predictor).
Side effects: file I/O, training on the CPU/GPU, a progress bar.
"""

from __future__ import annotations

import math
from pathlib import Path

from moepic.commands import arguments
from moepic.datasets import dataset_path, known_datasets
from moepic.errors import ConfigError

NAME = "train-predictor"
HELP = "learn the mlp expert predictor from routing with hidden states"

# Integer flags and their ranges. The upper bounds are far past any useful value; they stop a typo
# from allocating (--width) or looping (--epochs) for hours.
INT_RANGES = {"--width": (1, 1 << 16), "--epochs": (1, 1_000_000), "--max-tokens": (1, 1 << 40), "--seed": (0, 2**63 - 1)}


def add_parser(subparsers):
    train = subparsers.add_parser(NAME, help=HELP)
    arguments.add_model(train, shape=False)
    data = train.add_mutually_exclusive_group()
    data.add_argument("--trace", action="append", default=[], help="a trace recorded with --trace-hidden (repeatable)")
    data.add_argument("--text", help="a UTF-8 text file to route through the model")
    dataset = data.add_argument("--dataset", metavar="NAME", help="a text shipped with moepic: {datasets}")
    dataset.fills = {"datasets": known_datasets}
    train.add_argument("--out", required=True, help="folder for predictor.safetensors + predictor.json")
    train.add_argument("--width", type=int, default=128, help="hidden width of each MLP")
    train.add_argument("--horizon", type=int, default=1, help="MoE layers ahead to learn (1-3)")
    train.add_argument("--epochs", type=int, default=200, help="full-batch Adam steps per MLP")
    train.add_argument("--valid", type=float, default=0.2, help="share of tokens held out (the last ones)")
    train.add_argument("--max-tokens", type=int, default=20000, help="learn from at most this many tokens")
    train.add_argument("--seed", type=int, default=0, help="seed of the MLPs' initial weights")
    arguments.add_json(train)
    arguments.add_progress(train)
    return train


def run(args) -> dict:
    text_file = str(dataset_path(args.dataset)) if args.dataset is not None else args.text
    return run_train_predictor(
        args.model, traces=args.trace, text_file=text_file, out=args.out, width=args.width, horizon=args.horizon,
        epochs=args.epochs, valid=args.valid, max_tokens=args.max_tokens, seed=args.seed, progress=not args.json,
    )


def check_flags(*, width, horizon, epochs, lr, valid, max_tokens, seed) -> None:
    """Each flag in its range, else one line naming it, the range and the value."""
    from moepic.predictors.base import horizon_problem

    for flag, value in {"--width": width, "--epochs": epochs, "--max-tokens": max_tokens, "--seed": seed}.items():
        low, high = INT_RANGES[flag]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"train-predictor {flag} must be an integer from {low} to {high}, got {value!r}")
    problem = horizon_problem(horizon, "train-predictor --horizon")
    if problem:
        raise ConfigError(problem)
    if not 0 < valid < 1:  # NaN fails too
        raise ConfigError(f"train-predictor --valid must be in (0, 1) (the share of tokens held out), got {valid!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"train-predictor: the learning rate must be a finite number > 0, got {lr!r}")


def recall_at_k(scores_NE, ids_NK) -> float:
    """Mean share of each token's routed experts among its top-k scores."""
    top_NK = scores_NE.topk(ids_NK.shape[1], dim=-1).indices
    return (ids_NK[:, :, None] == top_NK[:, None, :]).any(-1).float().mean().item()


def train_pair(x_ND, ids_NK, num_experts: int, *, width: int, epochs: int, lr: float, seed: int) -> dict:
    """One MLP's weights, trained with binary cross-entropy on multi-hot targets (full batch, Adam)."""
    import torch
    import torch.nn.functional as F

    from moepic.predictors.mlp import ScoreMLP

    torch.manual_seed(seed)
    net = ScoreMLP(x_ND.shape[1], width, num_experts)
    params = {name: p.detach().clone().requires_grad_() for name, p in net.named_parameters()}
    target_NE = torch.zeros(len(ids_NK), num_experts).scatter_(1, ids_NK, 1.0)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        scores = torch.func.functional_call(net, params, (x_ND,))
        F.binary_cross_entropy_with_logits(scores, target_NE).backward()
        optimizer.step()
    return {name: p.detach() for name, p in params.items()}


def gather(model, folder, traces: list[str], text: str | None, max_tokens: int):
    """(hidden_NLD, ids_NLK) as float32 / int64 tensors, from trace files or a text routed here."""
    import numpy as np
    import torch

    from moepic.tracing import load_any_trace
    from moepic.tracing.checks import check_same_layers, require_router_inputs, router_inputs

    if text is not None:
        from moepic.analysis.route_text import trace_text
        from moepic.tokenizer import TextCodec, no_tokenizer

        codec = TextCodec.from_folder(folder)
        if codec is None:
            raise ConfigError(f"{no_tokenizer(folder)}, which --text needs")
        loaded = [trace_text(model, codec, text, chunk=256, max_tokens=max_tokens, record_hidden=True)[0]]
    else:
        loaded = [load_any_trace(path, num_experts=model.spec.moe.num_experts) for path in traces]
    spec = model.spec
    for path, trace in zip(traces or ["the routed text"], loaded):
        require_router_inputs(trace, path, "the trace has no hidden states (record it with --trace-hidden)")
        router_inputs(trace, spec.hidden_size, path)
        check_same_layers(path, trace, spec)
    hidden = np.concatenate([t.hidden_NLD for t in loaded])[:max_tokens]
    ids = np.concatenate([t.expert_ids_NLK for t in loaded])[:max_tokens]
    return torch.from_numpy(hidden.astype(np.float32)), torch.from_numpy(ids.astype(np.int64))


def run_train_predictor(
    model_dir: str | None,
    *,
    traces: list[str],
    text_file: str | None,
    out: str,
    width: int = 128,
    horizon: int = 1,
    epochs: int = 200,
    lr: float = 3e-3,
    valid: float = 0.2,
    max_tokens: int = 20000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    import torch

    from moepic.checkpoint.load import load_model
    from moepic.core.routing import router_logits, selection_scores
    from moepic.predictors.mlp import ScoreMLP, check_predictor_folder, pair_key, save_predictor
    from moepic.progress import bar as progress_bar

    if not traces and text_file is None:
        raise ConfigError("train-predictor needs --trace FILE (with hidden states) or --text FILE / --dataset NAME")
    check_flags(width=width, horizon=horizon, epochs=epochs, lr=lr, valid=valid, max_tokens=max_tokens, seed=seed)
    text = None
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise ConfigError(f"{path}: text file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    check_predictor_folder(out)  # now, not after the training
    folder = arguments.weights_folder(model_dir, NAME)
    model = load_model(folder, dtype=torch.float32)
    spec = model.spec
    hidden_NLD, ids_NLK = gather(model, folder, traces, text, max_tokens)
    split = int(len(hidden_NLD) * (1 - valid))
    if split < 16 or len(hidden_NLD) - split < 16:
        raise ConfigError(
            f"{len(hidden_NLD)} tokens split {split} / {len(hidden_NLD) - split} by --valid {valid}: "
            "training and validation need 16 tokens each at least"
        )
    layers = list(spec.moe_layers)
    pairs = [(c, c + h) for c in range(len(layers)) for h in range(1, horizon + 1) if c + h < len(layers)]
    params, metrics = {}, []
    for source, target in progress_bar(pairs, desc="training", unit="layer", wanted=progress, leave=False):
        x, y = hidden_NLD[:, source], ids_NLK[:, target]
        weights = train_pair(x[:split], y[:split], spec.moe.num_experts, width=width, epochs=epochs, lr=lr, seed=seed)
        key = pair_key(layers[source], layers[target])
        params[key] = weights
        net = ScoreMLP(spec.hidden_size, width, spec.moe.num_experts)
        with torch.no_grad():
            mlp = recall_at_k(torch.func.functional_call(net, weights, (x[split:],)), y[split:])
            ffn = model.weights.layers[layers[target]].ffn
            logits = router_logits(x[split:], ffn.router_ED, spec.moe.router, ffn.router_logit_bias_E)
            gate = recall_at_k(selection_scores(logits, spec.moe.router, ffn.router_bias_E), y[split:])
        metrics.append({"source": layers[source], "target": layers[target], "mlp_recall": mlp, "gate_lookahead_recall": gate})
    meta = {
        "hidden": spec.hidden_size, "width": width, "experts": spec.moe.num_experts, "horizon": horizon,
        "layers": layers, "train_tokens": split, "valid_tokens": len(hidden_NLD) - split, "metrics": metrics,
    }
    save_predictor(out, params, meta)
    return {"out": out, **meta}


def text(report: dict) -> str:
    lines = [
        f"{report['out']}: trained on {report['train_tokens']} tokens, validated on {report['valid_tokens']}",
        "layer → ahead | mlp recall | gate-lookahead recall",
    ]
    for m in report["metrics"]:
        lines.append(f"{m['source']:>5} → {m['target']:<5} | {100 * m['mlp_recall']:9.1f}% | {100 * m['gate_lookahead_recall']:20.1f}%")
    return "\n".join(lines)
