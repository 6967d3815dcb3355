"""Benchmark: what quantizing the routed experts costs in quality, on the bundled model.

A script, not a test. For each expert format it loads the bundled model with its experts encoded
as they load (what `moepic quantize` writes, bit for bit: tests/checkpoint/test_quantize.py), scores
each text's perplexity (analysis/perplexity.py: windows of --window tokens) and the share of
positions whose most likely next token equals the dense bf16 model's (top-1 agreement). One table;
--json FILE writes the numbers.

Texts: kjv-heldout (the 5 % of the KJV the model never trained on) and a non-KJV English text,
by default the GNU GPL v3 as Debian ships it (/usr/share/common-licenses/GPL-3: modern legal
prose, far from the training text); --text FILE replaces it.

Run:  python experiments/bench_quant_quality.py
      python experiments/bench_quant_quality.py --max-tokens 4000     (quicker)
      python experiments/bench_quant_quality.py --formats int4-g64,int4-fused-g64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moepic.analysis.perplexity import score
from moepic.checkpoint.load import load_model
from moepic.datasets import dataset_path
from moepic.default_model import default_model_dir
from moepic.quant import build_format
from moepic.tokenizer import TextCodec

FORMATS = {
    "bf16 (dense)": {"name": "dense"},
    "int8-g64": {"name": "int8", "group_size": 64},
    "int4-g64": {"name": "int4", "group_size": 64},
    "int4-g128": {"name": "int4", "group_size": 128},
    "int4-g64-asym": {"name": "int4", "group_size": 64, "symmetric": False},
    "int4-g32": {"name": "int4", "group_size": 32},
    "int4-fused-g64": {"name": "int4-fused", "group_size": 64},
    "mxfp4": {"name": "mxfp4"},
    "fp8": {"name": "fp8"},
}
NON_KJV = Path("/usr/share/common-licenses/GPL-3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=NON_KJV, help="the non-KJV text (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score each text's first N tokens (default: all)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--formats", default=None, help=f"a subset of: {', '.join(FORMATS)} (bf16 always runs: the reference)")
    args = parser.parse_args()
    formats = FORMATS if args.formats is None else {
        label: FORMATS[label] for label in ["bf16 (dense)", *(f for f in args.formats.split(",") if f != "bf16 (dense)")]}
    folder = default_model_dir()
    codec = TextCodec.from_folder(folder)
    texts = {"kjv-heldout": dataset_path("kjv-heldout")}
    if args.text.is_file():
        texts[f"non-KJV ({args.text.name})"] = args.text
    else:
        print(f"note: {args.text} is absent; scoring kjv-heldout alone")
    ids = {name: codec.encode(path.read_text(encoding="utf-8"))[: args.max_tokens] for name, path in texts.items()}
    results: dict[str, dict[str, dict]] = {}
    reference = {}
    for label, node in formats.items():
        model = load_model(folder, expert_format=build_format(node))
        bytes_per_neuron = build_format(node).neuron_bytes(model.spec.hidden_size, False, 2)
        results[label] = {"bytes_per_expert_neuron": bytes_per_neuron}
        for text, tokens in ids.items():
            scored = score(model, tokens, args.window, desc=f"{label} · {text}")
            if label == "bf16 (dense)":
                reference[text] = scored
            results[label][text] = {"perplexity": scored.perplexity, "tokens": scored.tokens,
                                    "change": scored.perplexity / reference[text].perplexity - 1,
                                    "top1_agreement": scored.agreement(reference[text])}
        del model
    header = f"{'experts':<15} {'bytes/neuron':>12}" + "".join(f" | {t[:28]:>28} ppl   Δ ppl  top-1" for t in ids)
    print(header)
    print("-" * len(header))
    for label, row in results.items():
        cells = "".join(f" | {row[t]['perplexity']:>32.3f} {row[t]['change']:>+7.2%} {row[t]['top1_agreement']:>6.1%}" for t in ids)
        print(f"{label:<15} {row['bytes_per_expert_neuron']:>12}" + cells)
    print("tokens scored: " + ", ".join(f"{t}: {reference[t].tokens}" for t in ids))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
