"""The `moepic` command. Argument parsing, config loading and printing; user mistakes become one line.

    moepic inspect  [--model DIR] [--dtype D] [--json]
    moepic routing-report [--model DIR] (--text FILE | --dataset NAME | --trace FILE) [--json]
    moepic train-predictor [--model DIR] (--trace FILE… | --text FILE | --dataset NAME) --out DIR [--json]
    moepic generate [--model DIR] (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N]
                    [--greedy] [--temperature T] [--top-p P] [--seed S] [--dtype D] [--device DEV]
                    [--budget B] [--theta X] [--policy NAME] [--predictor NAME] [--horizon H]
                    [--link-gbps X] [--link-latency-us Y]
                    [--config FILE.yaml] [--json] [key=value ...]
    moepic profile [--device DEV] [--model DIR] [--out FILE.yaml] [--quick] [--link-gbps X] [--json]
    moepic configure --budget B --hardware NAME|FILE --trace FILE [--model DIR] [--policy NAME]
                    [--predictor NAME] [--recall X] [--configurator NAME] [--out FILE.yaml] [--json]
    moepic simulate --trace FILE --model-shape NAME|DIR --hardware NAME|FILE (--config FILE | --baseline NAME)
                    [--budget B] [--recall X] [--model DIR] [--json]
    moepic compare  --trace FILE --model-shape NAME|DIR --hardware NAME|FILE --budget B [--recall X]
                    [--baselines a,b,…] [--json]
    moepic fit-trace --trace FILE [--out PARAMS.json] [--tokens N] [--seed S] [--cache-sizes 2,4,6] [--json]
    moepic synth-trace (--params PARAMS.json | --like FILE) [--experts E] [--top-k K] [--layers L]
                    --tokens N [--sequences S] [--seed S] --out FILE.npz [--json]
    moepic --version

Commands that draw progress bars (generate, train-predictor, profile, configure, compare) draw them
only when stderr is a terminal, or with --progress. Ctrl-C ends any command with exit code 130
(SIGTERM: 143) and no traceback; see moepic/interrupts.py.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import json
import re
import sys
from collections.abc import Sequence

import attrs

from moepic import interrupts, progress
from moepic.checkpoint.hf_config import DTYPES
from moepic.config import GenerateConfig, RunConfig, SamplingConfig, load_config
from moepic.errors import ConfigError, MoepicError
from moepic.ranges import CONTEXT_TOKENS, LINK_GBPS, LINK_LATENCY_US


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage dump is noise for a one-line mistake
        # main prints "moepic: error: "; a command's own parser adds the command's name after it.
        command = self.prog.removeprefix("moepic").strip()
        raise ConfigError(f"{command}: {message}" if command else message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help; for a `generate` flag that overrides a config key (its
    argparse default is None), the config's own default (`config_default`, set by `_show_config_defaults`).
    Never "(default: None)": an option without a default just has none shown."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "default" in help or action.option_strings == [] or action.default is argparse.SUPPRESS:
            return help
        default = getattr(action, "config_default", action.default)
        if default is None or isinstance(action, argparse._StoreTrueAction) and default is False:
            return help
        return f"{help} (default: {default})".strip()


def _show_config_defaults(parser: argparse.ArgumentParser) -> None:
    """Give each flag that sets a RunConfig key that key's default, for `--help`."""
    config = RunConfig()
    for action in parser._actions:
        value: object = config
        for part in _FLAG_KEYS.get(action.dest, "-").split("."):
            value = getattr(value, part, None)
        if action.dest in _FLAG_KEYS and value is not None:
            action.config_default = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _key_range(cls: type, field: str):
    """The argparse type of a flag that sets a config key: the key's own range (moepic/ranges.py),
    so the flag is named in the error and the rule is written once."""
    return attrs.fields_dict(cls)[field].validator.parse


def _prompt_ids(text: str) -> str:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return "[" + ",".join(map(str, ids)) + "]"


def _floats(text: str) -> str:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return str(values[0]) if len(values) == 1 else "[" + ",".join(map(str, values)) + "]"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moepic", description="Exact MoE inference with experts offloaded to host memory.")
    parser.add_argument("--version", action="version", version=f"moepic {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.add_parser = functools.partial(commands.add_parser, formatter_class=_HelpFormatter)
    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--config", help="YAML run config (keys as in moepic/config.py)")
    gen.add_argument("--model", help="Hugging Face model folder (default: the built-in model)")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    prompt.add_argument("--prompt-ids", type=_prompt_ids, help="prompt as token ids: 1,2,3")
    gen.add_argument("--max-new-tokens", type=_key_range(GenerateConfig, "max_new_tokens"), help="tokens to generate after the prompt")
    gen.add_argument("--greedy", action="store_true", default=None, help="argmax decoding (default: sampling)")
    gen.add_argument("--temperature", type=_key_range(SamplingConfig, "temperature"), help="sampling temperature")
    gen.add_argument("--top-p", type=_key_range(SamplingConfig, "top_p"), help="sample from the most likely tokens holding this much probability")
    gen.add_argument("--seed", type=_key_range(SamplingConfig, "seed"), help="sampling seed")
    gen.add_argument("--dtype", choices=["auto", *DTYPES], help="dtype of the weights (auto: the checkpoint's)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 …")
    gen.add_argument("--no-check-weights", dest="check_weights", action="store_false", default=None,
                     help="skip the NaN/Inf check of each weight as it loads (done by default; skipping "
                     "saves 0.01-0.3 s per GB: experiments/bench_weight_check.py)")
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    gen.add_argument("--record-trace", metavar="FILE.npz", help="save every token's routing to this file")
    gen.add_argument("--trace-hidden", action="store_true", default=None, help="include router inputs in the trace")
    gen.add_argument("--budget", help="offload experts: device memory for them, 512MiB or 0.25 (of all expert bytes); "
                     "or a,b,… cache sizes per MoE layer")
    gen.add_argument("--theta", type=_floats, help="split ratio: one value or one per MoE layer (0.5 or 0.25,0.5,…)")
    gen.add_argument("--policy", help="cache policy: lcp (default), lru, lfu, random, static, belady")
    gen.add_argument("--predictor", help="prefetch with an expert predictor: none (default), gate_lookahead, oracle")
    gen.add_argument("--horizon", type=int, help="MoE layers ahead the predictor prefetches (1-3)")
    gen.add_argument("--link-gbps", type=LINK_GBPS.parse, help="CPU: emulate a host→device link of this many GB/s")
    gen.add_argument("--link-latency-us", type=LINK_LATENCY_US.parse, help="CPU: per-copy latency of the emulated link, µs")
    gen.add_argument("--token-log", metavar="FILE.jsonl", help="offloaded runs: one JSON line per token (latency, copies)")
    gen.add_argument("--allow-env", action="store_true", help="let configs read environment variables with ${oc.env:NAME}")
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampling.seed=3")
    inspect = commands.add_parser("inspect", help="a checkpoint's shape and memory, from config.json alone")
    inspect.add_argument("--model", help="Hugging Face model folder (default: the built-in model)")
    inspect.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="count bytes in this dtype")
    inspect.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    report = commands.add_parser("routing-report", help="per-layer expert load, reuse and next-layer predictability")
    report.add_argument("--model", help="Hugging Face model folder (default: the built-in model)")
    source = report.add_mutually_exclusive_group()
    source.add_argument("--text", help="a UTF-8 text file to route through the model")
    source.add_argument("--dataset", help="a text shipped with moepic: kjv-heldout")
    source.add_argument("--trace", help="a recorded trace (.npz) or a JSONL routing log instead of a model run")
    report.add_argument("--chunk", type=int, help="tokens per independent prefill chunk (default: 256; not with --trace)")
    report.add_argument("--max-tokens", type=int, help="route at most this many tokens of the text (default: 8192; not with --trace)")
    report.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    train = commands.add_parser("train-predictor", help="learn the mlp expert predictor from routing with hidden states")
    train.add_argument("--model", help="Hugging Face model folder (default: the built-in model)")
    data = train.add_mutually_exclusive_group()
    data.add_argument("--trace", action="append", default=[], help="a trace recorded with --trace-hidden (repeatable)")
    data.add_argument("--text", help="a UTF-8 text file to route through the model")
    data.add_argument("--dataset", help="a text shipped with moepic: kjv-heldout")
    train.add_argument("--out", required=True, help="folder for predictor.safetensors + predictor.json")
    train.add_argument("--width", type=int, default=128, help="hidden width of each MLP")
    train.add_argument("--horizon", type=int, default=1, help="MoE layers ahead to learn (1-3)")
    train.add_argument("--epochs", type=int, default=200, help="full-batch Adam steps per MLP")
    train.add_argument("--valid", type=float, default=0.2, help="share of tokens held out (the last ones)")
    train.add_argument("--max-tokens", type=int, default=20000, help="learn from at most this many tokens")
    train.add_argument("--seed", type=int, default=0, help="seed of the MLPs' initial weights")
    train.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    prof = commands.add_parser("profile", help="measure this machine's copy and compute speeds (a hardware profile)")
    prof.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    prof.add_argument("--model", help="calibrate per-layer overhead on this model's dense decode (default: the built-in model)")
    prof.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="dtype of the calibration model")
    prof.add_argument("--name", help="the profile's name (default: measured-DEVICE)")
    prof.add_argument("--out", metavar="FILE.yaml", help="write the profile here")
    prof.add_argument("--quick", action="store_true", help="smaller and fewer measurements (seconds, noisier)")
    prof.add_argument("--link-gbps", type=LINK_GBPS.parse, help="CPU: measure through an emulated link of this many GB/s")
    prof.add_argument("--link-latency-us", type=LINK_LATENCY_US.parse, default=0.0, help="CPU: the emulated link's per-copy latency")
    prof.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    conf = commands.add_parser("configure", help="choose per-layer cache budgets and θ with the latency model")
    conf.add_argument("--model", help="Hugging Face model folder; only config.json is read unless recall is measured")
    conf.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="the dtype the run will use")
    conf.add_argument("--budget", required=True, help="device memory for routed experts, cache and staging: 24GiB or 0.25")
    conf.add_argument("--hardware", required=True, help="a bundled profile (a6000, a100-pcie, rtx4090, h100-pcie, h200) "
                      "or a YAML file from `moepic profile`")
    conf.add_argument("--trace", required=True, help="routing trace (.npz or JSONL) whose hit-rate curves to use")
    conf.add_argument("--policy", help="cache policy whose hit rates to measure (default: lcp); auto: the fastest "
                      "predicted of lcp, lru and lfu")
    conf.add_argument("--predictor", default="gate_lookahead", help="prefetching predictor (default: gate_lookahead; none: load on demand)")
    conf.add_argument("--recall", help="predictor recall, one value or one per MoE layer (default: measured on the "
                      "trace's router inputs)")
    conf.add_argument("--configurator", default="moepic", help="moepic (default), dp or uniform")
    conf.add_argument("--context", type=CONTEXT_TOKENS.parse, default=512, help="KV-cache length the decode step reads (tokens)")
    conf.add_argument("--out", metavar="FILE.yaml", help="write the cache config here (for moepic generate --config)")
    conf.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    from moepic.commands import simulate

    simulate.add_parsers(commands, _Parser)
    from moepic.commands import synthetic

    synthetic.add_parsers(commands)
    _show_config_defaults(gen)
    for name in _WITH_BARS:
        commands.choices[name].add_argument(
            "--progress", action="store_true", help="draw progress bars even when stderr is not a terminal"
        )
    return parser


_WITH_BARS = ("generate", "train-predictor", "profile", "configure", "compare")


def _version() -> str:
    try:
        return importlib.metadata.version("moepic")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        from moepic import __version__

        return __version__


_FLAG_KEYS = {
    "model": "model.path",
    "dtype": "model.dtype",
    "device": "model.device",
    "check_weights": "model.check_weights",
    "prompt": "generate.prompt",
    "prompt_ids": "generate.prompt_ids",
    "max_new_tokens": "generate.max_new_tokens",
    "greedy": "sampling.greedy",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "seed": "sampling.seed",
    "record_trace": "generate.record_trace",
    "trace_hidden": "generate.trace_hidden",
    "budget": "cache.budget",
    "theta": "cache.theta",
    # A strategy's name before its knobs: a new name replaces the node (merge_layers).
    "policy": "cache.policy.name",
    "predictor": "cache.predictor.name",
    "horizon": "cache.predictor.horizon",
    "link_gbps": "cache.link_gbps",
    "link_latency_us": "cache.link_latency_us",
    "token_log": "generate.token_log",
}


def _yaml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if " " <= c <= "~":
        return c
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def _literal(text: str) -> str:
    """`text` as an override value that OmegaConf reads back verbatim.

    A YAML double-quoted scalar with every non-ASCII character escaped (YAML rejects some raw
    characters and JSON's surrogate-pair escapes for emoji). `${` becomes `\\${` so a prompt is never
    an interpolation, and backslashes just before it are doubled, as OmegaConf's escaping asks.
    """
    escaped = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    return '"' + "".join(map(_yaml_char, escaped)) + '"'


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """Flags are spelled as overrides, so one validation path serves YAML, flags and key=value alike."""
    out = []
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            literal = isinstance(value, str) and flag not in ("prompt_ids", "theta")
            if flag == "budget" and "," in value:  # one cache size per MoE layer
                value, literal = "[" + ",".join(_literal(v.strip()) for v in value.split(",")) + "]", False
            out.append(f"{key}={_literal(value) if literal else value}")
    return out


def generate_config(args: argparse.Namespace) -> RunConfig:
    """defaults ← --config YAML ← flags ← key=value overrides. `--policy NAME` is the override
    `cache.policy.name=NAME`: a YAML policy of another name is replaced whole, knobs and all."""
    return load_config(args.config, [*_flag_overrides(args), *args.overrides], allow_env=args.allow_env)


# command → (its module in moepic/commands, the module's run(args) → report, or None where main
# passes the arguments itself, and its text(report) → str). generate prints as it goes.
_COMMANDS = {
    "inspect": ("inspect", None, "inspect_text"),
    "routing-report": ("routing_report", None, "routing_report_text"),
    "train-predictor": ("train_predictor", None, "train_predictor_text"),
    "profile": ("profile", "run_profile", "profile_text"),
    "configure": ("configure", "run_configure", "configure_text"),
    "simulate": ("simulate", "run_simulate", "simulate_text"),
    "compare": ("simulate", "run_compare", "compare_text"),
    "fit-trace": ("synthetic", "run_fit_trace", "fit_trace_text"),
    "synth-trace": ("synthetic", "run_synth_trace", "synth_trace_text"),
}


def _command_function(command: str, which: int):
    """Imported on use, so that one command does not import the others' dependencies."""
    module, *names = _COMMANDS[command]
    return getattr(importlib.import_module(f"moepic.commands.{module}"), names[which])


def main(argv: Sequence[str] | None = None) -> int:
    with interrupts.handled():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:  # `moepic` alone: what the commands are
            sys.stderr.write(parser.format_help())
            return 2
        progress.force(getattr(args, "progress", False))
        if args.command == "routing-report":
            from moepic.commands.routing_report import run_routing_report

            report = run_routing_report(
                args.model, args.text, args.trace, dataset=args.dataset, chunk=args.chunk, max_tokens=args.max_tokens
            )
        elif args.command == "train-predictor":
            from moepic.commands.routing_report import DATASETS
            from moepic.commands.train_predictor import run_train_predictor

            if args.dataset is not None and args.dataset not in DATASETS:
                raise ConfigError(f"unknown dataset {args.dataset!r}; known: {', '.join(sorted(DATASETS))}")
            report = run_train_predictor(
                args.model, traces=args.trace, text_file=str(DATASETS[args.dataset]) if args.dataset else args.text,
                out=args.out, width=args.width, horizon=args.horizon, epochs=args.epochs, valid=args.valid,
                max_tokens=args.max_tokens, seed=args.seed, progress=not args.json,
            )
        elif _COMMANDS.get(args.command, (None, None))[1]:
            report = _command_function(args.command, 0)(args)
        elif args.command == "inspect":
            from moepic.commands.inspect import run_inspect

            report = run_inspect(args.model, args.dtype)
        else:
            from moepic.commands.generate import run_generate

            report = run_generate(generate_config(args), as_json=args.json)
    except (Exception, KeyboardInterrupt) as e:
        code = interrupts.interruption(e)  # Ctrl-C / SIGTERM, or what it caused
        if code is None and not isinstance(e, MoepicError):
            raise  # a bug in moepic: keep its traceback
        progress.end_line()
        if code is None:
            print(f"moepic: error: {e}", file=sys.stderr)
            return 2
        print(f"moepic: {interrupts.message(code)}", file=sys.stderr)
        interrupts.leave(code)
        return code
    if args.json:
        print(json.dumps(report))
    elif args.command in _COMMANDS:
        print(_command_function(args.command, 1)(report))
    else:
        stats = report["stats"]
        cache = ""
        if "expert_hit_rate" in stats:
            cache = (
                f" · {report['cache']['policy']['name']} hit rate {stats['decode_expert_hit_rate']:.1%} · "
                f"{stats['decode_bytes_loaded_per_token'] / 2**20:.2f} MiB/token loaded · "
                f"exposed copies {stats['decode_exposed_copy_s_per_token'] * 1e3:.2f} ms/token"
            )
            if stats["prediction_recall"] is not None:
                cache += f" · {report['cache']['predictor']['name']} recall {stats['prediction_recall']:.1%}"
        print(
            f"[{stats['tokens']} tokens · prefill {stats['prefill_s'] * 1e3:.1f} ms · "
            f"decode {stats['decode_s_per_token'] * 1e3:.2f} ms/token{cache}]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
