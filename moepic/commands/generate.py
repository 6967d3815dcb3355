"""`moepic generate`: load a model, generate (streaming text to stdout), optionally record a trace.

Its flags are spelled as config overrides (`FLAG_KEYS`), so one validation path serves YAML, flags
and key=value alike. Side effects: reads the model, streams text, writes the trace and token log.
"""

from __future__ import annotations

import argparse
import re
import sys

import attrs

from moepic.commands import arguments
from moepic.errors import ConfigError
from moepic.ranges import LINK_GBPS, LINK_LATENCY_US

NAME = "generate"
HELP = "generate text from a prompt"
TEXT_ON_STDERR = True  # the generated text streams to stdout; the report is a timing line beside it

DEFAULT_PROMPT = "And God said"

# Each flag's config key. A strategy's name before its knobs: a new name replaces the node (merge_layers).
FLAG_KEYS = {
    "model": "model.path",
    "dtype": "model.dtype",
    "device": "model.device",
    "check_weights": "model.check_weights",
    "expert_format": "model.expert_format.name",
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
    "policy": "cache.policy.name",
    "predictor": "cache.predictor.name",
    "horizon": "cache.predictor.horizon",
    "link_gbps": "cache.link_gbps",
    "link_latency_us": "cache.link_latency_us",
    "token_log": "generate.token_log",
    "hybrid": "cache.hybrid",
    "host_threads": "cache.host_threads",
    "host": "cache.host",
    "miss_format": "cache.miss_format.name",
}


def _config_default(key: str):
    """RunConfig's default of `key`, read when the help is shown (the config imports the registries)."""

    def read():
        from moepic.config import RunConfig

        value: object = RunConfig()
        for part in key.split("."):
            value = getattr(value, part, None)
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value

    return read


def _key_range(section: str, field: str):
    """The argparse type of a flag that sets a config key: the key's own range (moepic/ranges.py),
    so the flag is named in the error and the rule is written once."""

    def parse(text: str):
        from moepic import config

        return attrs.fields_dict(getattr(config, section))[field].validator.parse(text)

    return parse


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


def add_parser(subparsers) -> argparse.ArgumentParser:
    gen = subparsers.add_parser(NAME, help=HELP)
    gen.add_argument("--config", help="YAML run config (keys as in moepic/config.py)")
    arguments.add_model(gen, shape=False)
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs the model's tokenizer: tokenizer.json, or a GGUF file's own)")
    prompt.add_argument("--prompt-ids", type=_prompt_ids, help="prompt as token ids: 1,2,3")
    gen.add_argument("--max-new-tokens", type=_key_range("GenerateConfig", "max_new_tokens"), help="tokens to generate after the prompt")
    gen.add_argument("--greedy", action="store_true", default=None, help="argmax decoding (default: sampling)")
    gen.add_argument("--temperature", type=_key_range("SamplingConfig", "temperature"), help="sampling temperature")
    gen.add_argument("--top-p", type=_key_range("SamplingConfig", "top_p"), help="sample from the most likely tokens holding this much probability")
    gen.add_argument("--seed", type=_key_range("SamplingConfig", "seed"), help="sampling seed")
    arguments.add_dtype(gen, "dtype of the weights, auto: the checkpoint's")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 …")
    arguments.strategy_flag(gen, "expert-format", "keep routed experts as: {names} (default: as the checkpoint stores "
                            "them; dense dequantises, the others encode as they load; knobs as "
                            "model.expert_format.group_size=128; `moepic quantize` writes such a checkpoint)",
                            shows=lambda: "as stored")
    gen.add_argument("--no-check-weights", dest="check_weights", action="store_false", default=None,
                     help="skip the NaN/Inf check of each weight as it loads (done by default; skipping "
                     "saves 0.01-0.3 s per GB: experiments/bench_weight_check.py)")
    arguments.add_json(gen)
    gen.add_argument("--record-trace", metavar="FILE.npz", help="save every token's routing to this file")
    gen.add_argument("--trace-hidden", action="store_true", default=None, help="include router inputs in the trace")
    arguments.add_budget(gen, "offload experts: device memory for them, 512MiB or 0.25 (of all expert bytes); "
                         "or a,b,… cache sizes per MoE layer")
    gen.add_argument("--theta", type=_floats, help="split ratio: one value or one per MoE layer (0.5 or 0.25,0.5,…)")
    arguments.strategy_flag(gen, "policy", "cache policy: {names}")
    arguments.strategy_flag(gen, "predictor", "prefetch with an expert predictor: {names} (none: load on demand)")
    gen.add_argument("--horizon", type=int, help="MoE layers ahead the predictor prefetches (1-3)")
    gen.add_argument("--link-gbps", type=LINK_GBPS.parse, help="CPU: emulate a host→device link of this many GB/s")
    gen.add_argument("--link-latency-us", type=LINK_LATENCY_US.parse, help="CPU: per-copy latency of the emulated link, µs")
    arguments.strategy_flag(gen, "miss-format", "offloaded runs, changes numbers: serve each miss from a low-bit copy in this "
                            "format ({names}; knobs as cache.miss_format.group_size=128) while the cache keeps the "
                            "expert itself", shows=lambda: "off", names=arguments.registered_names("expert format"))
    arguments.add_hybrid(gen, threads=True)
    arguments.add_host(gen, "CUDA only: it prices --hybrid auto (default: measured at start-up; on a CPU device the "
                       "host is measured and the link is the emulated one: no --link-gbps, copies are free and auto "
                       "copies every load)")
    gen.add_argument("--token-log", metavar="FILE.jsonl", help="offloaded runs: one JSON line per token (latency, copies)")
    gen.add_argument("--allow-env", action="store_true", help="let configs read environment variables with ${oc.env:NAME}")
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampling.seed=3")
    arguments.add_progress(gen)
    for action in gen._actions:  # each override flag shows its config key's default, unless it says its own
        if action.dest in FLAG_KEYS and not hasattr(action, "shows"):
            action.shows = _config_default(FLAG_KEYS[action.dest])
    return gen


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
    out = []
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            literal = isinstance(value, str) and flag not in ("prompt_ids", "theta")
            if flag == "budget" and "," in value:  # one cache size per MoE layer
                value, literal = "[" + ",".join(_literal(v.strip()) for v in value.split(",")) + "]", False
            out.append(f"{key}={_literal(value) if literal else value}")
    return out


def generate_config(args: argparse.Namespace):
    """defaults ← --config YAML ← flags ← key=value overrides. `--policy NAME` is the override
    `cache.policy.name=NAME`: a YAML policy of another name is replaced whole, knobs and all."""
    from moepic.config import load_config

    return load_config(args.config, [*_flag_overrides(args), *args.overrides], allow_env=args.allow_env)


def run(args: argparse.Namespace) -> dict:
    arguments.refuse_preset(args.model, NAME)  # a preset name is no folder: say that weights are needed
    return run_generate(generate_config(args), as_json=args.json)


def text(report: dict) -> str:
    stats = report["stats"]
    cache = ""
    if "expert_hit_rate" in stats:
        cache = (
            f" · {report['cache']['policy']['name']} hit rate {stats['decode_expert_hit_rate']:.1%} · "
            f"{stats['decode_bytes_loaded_per_token'] / 2**20:.2f} MiB/token loaded · "
            f"exposed copies {stats['decode_exposed_copy_s_per_token'] * 1e3:.2f} ms/token"
        )
        if stats["miss_fill_bytes"]:  # misses served low-bit: the cache's full-precision tops, copied behind
            cache += f" · {stats['miss_fill_bytes'] / 2**20:.2f} MiB of tops filled"
        if stats["prediction_recall"] is not None:
            cache += f" · {report['cache']['predictor']['name']} recall {stats['prediction_recall']:.1%}"
        if report["cache"].get("hybrid", "off") != "off":
            cache += (
                f" · host computed {stats['host_experts']} experts + {stats['host_bottoms']} bottoms "
                f"+ {stats['host_splits']} split misses' bottoms, "
                f"{stats['decode_host_s_per_token'] * 1e3:.2f} ms/token busy"
            )
    return (
        f"[{stats['tokens']} tokens · prefill {stats['prefill_s'] * 1e3:.1f} ms · "
        f"decode {stats['decode_s_per_token'] * 1e3:.2f} ms/token{cache}]"
    )


def _stdout_streamer(codec):
    """(on_token, finish) that print the new text as it is generated (token ids without a tokenizer)."""
    from moepic.progress import stream as show
    from moepic.tokenizer import IncrementalDecoder

    if codec is None:
        return (lambda token: show(f"{token} ")), (lambda: show("\n"))
    decoder = IncrementalDecoder(codec)
    return (lambda token: show(decoder.push(token))), (lambda: show(decoder.flush() + "\n"))


def _link(cfg, device):
    from moepic.runtime.copy_engine import Link

    if cfg.cache.link_gbps is None:
        return None
    if device.type == "cuda":
        raise ConfigError("cache.link_gbps emulates a link for CPU runs; on CUDA the real link is used")
    return Link(gbps=cfg.cache.link_gbps, latency_us=cfg.cache.link_latency_us)


def _pricing(cfg, model, link):
    """What `--hybrid auto` places loads by: measured or named at start-up (runtime/host_pricing.py)."""
    if cfg.cache.hybrid != "auto":
        return None
    from moepic.quant import format_of
    from moepic.runtime.host_pricing import run_pricing

    expert = next(lw.ffn.experts[0] for lw in model.weights.layers if hasattr(lw.ffn, "experts"))
    return run_pricing(model.device, model.dtype.itemsize, host=cfg.cache.host, link=link, threads=cfg.cache.host_threads,
                       expert_format=format_of(expert), note=lambda text: print(f"moepic: note: {text}", file=sys.stderr))


def _check_every_key_takes_effect(cfg) -> None:
    """A key the chosen mode ignores is an error, never silently dropped: the user meant something by it."""
    from moepic.config import CacheConfig

    def named(key: str) -> str:
        flags = [f"--{flag.replace('_', '-')}" for flag, k in FLAG_KEYS.items() if k.split(".")[:2] == key.split(".")]
        return f"{key} ({flags[0]})" if flags else key

    if cfg.cache.budget is None and cfg.cache.hybrid != "off":
        raise ConfigError(f"{named('cache.hybrid')} needs {named('cache.budget')}: with every expert resident nothing is loaded")
    if cfg.cache.budget is None:
        dense = CacheConfig()
        ignored = [f"cache.{f.name}" for f in attrs.fields(CacheConfig) if getattr(cfg.cache, f.name) != getattr(dense, f.name)]
        ignored += ["generate.token_log"] if cfg.generate.token_log is not None else []
        if ignored:
            raise ConfigError(
                f"{named(ignored[0])} has no effect without cache.budget (--budget): the dense run keeps every expert "
                "on the device; give a budget to offload, or leave it out"
            )
    if cfg.cache.link_latency_us and cfg.cache.link_gbps is None:
        raise ConfigError(f"{named('cache.link_latency_us')} has no effect without cache.link_gbps (--link-gbps): no link is emulated")
    for key, needs in (("host_threads", ("auto", "host-only")), ("host", ("auto",))):
        if getattr(cfg.cache, key) is not None and cfg.cache.hybrid not in needs:
            raise ConfigError(
                f"{named('cache.' + key)} has no effect with cache.hybrid {cfg.cache.hybrid} (--hybrid): "
                f"it is for --hybrid {' or '.join(needs)}"
            )
    if cfg.generate.trace_hidden and cfg.generate.record_trace is None:
        raise ConfigError(f"{named('generate.trace_hidden')} has no effect without generate.record_trace (--record-trace FILE.npz)")


def run_generate(cfg, *, as_json: bool) -> dict:
    """Load, generate, and return the report; streams the text to stdout unless `as_json`."""
    import torch

    from moepic.checkpoint.hf_config import DTYPES
    from moepic.outputs import PendingOutput, check_writable
    from moepic.checkpoint.load import load_model, read_spec
    from moepic.quant import build_format
    from moepic.default_model import model_folder
    from moepic.runtime.generation import generate
    from moepic.tokenizer import TextCodec, no_tokenizer

    _check_every_key_takes_effect(cfg)
    folder = model_folder(cfg.model.path)
    try:
        torch.device(cfg.model.device)
    except RuntimeError:
        raise ConfigError(f"model.device {cfg.model.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {cfg.model.device!r}, but CUDA is not available on this machine")
    if torch.device(cfg.model.device).type != "cuda":
        for key, flag, why in (("host", "--host", "priced by measuring it"), ("host_threads", "--host-threads", "torch's threads")):
            if getattr(cfg.cache, key) is not None:
                raise ConfigError(f"cache.{key} ({flag}) is for a CUDA device; on {cfg.model.device!r} the host is the "
                                  f"device ({why})")
    trace_path = cfg.generate.record_trace
    if trace_path is not None:
        check_writable(trace_path, "trace")  # before loading and generating, not after
    log_path = cfg.generate.token_log
    if log_path is not None:
        check_writable(log_path, "token log")
    dtype = None if cfg.model.dtype == "auto" else DTYPES[cfg.model.dtype]
    codec = TextCodec.from_folder(folder)
    if cfg.generate.prompt_ids is not None:
        prompt_ids = list(cfg.generate.prompt_ids)
    else:
        if codec is None:
            raise ConfigError(f"{no_tokenizer(folder)}: give the prompt as --prompt-ids 1,2,3")
        prompt_ids = codec.encode(DEFAULT_PROMPT if cfg.generate.prompt is None else cfg.generate.prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3")
    offload = cfg.cache.budget is not None
    spec, _ = read_spec(folder)  # config.json alone: the checks below come before loading the weights
    # The KV cache is sized for the whole run up front, so a huge max_new_tokens would fail allocating it.
    length, limit = len(prompt_ids) + cfg.generate.max_new_tokens, spec.max_position_embeddings
    if length > limit:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + generate.max_new_tokens ({cfg.generate.max_new_tokens}) = {length} "
            f"exceeds the model's max_position_embeddings ({limit})"
        )
    bad = [i for i in prompt_ids if not 0 <= i < spec.vocab_size]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary [0, {spec.vocab_size})")
    model = load_model(folder, dtype=dtype, device=cfg.model.device, progress=not as_json, offload_experts=offload,
                       check_weights=cfg.model.check_weights,
                       expert_format=None if cfg.model.expert_format is None else build_format(cfg.model.expert_format))
    experts = None
    if offload:
        from moepic.runtime.offload import offloaded_experts

        link = _link(cfg, model.device)
        experts = offloaded_experts(
            model, cfg.cache.budget, cfg.cache.theta, cfg.cache.policy, cfg.cache.predictor,
            link=link, overlap_top=cfg.cache.overlap_top, hybrid=cfg.cache.hybrid,
            pricing=_pricing(cfg, model, link), host_threads=cfg.cache.host_threads,
            miss_format=None if cfg.cache.miss_format is None else build_format(cfg.cache.miss_format),
        )
        for note in experts.layout.notes:  # a θ that whole neuron blocks rounded: said once, not hidden
            if note.problem():
                experts.close()
                raise ConfigError(note.problem())
            print(f"moepic: note: {note}", file=sys.stderr)
        from moepic.policies.own_future import check_run_prompt

        check_run_prompt((experts.policy, experts.predictor), len(prompt_ids))  # belady's, an oracle's trace
    on_token, finish = (None, None) if as_json else _stdout_streamer(codec)
    log_file = None
    if log_path is not None:
        from moepic.runtime.token_log import TokenLog

        log_file = PendingOutput(log_path, "token log", text=True)  # renamed to log_path once generation completes
        log, show = TokenLog(log_file, experts), on_token
        on_token = log if show is None else (lambda token: (log(token), show(token)))
    recorder = None
    if trace_path is not None:
        from moepic.tracing import save_trace
        from moepic.tracing.recorder import RoutingRecorder

        recorder = RoutingRecorder(model.spec, model_name=folder, record_hidden=cfg.generate.trace_hidden)
    # The streamed text is the progress display; a bar would interleave with it.
    try:
        result = generate(
            model,
            prompt_ids,
            max_new_tokens=cfg.generate.max_new_tokens,
            sampling=cfg.sampling,
            on_token=on_token,
            tap=recorder,
            experts=experts,
        )
    except BaseException:
        if log_file is not None:
            log_file.discard()  # an interrupted or failed run leaves no partial log, an older one intact
        raise
    if log_file is not None:
        log_file.commit()
    if finish is not None:
        finish()
    if recorder is not None:
        save_trace(recorder.trace(), trace_path)  # all or nothing (moepic.outputs)
    report = {"model": folder, "prompt_ids": prompt_ids, "token_ids": result.token_ids}
    if codec is not None:
        report["text"] = codec.decode(result.token_ids)
    report["stopped_on_eos"] = result.stopped_on_eos
    report["stats"] = result.stats.as_dict()
    if experts is not None:
        report["cache"] = {
            "policy": cfg.cache.policy.as_dict(), "predictor": cfg.cache.predictor.as_dict(), "budget": cfg.cache.budget,
            "hybrid": cfg.cache.hybrid,
        }
        report["stats"] |= experts.report()
        experts.close()
    return report
