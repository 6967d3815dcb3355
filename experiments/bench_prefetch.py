"""Benchmark: how much copy time prediction and prefetch hide, on a CPU with an emulated link.

A script, not a test. The bundled model decodes greedily from a held-out KJV prompt, offloaded
through the engine with an emulated host→device link calibrated so that one whole-expert copy
takes `--ratio` (default 3) times one layer's compute, the regime of the paper (a PCIe copy of an
expert costs several times its layer's compute). One table, side by side, for each budget × θ:
decode ms/token, *exposed* copy ms/token (time compute waited for copies), and next-layer recall,
for no prefetch, gate lookahead (router-input and layer-output taps), the learned mlp (trained
here on the first half of the held-out text; the prompt comes from the second) and the oracle.
Tokens are checked against the dense model on every run. Medians of --repeats alternating runs.

Run:  python experiments/bench_prefetch.py            (full, ~4 min idle)
      python experiments/bench_prefetch.py --quick    (smoke: one budget, fewer tokens)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moepic.checkpoint.load import load_model
from moepic.datasets import DATASETS
from moepic.commands.train_predictor import run_train_predictor
from moepic.default_model import default_model_dir
from moepic.policies import POLICIES
from moepic.predictors import PREDICTORS
from moepic.predictors.gate_lookahead import GateLookaheadConfig
from moepic.predictors.mlp import MLPConfig
from moepic.predictors.oracle import OracleConfig, OraclePredictor
from moepic.runtime.copy_engine import Link
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from moepic.tokenizer import TextCodec
from moepic.tracing.recorder import RoutingRecorder

PREDICTOR_NAMES = ("none", "gate (router input)", "gate (layer output)", "mlp", "oracle")


def calibrated_link(model, prompt, tokens: int, ratio: float) -> tuple[Link, float]:
    """A link on which one whole expert takes `ratio` × one layer's dense decode compute."""
    times = [generate(model, prompt, max_new_tokens=tokens, eos_ids=()).stats.decode_s_per_token for _ in range(3)]
    layer_s = statistics.median(times) / model.spec.num_layers
    expert_bytes = 3 * model.spec.hidden_size * model.spec.moe.expert_ffn * model.dtype.itemsize
    return Link(gbps=expert_bytes / (ratio * layer_s) / 1e9, latency_us=10.0), layer_s


def build_predictor(name: str, model, trace, mlp_dir: str):
    if name == "none":
        return None
    if name == "oracle":
        return OraclePredictor(OracleConfig(), model, future=trace)
    if name == "mlp":
        return PREDICTORS.build(MLPConfig(path=mlp_dir), model)
    reads = "layer_output" if "layer output" in name else "router_input"
    return PREDICTORS.build(GateLookaheadConfig(reads=reads), model)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ratio", type=float, default=3.0, help="whole-expert copy time / one layer's compute")
    parser.add_argument("--tokens", type=int, help="new tokens per run (default 48; quick 16)")
    parser.add_argument("--repeats", type=int, help="runs per cell (default 3; quick 1)")
    args = parser.parse_args(argv)
    tokens = args.tokens or (16 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 3)
    budgets = (0.25,) if args.quick else (0.25, 0.5)
    thetas = (0.0, 0.4, 1.0)

    model = load_model(default_model_dir(), offload_experts=True)
    text = DATASETS["kjv-heldout"].read_text()
    half = len(text) // 2
    codec = TextCodec.from_folder(default_model_dir())
    prompt = codec.encode(text[half : half + 2000])[:64]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.txt").write_text(text[:half])
        training = run_train_predictor(
            None, traces=[], text_file=str(Path(tmp) / "train.txt"), out=str(Path(tmp) / "mlp"),
            max_tokens=4000 if args.quick else 20000, progress=False,
        )
        recorder = RoutingRecorder(model.spec)
        dense = generate(model, prompt, max_new_tokens=tokens, eos_ids=(), tap=recorder)
        trace = recorder.trace()
        link, layer_s = calibrated_link(model, prompt, tokens, args.ratio)
        cells = [(b, t, p) for b in budgets for t in thetas for p in PREDICTOR_NAMES]
        results = {cell: [] for cell in cells}
        with tqdm(total=repeats * len(cells), desc="runs", unit="run", leave=False) as bar:
            for r in range(repeats):
                for cell in cells if r % 2 == 0 else cells[::-1]:
                    budget, theta, name = cell
                    engine = offloaded_experts(
                        model, budget, theta, POLICIES["lcp"].config(), link=link,
                        predictor=build_predictor(name, model, trace, str(Path(tmp) / "mlp")),
                    )
                    result = generate(model, prompt, max_new_tokens=tokens, eos_ids=(), experts=engine)
                    engine.close()
                    if result.token_ids != dense.token_ids:
                        raise AssertionError(f"{cell}: tokens differ from the dense model's")
                    report = engine.report()
                    results[cell].append(
                        (result.stats.decode_s_per_token, report["decode_exposed_copy_s_per_token"], report["prediction_recall"])
                    )
                    bar.update(1)

    print(
        f"Bundled model (bf16, CPU), {tokens} new tokens after a {len(prompt)}-token held-out prompt; emulated link "
        f"{link.gbps:.3f} GB/s + {link.latency_us:.0f} µs: a whole expert takes {args.ratio:g}× a layer's compute "
        f"({args.ratio * layer_s * 1e3:.2f} ms vs {layer_s * 1e3:.2f} ms); LCP; medians of {repeats} runs"
    )
    mlp_vs_gate = ", ".join(f"{m['source']}→{m['target']} {100 * m['mlp_recall']:.0f}/{100 * m['gate_lookahead_recall']:.0f}" for m in training["metrics"])
    print(f"mlp trained on {training['train_tokens']} tokens of the first half; validation recall mlp/gate: {mlp_vs_gate}")
    header = f"{'budget':>6} {'θ':>4} | " + " | ".join(f"{n:^23}" for n in PREDICTOR_NAMES)
    print(header)
    print(f"{'':>11} | " + " | ".join(f"{'ms/tok':>7} {'exposed':>7} {'recall':>6}" for _ in PREDICTOR_NAMES))
    print("-" * len(header))
    for budget in budgets:
        for theta in thetas:
            row = []
            for name in PREDICTOR_NAMES:
                runs = results[budget, theta, name]
                ms, exposed = (statistics.median(r[i] for r in runs) * 1e3 for i in (0, 1))
                recall = runs[0][2]
                row.append(f"{ms:7.2f} {exposed:7.2f} {'' if recall is None else f'{100 * recall:5.1f}%':>6}")
            print(f"{budget:6.0%} {theta:4.1f} | " + " | ".join(row))
        base = statistics.median(r[1] for r in results[budget, 0.0, "none"])
        best = min(
            ((statistics.median(r[1] for r in results[budget, t, n]), t, n) for t in thetas for n in PREDICTOR_NAMES if n != "oracle")
        )
        print(
            f"  budget {budget:.0%}: on-demand, no split (θ=0) exposes {base * 1e3:.2f} ms/token; best predictor + split: "
            f"{best[0] * 1e3:.2f} ({best[2]}, θ={best[1]}): {100 * (1 - best[0] / base):.0f} % less"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, load {load:.2f}")


if __name__ == "__main__":
    main()
