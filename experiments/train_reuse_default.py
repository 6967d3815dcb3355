"""Train the learned policy's built-in generic model (moepic/policies/reuse_default.json) on the
bundled model's own routing: greedy runs from prompts cut from the first half of kjv-heldout (the
half nothing is evaluated on; recorded workloads and the engine backend use the second half).

The model is generic: it records no model shape, so it serves any model; it has seen none of the
shared Mixtral traces, so evaluating it there is held out.

Run:  python experiments/train_reuse_default.py [--requests 16] [--new-tokens 64] [--out moepic/policies/reuse_default.json]
"""

from __future__ import annotations

import argparse

from moepic.default_model import default_model_dir
from moepic.experiments.backends import training_routing
from moepic.policies.learned import DEFAULT_FILE, train_reuse_model

HORIZON = 1  # tokens: "used by the next token" ranked best of 1, 4 and 16 on the shared traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(DEFAULT_FILE))
    args = parser.parse_args()
    trace = training_routing(str(default_model_dir()), requests=args.requests, prompt_tokens=args.prompt_tokens,
                             new_tokens=args.new_tokens)
    fitted = train_reuse_model([trace], horizon=HORIZON, generic=True)
    fitted.save(args.out)
    print(f"{args.out}: {trace.num_tokens} tokens; weights " + ", ".join(f"{w:+.3f}" for w in fitted.weights_F))


if __name__ == "__main__":
    main()
