"""The `moepic` command. Argument parsing, config loading and printing; user mistakes become one line.

    moepic inspect  [--model DIR] [--dtype D] [--json]
    moepic generate [--model DIR] (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N]
                    [--greedy] [--temperature T] [--top-p P] [--seed S] [--dtype D] [--device DEV]
                    [--config FILE.yaml] [--json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from moepic.checkpoint.hf_config import DTYPES
from moepic.config import RunConfig, load_config
from moepic.errors import CheckpointError, ConfigError, MoepicError

DEFAULT_PROMPT = "And God said"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage dump is noise for a one-line mistake
        raise ConfigError(f"{self.prog}: {message}")


def _prompt_ids(text: str) -> str:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return "[" + ",".join(map(str, ids)) + "]"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moepic", description="Exact MoE inference with experts offloaded to host memory.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--config", help="YAML run config (keys as in moepic/config.py)")
    gen.add_argument("--model", help="Hugging Face model folder (default: the built-in model)")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    prompt.add_argument("--prompt-ids", type=_prompt_ids, help="prompt as token ids: 1,2,3")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--greedy", action="store_true", default=None, help="argmax decoding (default: sampling)")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--dtype", choices=["auto", *DTYPES])
    gen.add_argument("--device", help="cpu, cuda, cuda:1 …")
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    gen.add_argument("--record-trace", metavar="FILE.npz", help="save every token's routing to this file")
    gen.add_argument("--trace-hidden", action="store_true", default=None, help="include router inputs in the trace")
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampling.seed=3")
    inspect = commands.add_parser("inspect", help="a checkpoint's shape and memory, from config.json alone")
    inspect.add_argument("--model", help="Hugging Face model folder (default: the built-in model)")
    inspect.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="count bytes in this dtype")
    inspect.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


_FLAG_KEYS = {
    "model": "model.path",
    "dtype": "model.dtype",
    "device": "model.device",
    "prompt": "generate.prompt",
    "prompt_ids": "generate.prompt_ids",
    "max_new_tokens": "generate.max_new_tokens",
    "greedy": "sampling.greedy",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "seed": "sampling.seed",
    "record_trace": "generate.record_trace",
    "trace_hidden": "generate.trace_hidden",
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
            out.append(f"{key}={_literal(value) if isinstance(value, str) and flag != 'prompt_ids' else value}")
    return out


def _stdout_streamer(codec):
    """(on_token, finish) that print the new text as it is generated (token ids without a tokenizer)."""
    from moepic.tokenizer import IncrementalDecoder

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if codec is None:
        return (lambda token: show(f"{token} ")), (lambda: show("\n"))
    decoder = IncrementalDecoder(codec)
    return (lambda token: show(decoder.push(token))), (lambda: show(decoder.flush() + "\n"))


def _save_trace(recorder, path: str) -> None:
    from moepic.tracing import save_trace

    try:
        save_trace(recorder.trace(), path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the trace ({e.strerror or e})") from None


def run_generate(cfg: RunConfig, *, as_json: bool) -> dict:
    """Load, generate, and return the report; streams the text to stdout unless `as_json`."""
    from moepic.checkpoint.load import load_model
    from moepic.default_model import default_model_dir
    from moepic.runtime.generation import generate
    from moepic.tokenizer import TextCodec

    folder = cfg.model.path or str(default_model_dir())
    if not Path(folder).is_dir():  # before the tokenizer lookup, which would blame tokenizer.json
        raise CheckpointError(f"{folder}: model folder not found")
    try:
        torch.device(cfg.model.device)
    except RuntimeError:
        raise ConfigError(f"model.device {cfg.model.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {cfg.model.device!r}, but CUDA is not available on this machine")
    trace_path = cfg.generate.record_trace
    if trace_path is not None and not Path(trace_path).resolve().parent.is_dir():
        raise ConfigError(f"{trace_path}: cannot write the trace (its folder does not exist)")
    dtype = None if cfg.model.dtype == "auto" else DTYPES[cfg.model.dtype]
    codec = TextCodec.from_folder(folder)
    if cfg.generate.prompt_ids is not None:
        prompt_ids = list(cfg.generate.prompt_ids)
    else:
        if codec is None:
            raise ConfigError(f"{folder} has no tokenizer.json: give the prompt as --prompt-ids 1,2,3")
        prompt_ids = codec.encode(DEFAULT_PROMPT if cfg.generate.prompt is None else cfg.generate.prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3")
    model = load_model(folder, dtype=dtype, device=cfg.model.device, progress=not as_json)
    # The KV cache is sized for the whole run up front, so a huge max_new_tokens would fail allocating it.
    length, limit = len(prompt_ids) + cfg.generate.max_new_tokens, model.spec.max_position_embeddings
    if length > limit:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + generate.max_new_tokens ({cfg.generate.max_new_tokens}) = {length} "
            f"exceeds the model's max_position_embeddings ({limit})"
        )
    bad = [i for i in prompt_ids if not 0 <= i < model.spec.vocab_size]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary [0, {model.spec.vocab_size})")
    on_token, finish = (None, None) if as_json else _stdout_streamer(codec)
    recorder = None
    if cfg.generate.record_trace is not None:
        from moepic.tracing.recorder import RoutingRecorder

        recorder = RoutingRecorder(model.spec, model_name=folder, record_hidden=cfg.generate.trace_hidden)
    # The streamed text is the progress display; a bar would interleave with it.
    result = generate(
        model,
        prompt_ids,
        max_new_tokens=cfg.generate.max_new_tokens,
        sampling=cfg.sampling,
        on_token=on_token,
        tap=recorder,
    )
    if finish is not None:
        finish()
    if recorder is not None:
        _save_trace(recorder, cfg.generate.record_trace)
    report = {"model": folder, "prompt_ids": prompt_ids, "token_ids": result.token_ids}
    if codec is not None:
        report["text"] = codec.decode(result.token_ids)
    report["stopped_on_eos"] = result.stopped_on_eos
    report["stats"] = result.stats.as_dict()
    return report


def run_inspect(model: str | None, dtype_name: str) -> dict:
    """Spec and parameter/byte counts of a model folder, without reading any weights."""
    import attrs

    from moepic.checkpoint.load import read_spec
    from moepic.core.footprint import footprint
    from moepic.default_model import default_model_dir

    folder = model or str(default_model_dir())
    spec, cfg = read_spec(folder)
    dtype = cfg.checkpoint_dtype() if dtype_name == "auto" else DTYPES[dtype_name]
    fp, size = footprint(spec), torch.empty((), dtype=dtype).element_size()
    return {
        "model": folder,
        "dtype": str(dtype).removeprefix("torch."),
        "spec": attrs.asdict(spec),
        "total_params": fp.total_params,
        "routed_experts": fp.num_routed_experts,
        "bytes_per_expert": fp.routed_expert_params * size,
        "routed_expert_bytes": fp.routed_expert_bytes(size),
        "resident_bytes": fp.resident_params * size,
    }


def _inspect_text(report: dict) -> str:
    spec, moe, gib = report["spec"], report["spec"]["moe"], 2**30
    kinds = spec["layer_kinds"]
    lines = [
        f"{report['model']}: {spec['model_type']}, {len(kinds)} layers ({kinds.count('moe')} MoE, "
        f"{kinds.count('dense')} dense), D {spec['hidden_size']}, {spec['num_heads']} heads / "
        f"{spec['num_kv_heads']} KV, {report['total_params'] / 1e9:.3f} B params"
    ]
    if moe:
        lines.append(
            f"experts: {moe['num_experts']} per MoE layer, top-{moe['top_k']}, F {moe['expert_ffn']}, "
            f"router {moe['router']['kind']}{' (renormalised)' if moe['router']['renormalize'] else ''}"
            + (f", shared expert F {moe['shared_expert_ffn']}" if moe["shared_expert_ffn"] else "")
        )
    lines.append(
        f"{report['dtype']}: {report['routed_experts']} routed experts x {report['bytes_per_expert'] / 2**20:.2f} MiB"
        f" = {report['routed_expert_bytes'] / gib:.3f} GiB offloadable; {report['resident_bytes'] / gib:.3f} GiB resident"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "inspect":
            report = run_inspect(args.model, args.dtype)
        else:
            cfg = load_config(args.config, [*_flag_overrides(args), *args.overrides])
            report = run_generate(cfg, as_json=args.json)
    except MoepicError as e:
        print(f"moepic: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moepic: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report))
    elif args.command == "inspect":
        print(_inspect_text(report))
    else:
        stats = report["stats"]
        print(
            f"[{stats['tokens']} tokens · prefill {stats['prefill_s'] * 1e3:.1f} ms · "
            f"decode {stats['decode_s_per_token'] * 1e3:.2f} ms/token]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
